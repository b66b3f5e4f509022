"""Parallel ArrayRecord shard writer: converter tasks -> `OUT/<name>/<split>-NNNNN-of-NNNNN.array_record`.

Every converter (the generic `folder` and `synthetic` ones, the OpenUS-46 and benchmark builders) describes a
dataset as a list of picklable *tasks* (usually one raw file each) and a top-level `load(task)` that yields
`Example`s. `write_dataset` does the rest, the same way for all of them:

* runs `load` over the tasks in worker processes (a tqdm bar shows progress), validates each image, caps its
  longest side at `max_side` and encodes it with `usf_mae_jax.data.records.encode` inside the worker, where
  the PNG compression runs in parallel;
* also writes, from the *original* image, its nearest-neighbour resize to `nearest_size` squared (224 by
  default) as a second, aligned set of shards, `<split>.nearest224-NNNNN-of-NNNNN.array_record`, with raw
  pixels: record i of both sets is the same example. The `usf_mae` recipe starts with exactly that resize
  of the original frame, so training reads these ready-made pixels instead of decoding the larger frame,
  and the `max_side` cap (an area downscale) never reaches them (docs/data_pipeline.md);
* computes the dedup fingerprints (`fingerprint(image)`, e.g. `Deduplicator.fingerprinter()`) in the
  workers too, so the main process only looks them up;
* collects the results in task order in the main process, so the shards are identical for any number of
  workers, and applies the optional `dedup(example)` there (it sees every example, across workers);
* records every input it could not use with the reason: `SkipFile` from a loader, any other exception (a
  converter bug or a corrupt file never crashes a multi-hour run), an invalid image or a dedup drop;
* writes each shard under a hidden temporary name and renames it to its final name only once it is complete
  and closed, then writes `manifest.json` (also through a temporary name). A dataset folder is finished iff
  its manifest exists, and the manifest lists the shards: an interrupted run leaves only `*.tmp` files, which
  the next run deletes before starting again. A run that fails (a full disk, an interrupt) removes what it
  wrote; a write error is an OSError naming the file, which the command line reports in one line;
* accounts for every input: `accounting` = {inputs, converted, skipped, not_converted} with
  inputs = converted + skipped + not_converted, where `not_converted` counts the files the converter left out
  before conversion (its filters, symlinks it could not follow; listed in the manifest by category) and
  `skipped` the inputs that gave no record (reasons in `skipped`, or in `dropped` when every example was a
  duplicate). A run in which no input gave a record and nothing was dropped as a duplicate is a `DataError`
  and leaves no manifest, so an empty source or a wrong option is never sealed as "already converted".

Running again over a finished dataset does nothing and returns the existing manifest, unless `overwrite`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import hashlib
import json
import logging
import multiprocessing
import os
import re
import shutil
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from tqdm import tqdm

from usf_mae_jax.cli import ConfigError, DataError
from usf_mae_jax.data import augment, records

WRITER_VERSION = "1.1"  # 1.1: the nearest-resized variant shards, fingerprints in the workers
MANIFEST_NAME = "manifest.json"
SHARD_SUFFIX = ".array_record"
DEFAULT_RECORDS_PER_SHARD = 1024
# group_size:1 makes every record independently addressable (random access for the shuffled reader);
# PNG payloads are already deflate-compressed, so a second zstd pass would cost CPU on every read for nothing.
ARRAY_RECORD_OPTIONS = "group_size:1,uncompressed"
_SPLIT_PATTERN = re.compile(r"^[a-z0-9_]+$")
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.\-]+$")
_SHARD_PATTERN = re.compile(r"^[a-z0-9_]+(\.nearest\d+)?-\d{5}-of-\d{5}" + re.escape(SHARD_SUFFIX) + "$")
_RESERVED_KEYS = frozenset({"dataset", "created", "writer_version", "record_format_version", "counts",
                            "total", "channels", "labels", "shards", "records_per_shard", "max_side",
                            "variants", "inputs", "skipped", "dropped", "source_hashes", "content_sha256",
                            "accounting", "not_converted"})
# I/O failures that array_record reports as RuntimeError text; turned back into OSErrors naming the file.
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO)
DEFAULT_NEAREST_SIZE = 224  # the USF-MAE recipe's first step: Resize((224, 224), NEAREST) of the original

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Example:
    """One 2-D frame produced by a converter's `load(task)`."""

    image: np.ndarray  # uint8, (H, W) / (H, W, 1) grayscale or (H, W, 3) colour
    source: str  # path relative to the raw dataset root
    subject: str = ""
    frame: int = -1
    label: int = -1
    split: str = "train"
    fingerprint: Any = None  # set by the writer when write_dataset gets a `fingerprint` function


