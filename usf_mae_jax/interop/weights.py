"""`load_weights(path)`: the one reader of an `init`, whatever form its weights take.

`init`, `embed`, `interop export` and evaluation accept:

  * a training workdir (read-only through `core.checkpoint.load_params`: its `best` params when the run
    selected by a metric, else its newest state);
  * a PyTorch `.pth`/`.pt` file (read by the refusing unpickler) or a `.safetensors` file;
  * an interop import directory (`python -m usf_mae_jax.interop import`);
  * a Hugging Face `transformers` ViTMAE directory (`interop/hf_vitmae.py`: config.json with model.safetensors
    or pytorch_model.bin), registered first at the bottom of this file;
  * any further format registered with `register_reader`.

Each reader is a pair of functions: `accepts(path) -> bool`, a cheap look at names on disk, and
`read(path) -> (params, model fields)`. The first reader that accepts the path reads it, so a more specific
format registers before a general one. This module lives in the interop floor, above `core`, so that core's
checkpoint code never imports torch conversion code (docs/design.md, "Layout": no upward imports).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import NamedTuple

from usf_mae_jax.cli import MissingInputError
from usf_mae_jax.core import checkpoint


class WeightReader(NamedTuple):
    """A named weight format: `accepts(path)` says whether `read(path)` should read it."""

    name: str
    accepts: Callable[[str], bool]
    read: Callable[[str], tuple[dict, dict | None]]


_READERS: list[WeightReader] = []


def register_reader(reader: WeightReader, first: bool = False) -> None:
    """Adds a format; `first` puts it ahead of the built-in ones (for a directory layout they would claim)."""
    if any(r.name == reader.name for r in _READERS):
        raise ValueError(f"a weight reader named {reader.name!r} is already registered")
    if first:
        _READERS.insert(0, reader)
    else:
        _READERS.append(reader)


def readers() -> tuple[str, ...]:
    """Names of the registered formats, in the order they are tried."""
    return tuple(r.name for r in _READERS)


def load_weights(path: str, step: int | None = None) -> tuple[dict, dict | None]:
    """(params as nested NumPy dicts, the model fields as a dict or None) of an init in any registered form.

    `step` chooses a workdir checkpoint (None: the newest). Raises MissingInputError for a missing path or one
    that no reader accepts, naming the formats tried.
    """
    if not path:
        raise MissingInputError("no checkpoint path given")
    if not os.path.exists(path):
        raise MissingInputError(f"checkpoint path {path} does not exist")
    if checkpoint.is_workdir(path):
        return checkpoint.load_params(path, step)
    if step is not None:
        raise MissingInputError(f"a checkpoint step applies to a training workdir; {path} is not one")
    for reader in _READERS:
        if reader.accepts(path):
            return reader.read(path)
    raise MissingInputError(f"{path} is none of the weight formats this project reads (a training workdir, "
                            f"{', '.join(readers())})")


def _is_torch_file(path: str) -> bool:
    return os.path.isfile(path)


def _is_import_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "model_config.json")) and os.path.isdir(os.path.join(path, "params"))


def _read_torch(path: str) -> tuple[dict, dict]:
    from usf_mae_jax.interop import torch_mae  # local: torch conversion tables only when a torch file is read

    params, model_config, _ = torch_mae.load_pretrained(path)
    return params, dataclasses.asdict(model_config)


register_reader(WeightReader("PyTorch .pth/.pt/.safetensors file", _is_torch_file, _read_torch))
register_reader(WeightReader("interop import directory", _is_import_dir, _read_torch))


def _is_hf_dir(path: str) -> bool:
    from usf_mae_jax.interop import hf_vitmae  # local, as _read_torch

    return os.path.isdir(path) and hf_vitmae.is_hf_dir(path)


def _read_hf(path: str) -> tuple[dict, dict]:
    from usf_mae_jax.interop import hf_vitmae

    params, model_config, _ = hf_vitmae.load_hf_dir(path)
    return params, dataclasses.asdict(model_config)


# Ahead of the built-in readers, as a folder layout should be (register_reader).
register_reader(WeightReader("Hugging Face ViTMAE directory", _is_hf_dir, _read_hf), first=True)
