"""Small file helpers shared by the writers and readers: content hashes and atomic JSON/NPZ writes.

A file that a crash may interrupt (a run's results, cached features, manifests) is written to a temporary
name in the same folder and renamed over the target, so a reader never sees half a file, and a rerun finds
either the old file or the new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any

import numpy as np


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _atomic_target(path: str | os.PathLike, suffix: str) -> tuple[str, int]:
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=suffix, dir=os.path.dirname(path))
    return temp, fd


def json_safe(value: Any) -> Any:
    """NaN and infinities (e.g. an undefined AUC) become null, since strict JSON has no NaN."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, np.generic):
        return json_safe(value.item())
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def write_json(path: str | os.PathLike, payload: Any, sort_keys: bool = True) -> None:
    """Writes `payload` as indented strict JSON (NaN -> null), atomically (temp file + rename)."""
    temp, fd = _atomic_target(path, ".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(json_safe(payload), f, indent=2, sort_keys=sort_keys, default=str)
            f.write("\n")
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.remove(temp)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text`, atomically (temp file + rename)."""
    temp, fd = _atomic_target(path, ".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.remove(temp)
        raise


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


def write_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """`np.savez` to `path`, atomically."""
    temp, fd = _atomic_target(path, ".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.remove(temp)
        raise