class SkipFile(Exception):
    """Raised by a loader to skip one input; the message is recorded in the manifest as the reason."""


@dataclasses.dataclass
class _Encoded:
    example: Example  # image dropped (None) unless the main process needs it for dedup
    record: bytes
    channels: int
    nearest: bytes | None  # the nearest-resized variant's record, when one is written


@dataclasses.dataclass(frozen=True)
class _WorkerOptions:
    dataset: str
    max_side: int
    nearest_size: int
    keep_images: bool
    fingerprint: Callable[[np.ndarray], Any] | None


@dataclasses.dataclass
class _TaskResult:
    encoded: list[_Encoded]
    skipped: list[dict[str, str]]  # whole task or single examples that could not be used
    file_hash: str | None


def _task_path(task: Any) -> str | None:
    """The raw file behind a task, when the task is a path or a tuple/list starting with one."""
    candidate = task[0] if isinstance(task, (tuple, list)) and task else task
    if isinstance(candidate, (str, os.PathLike)) and os.path.isfile(candidate):
        return os.fspath(candidate)
    return None


def _describe(task: Any) -> str:
    text = _task_path(task) or str(task)
    return text if len(text) <= 500 else text[:497] + "..."


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks (the manifest's source hashes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cap_longest_side(image: np.ndarray, max_side: int) -> np.ndarray:
    """Downscales (area interpolation, aspect kept) so that max(H, W) <= max_side; 0 disables the cap."""
    height, width = image.shape[:2]
    if max_side <= 0 or max(height, width) <= max_side:
        return image
    scale = max_side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resized = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    return resized.reshape(size[1], size[0], *image.shape[2:])


def check_dataset_name(name: str) -> str:
    """`name` when it is a plain folder name (letters, digits, `_ . -`); a ConfigError otherwise."""
    if not _NAME_PATTERN.match(name) or name in (".", ".."):
        raise ConfigError(f"dataset name {name!r} must be a plain folder name (letters, digits, _ . -)")
    return name


def check_split(split: str) -> str:
    """`split` when it is a lowercase name like 'train' (it becomes part of the shard file names)."""
    if not _SPLIT_PATTERN.match(str(split)):
        raise ConfigError(f"split {split!r} is not a lowercase name like 'train' (letters, digits, _)")
    return split


def _validate(example: Any) -> Example:
    if not isinstance(example, Example):
        raise ValueError(f"loader yielded {type(example).__name__}, not an Example")
    check_split(example.split)
    if not isinstance(example.frame, (int, np.integer)) or not isinstance(example.label, (int, np.integer)):
        raise ValueError(f"frame and label must be integers, got {example.frame!r} and {example.label!r}")
    return example


def _process_task(job: tuple[Any, Callable, _WorkerOptions]) -> _TaskResult:
    """Worker side: load one task, validate, cap and encode its examples, fingerprint them. Never raises for a
    bad input."""
    task, load, options = job
    path = _task_path(task)
    try:
        examples = list(load(task))
    except SkipFile as e:
        reason = str(e) or "skipped by the loader"
        return _TaskResult([], [{"input": _describe(task), "reason": reason}], None)
    except Exception as e:  # a bad input or a converter bug: record it, keep converting the rest
        reason = f"{type(e).__name__}: {e}"
        return _TaskResult([], [{"input": _describe(task), "reason": reason}], None)
    if not examples:
        return _TaskResult([], [{"input": _describe(task), "reason": "the loader yielded no image"}], None)
    encoded, skipped = [], []
    for example in examples:
        try:
            example = _validate(example)
            original = records.as_hwc(example.image)
            image = cap_longest_side(original, options.max_side)
            meta = {"dataset": options.dataset, "source": example.source, "subject": example.subject,
                    "frame": int(example.frame), "label": int(example.label)}
            record = records.encode(image, **meta)
            nearest = None
            if options.nearest_size > 0:
                nearest = records.encode(augment.resize_nearest(original, options.nearest_size), codec="raw",
                                         **meta)
            fingerprint = options.fingerprint(image) if options.fingerprint is not None else None
        except ValueError as e:
            where = f"{getattr(example, 'source', '?')}#{getattr(example, 'frame', '?')}"
            skipped.append({"input": _describe(task), "example": where, "reason": str(e)})
            continue
        kept = dataclasses.replace(example, image=image if options.keep_images else None,
                                   frame=int(example.frame), label=int(example.label), fingerprint=fingerprint)
        encoded.append(_Encoded(kept, record, image.shape[2], nearest))
    file_hash = None
    if path is not None and encoded:
        try:
            file_hash = file_sha256(path)
        except OSError as e:
            skipped.append({"input": _describe(task), "reason": f"could not hash the file: {e}"})
    return _TaskResult(encoded, skipped, file_hash)


def _named_os_error(err: Exception, path: str | os.PathLike) -> OSError | None:
    """`err` as an OSError that names `path`, or None when it is not an I/O failure."""
    if isinstance(err, OSError):
        return err if err.filename else OSError(err.errno, err.strerror or str(err), os.fspath(path))
    for code in _WRITE_ERRNOS:
        if os.strerror(code) in str(err):
            return OSError(code, os.strerror(code), os.fspath(path))
    return None


@contextlib.contextmanager
def writing(path: str | os.PathLike):
    """Re-raises a failed write of `path` (a full disk, ...) as an OSError naming the file."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        named = _named_os_error(err, path)
        if named is None or named is err:
            raise
        raise named from err


class _ShardSequence:
    """The shards of one split (or of one stored variant of a split, `prefix` 'train.nearest224'): filled in
    order, each written under a temporary name until finalised."""

    def __init__(self, folder: Path, prefix: str, records_per_shard: int):
        self.folder, self.prefix, self.records_per_shard = folder, prefix, records_per_shard
        self.completed: list[Path] = []
        self._writer: ArrayRecordWriter | None = None
        self._in_shard = 0
        self.count = 0

    def _temp_path(self, index: int) -> Path:
        return self.folder / f".{self.prefix}-{index:05d}{SHARD_SUFFIX}.tmp"

    def write(self, record: bytes) -> None:
        with writing(self._temp_path(len(self.completed))):
            if self._writer is None:
                self._writer = ArrayRecordWriter(str(self._temp_path(len(self.completed))),
                                                 ARRAY_RECORD_OPTIONS)
            self._writer.write(record)
        self._in_shard += 1
        self.count += 1
        if self._in_shard == self.records_per_shard:
            self._close_current()

    def _close_current(self) -> None:
        if self._writer is not None:
            with writing(self._temp_path(len(self.completed))):
                self._writer.close()
            self.completed.append(self._temp_path(len(self.completed)))
            self._writer, self._in_shard = None, 0

    def finalize(self) -> list[str]:
        """Closes the open shard and renames every complete temporary shard to its final name (atomic)."""
        self._close_current()
        names = []
        for index, temp in enumerate(self.completed):
            name = f"{self.prefix}-{index:05d}-of-{len(self.completed):05d}{SHARD_SUFFIX}"
            os.replace(temp, self.folder / name)
            names.append(name)
        return names


def _clear_outputs(folder: Path) -> None:
    """Removes the manifest first (so the folder reads as unfinished), then shards and leftover temp files."""
    (folder / MANIFEST_NAME).unlink(missing_ok=True)
    for entry in folder.iterdir():
        if _SHARD_PATTERN.match(entry.name) or entry.name.endswith(".tmp"):
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()


def _write_json_atomic(path: Path, payload: dict) -> None:
    temp = path.with_name(f".{path.name}.tmp")
    with writing(temp):
        temp.write_text(json.dumps(payload, indent=2, sort_keys=False, ensure_ascii=False) + "\n")
    os.replace(temp, path)


def read_manifest(folder: str | os.PathLike) -> dict | None:
    """The manifest of a finished dataset folder, or None when the folder is absent or unfinished."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def _results(jobs: list, workers: int) -> Iterable[_TaskResult]:
    if workers <= 1:
        yield from map(_process_task, jobs)
        return
    # spawn, not fork: a converter may run inside a process that already started threads (JAX, tqdm, ...).
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(_process_task, jobs, chunksize=1)


def write_dataset(out_dir: str | os.PathLike, name: str, tasks: Sequence[Any],
                  load: Callable[[Any], Iterable], *, workers: int = 1,
                  records_per_shard: int = DEFAULT_RECORDS_PER_SHARD, overwrite: bool = False,
                  max_side: int = 512, nearest_size: int = DEFAULT_NEAREST_SIZE,
                  dedup: Callable[[Example], str | None] | None = None,
                  fingerprint: Callable[[np.ndarray], Any] | None = None,
                  manifest_extra: dict[str, Any] | None = None, progress: bool = True,
                  not_converted: Mapping[str, Sequence[str]] | None = None) -> dict:
    """Converts `tasks` with `load` into the dataset folder `out_dir/name`; returns its manifest.

    `load(task)` must be a picklable top-level callable yielding `Example`s; it may raise `SkipFile(reason)`
    (or anything else) to skip the task, which is then listed in the manifest's `skipped` with the reason.
    `nearest_size` > 0 also writes the nearest-resized variant (module docstring); 0 writes frames only.
    `dedup(example)`, if given, runs in the main process in task order and returns a reason to drop the
    example or None. With `fingerprint` (a picklable function of the stored frame), the workers compute
    `example.fingerprint` for it and the image itself is not sent back to the main process.
    `manifest_extra` is merged into the manifest (e.g. the licence, or `converter_version`).
    `not_converted` maps a category (e.g. "excluded", "broken_symlink") to the files the converter found but
    left out; it is stored in the manifest and counted in its `accounting` (module docstring).

    Raises `DataError` when there is nothing to convert or no input gave a record (no manifest is written),
    and an OSError naming the file when writing fails; either way the partial output is removed.
    """
    check_dataset_name(name)
    if records_per_shard <= 0:
        raise ConfigError(f"records_per_shard must be positive, got {records_per_shard}")
    if nearest_size < 0:
        raise ConfigError(f"nearest_size must be >= 0 (0: no nearest variant), got {nearest_size}")
    extra = dict(manifest_extra or {})
    clashes = sorted(_RESERVED_KEYS & extra.keys())
    if clashes:
        raise ValueError(f"manifest_extra may not set the writer's own keys {clashes}")
    folder = Path(out_dir) / name
    existing = read_manifest(folder)
    if existing is not None and not overwrite:
        log.info("%s is already converted (%s); pass overwrite to redo it", name, folder / MANIFEST_NAME)
        return existing
    tasks = list(tasks)
    if not tasks:
        raise DataError(f"{name}: nothing to convert (no input)")
    left_out = {str(why): sorted(map(str, files)) for why, files in (not_converted or {}).items() if files}
    folder.mkdir(parents=True, exist_ok=True)
    _clear_outputs(folder)
    try:
        manifest, converted = _convert(folder, name, tasks, load, workers, records_per_shard, max_side,
                                       nearest_size, dedup, fingerprint, progress)
        not_converted_count = sum(len(files) for files in left_out.values())
        manifest["inputs"] = len(tasks) + not_converted_count
        manifest["accounting"] = {"inputs": manifest["inputs"], "converted": converted,
                                  "skipped": len(tasks) - converted, "not_converted": not_converted_count}
        manifest["not_converted"] = left_out
        manifest["converter_version"] = extra.pop("converter_version", manifest["converter_version"])
        manifest.update(extra)
        _write_json_atomic(folder / MANIFEST_NAME, manifest)
    except BaseException:
        _discard_outputs(folder)
        raise
    log.info("%s: %d records in %s, %d inputs skipped, %d examples dropped", name, manifest["total"],
             manifest["counts"], len(manifest["skipped"]), len(manifest["dropped"]))
    return manifest


def _discard_outputs(folder: Path) -> None:
    """Best-effort removal of a failed run's shards and temporary files (the disk may be full)."""
    try:
        _clear_outputs(folder)
    except OSError as err:
        log.warning("could not remove the partial output in %s: %s", folder, err)


def _no_record_error(name: str, tasks: list, skipped: list[dict[str, str]]) -> DataError:
    first = skipped[0] if skipped else {"input": "?", "reason": "?"}
    return DataError(f"{name}: no record written: all {len(tasks)} inputs were skipped "
                     f"(first: {first['input']}: {first['reason']})")


def _convert(folder: Path, name: str, tasks: list, load: Callable[[Any], Iterable], workers: int,
             records_per_shard: int, max_side: int, nearest_size: int,
             dedup: Callable[[Example], str | None] | None, fingerprint: Callable[[np.ndarray], Any] | None,
             progress: bool) -> tuple[dict, int]:
    """Runs the tasks and writes the shards; returns (the manifest without the caller's keys, the number of
    inputs that gave at least one record)."""
    options = _WorkerOptions(name, max_side, nearest_size, dedup is not None and fingerprint is None, fingerprint)
    jobs = [(task, load, options) for task in tasks]
    variant = f"nearest{nearest_size}"
    splits: dict[str, _ShardSequence] = {}
    nearest_splits: dict[str, _ShardSequence] = {}
    skipped: list[dict[str, str]] = []
    dropped: list[dict[str, Any]] = []
    channels: Counter = Counter()
    labels: dict[str, Counter] = defaultdict(Counter)
    source_hashes: dict[str, str] = {}
    content = hashlib.sha256()
    converted_inputs = 0
    bar = tqdm(total=len(tasks), desc=f"{name}", unit="input", disable=not progress)
    try:
        for result in _results(jobs, workers):
            bar.update(1)
            skipped.extend(result.skipped)
            written = 0
            for item in result.encoded:
                example = item.example
                reason = dedup(example) if dedup is not None else None
                if reason:
                    dropped.append({"source": example.source, "frame": example.frame, "reason": str(reason)})
                    continue
                if example.split not in splits:
                    splits[example.split] = _ShardSequence(folder, example.split, records_per_shard)
                    if item.nearest is not None:
                        nearest_splits[example.split] = _ShardSequence(folder, f"{example.split}.{variant}",
                                                                       records_per_shard)
                splits[example.split].write(item.record)
                written += 1
                content.update(item.record)
                if item.nearest is not None:
                    nearest_splits[example.split].write(item.nearest)
                    content.update(item.nearest)
                channels[str(item.channels)] += 1
                labels[example.split][str(example.label)] += 1
                if result.file_hash is not None:
                    source_hashes[example.source] = f"file:sha256:{result.file_hash}"
                else:
                    previous = source_hashes.get(example.source, "")
                    digest = hashlib.sha256((previous + hashlib.sha256(item.record).hexdigest()).encode())
                    source_hashes[example.source] = f"records:sha256:{digest.hexdigest()}"
            converted_inputs += written > 0
        if not converted_inputs and not dropped:
            raise _no_record_error(name, tasks, skipped)
        shards = {split: sequence.finalize() for split, sequence in sorted(splits.items())}
        nearest_shards = {split: sequence.finalize() for split, sequence in sorted(nearest_splits.items())}
    finally:
        bar.close()

    counts = {split: sequence.count for split, sequence in sorted(splits.items())}
    manifest = {
        "dataset": name,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "converter_version": f"data_prep.writer {WRITER_VERSION}",
        "writer_version": WRITER_VERSION,
        "record_format_version": records.FORMAT_VERSION,
        "counts": counts,
        "total": sum(counts.values()),
        "channels": dict(sorted(channels.items())),
        "labels": {split: dict(sorted(c.items(), key=lambda kv: int(kv[0])))
                   for split, c in sorted(labels.items())},
        "shards": shards,
        "records_per_shard": records_per_shard,
        "max_side": max_side,
        "variants": {variant: {"resize": "nearest", "size": nearest_size, "codec": "raw", "shards": nearest_shards}}
        if nearest_shards else {},
        "inputs": len(tasks),
        "skipped": skipped,
        "dropped": dropped,
        "source_hashes": dict(sorted(source_hashes.items())),
        "content_sha256": content.hexdigest(),
    }
    return manifest, converted_inputs
