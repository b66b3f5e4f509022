"""Converts one OpenUS-46 dataset: `RAW/<key>/` -> `OUT/<key>/` shards and manifest, via `writer`.

Steps for one dataset (the CLI runs them for each requested key, canonical duplicates first):

1. skip it when it is a held-out benchmark, when `RAW/<key>/` is missing (printing the expected path), or
   when `OUT/<key>/manifest.json` exists (finished earlier: resume), restoring its dedup hashes;
2. unpack nested zips, then find the inputs with the spec's include / exclude rules (`spec.discover`);
3. hand one task per input file to `writer.write_dataset`, with `load_file` as the loader (run in worker
   processes) and the shared `Deduplicator` as the dedup callable (main process); every other file under
   `RAW/<key>/` goes to the manifest's `not_converted` by category, so its `accounting` covers the folder;
4. save the dataset's kept hashes next to the output (`OUT/_openus46/<key>.json`) so a resumed run still
   deduplicates later datasets against it, and return one summary row.

A dataset that cannot be converted (an unreadable zip, every input unreadable) gives a `failed` row with the
one-line reason and no manifest; the other datasets still run, and the CLI reports the failures at the end.

A task is a tuple whose first element is the input's absolute path, so the writer hashes the source file
into the manifest and names it in `skipped` when the loader fails.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections import Counter

from data_prep import writer
from data_prep.clean import CleanOptions, clean_image, mask_like_reason
from data_prep.dedup import Deduplicator
from data_prep.formats.archives import unpack_nested_zips, unsupported_archives
from data_prep.formats.dicom import dicom_frames
from data_prep.formats.hdf5 import hdf5_frames
from data_prep.formats.image2d import read_image
from data_prep.formats.sampling import FrameSampling
from data_prep.formats.video import video_frames
from data_prep.formats.volumes import metaimage_as_2d, read_metaimage, volume_frames
from data_prep.openus46.registry import get_spec
from data_prep.openus46.spec import (
    DICOM_EXTENSIONS,
    HDF5_EXTENSIONS,
    IMAGE_EXTENSIONS,
    METAIMAGE_EXTENSIONS,
    NIFTI_EXTENSIONS,
    VIDEO_EXTENSIONS,
    DatasetSpec,
    discover,
    subject_of,
)
from usf_mae_jax.cli import DataError, one_line

CONVERTER_VERSION = "openus46 1.0"
SIDECAR_DIR = "_openus46"


@dataclasses.dataclass(frozen=True)
class ConvertOptions:
    """Run-wide settings shared by every dataset of one CLI call."""

    raw_dir: str
    out_dir: str
    workers: int = 1
    overwrite: bool = False
    max_side: int = 512
    nearest_size: int = writer.DEFAULT_NEAREST_SIZE
    clean: CleanOptions = dataclasses.field(default_factory=CleanOptions)
    include_optional: bool = False
    include_holdouts: bool = False
    unpack: bool = True
    max_frames: int | None = None
    records_per_shard: int = writer.DEFAULT_RECORDS_PER_SHARD
    progress: bool = True


def read_frames(spec: DatasetSpec, path: str, sampling: FrameSampling) -> list[tuple[int, object, str]]:
    """(frame index or -1, uint8 image, group id or "") for every 2-D image an input file yields."""
    lower = path.lower()
    if lower.endswith(IMAGE_EXTENSIONS):
        return [(-1, read_image(path), "")]
    if lower.endswith(METAIMAGE_EXTENSIONS) and not spec.mha_stack:
        return [(-1, metaimage_as_2d(read_metaimage(path), path), "")]
    if lower.endswith(METAIMAGE_EXTENSIONS + NIFTI_EXTENSIONS):
        return [(index, frame, "") for index, frame in volume_frames(path, sampling)]
    if lower.endswith(VIDEO_EXTENSIONS):
        return [(index, frame, "") for index, frame in video_frames(path, sampling)]
    if lower.endswith(HDF5_EXTENSIONS):
        return [(index, frame, group)
                for group, index, frame in hdf5_frames(path, spec.hdf5_dataset, sampling, spec.hdf5_group)]
    if lower.endswith(DICOM_EXTENSIONS):
        return [(index, frame, "") for index, frame in dicom_frames(path, sampling)]
    raise writer.SkipFile(f"{path}: no reader for this file type")


def load_file(task: tuple) -> list[writer.Example]:
    """The writer's loader: one input file -> its cleaned examples (worker process, so top-level)."""
    path, key, relpath, clean, sampling = task
    spec = get_spec(key)
    frames = read_frames(spec, path, sampling)
    if not frames:
        raise writer.SkipFile("no non-empty frame left after sampling")
    subject = subject_of(spec, relpath)
    if len(frames) == 1 and frames[0][0] == -1:  # a still image: a mask the excludes missed is skipped, named
        reason = mask_like_reason(frames[0][1])
        if reason:
            raise writer.SkipFile(reason)
    return [writer.Example(image=clean_image(image, clean), source=relpath, subject=group or subject,
                           frame=int(index))
            for index, image, group in frames]


def dataset_root(options: ConvertOptions, key: str) -> str:
    return os.path.join(options.raw_dir, key)


def _sampling(spec: DatasetSpec, options: ConvertOptions) -> FrameSampling:
    if options.max_frames is None:
        return spec.sampling
    return dataclasses.replace(spec.sampling, max_frames=options.max_frames)


def _clean_options(spec: DatasetSpec, options: ConvertOptions) -> CleanOptions:
    return dataclasses.replace(options.clean, colour_is_content=spec.colour_is_content)


def build_tasks(spec: DatasetSpec, options: ConvertOptions
                ) -> tuple[list[tuple], dict[str, str], dict[str, list[str]], list[str]]:
    """(tasks, {excluded file: reason}, {category: files left out}, archive notes) for one dataset folder;
    unpacks zips first."""
    root = dataset_root(options, spec.key)
    if options.unpack:
        unpack_nested_zips(root, skip=spec.unpack_skip)
    inputs, excluded, left_out = discover(spec, root, options.include_optional)
    notes = unsupported_archives(root)
    clean, sampling = _clean_options(spec, options), _sampling(spec, options)
    tasks = [(os.path.join(root, rel), spec.key, rel, clean, sampling) for rel in inputs]
    return tasks, excluded, left_out, notes


def _sidecar_path(options: ConvertOptions, key: str) -> str:
    return os.path.join(options.out_dir, SIDECAR_DIR, f"{key}.json")


def _reason_category(reason: str) -> str:
    """A skip reason without the file's own path, so identical problems group together in the summary."""
    reason = re.sub(r"(/[^\s:]+)+", "<file>", reason)
    return reason if len(reason) <= 160 else reason[:157] + "..."


def _row(spec: DatasetSpec, status: str, manifest: dict | None = None, sidecar: dict | None = None,
         message: str = "") -> dict:
    manifest = manifest or {}
    dropped = manifest.get("dropped", [])
    held = sum(1 for d in dropped if str(d.get("reason", "")).startswith("held out"))
    return {
        "key": spec.key, "status": status, "message": message,
        "images": int(manifest.get("total", 0)),
        "frames_sampled": int((sidecar or {}).get("frames_sampled", 0)),
        "inputs": int(manifest.get("inputs", 0)),
        "skipped": dict(Counter(_reason_category(s.get("reason", "")) for s in manifest.get("skipped", []))),
        "excluded": int(manifest.get("excluded_count", 0)),
        "duplicates_removed": len(dropped) - held,
        "held_out_matches": held,
    }


def convert_dataset(spec: DatasetSpec, options: ConvertOptions, dedup: Deduplicator | None) -> dict:
    """Converts one dataset (or skips it with a reason) and returns its summary row."""
    if spec.holdout and not options.include_holdouts:
        return _row(spec, "held out", message="downstream benchmark (pass --include_holdouts to convert)")
    root = dataset_root(options, spec.key)
    if not os.path.isdir(root):
        return _row(spec, "missing", message=f"expected the extracted {spec.name} at {os.path.abspath(root)}")
    out_folder = os.path.join(options.out_dir, spec.key)
    existing = writer.read_manifest(out_folder)
    if existing is not None and not options.overwrite:
        sidecar = _read_sidecar(options, spec.key)
        if dedup is not None and sidecar is not None:
            dedup.restore(spec.key, sidecar)
        note = "" if sidecar is not None else "no dedup sidecar: later datasets are not deduplicated against it"
        return _row(spec, "already converted", existing, sidecar, note)
    try:
        tasks, excluded, left_out, notes = build_tasks(spec, options)
    except DataError as err:
        return _row(spec, "failed", message=one_line(str(err)))
    if not tasks:
        hint = " ".join(notes) if notes else "no file matched the include rules " + ", ".join(spec.include)
        return _row(spec, "no inputs", message=hint)
    frames = Counter()

    def on_example(example) -> str | None:
        reason = None
        if dedup is not None:
            reason = dedup.check(spec.key, _ref(spec.key, example), example.image, fingerprint=example.fingerprint)
        if reason is None and example.frame >= 0:
            frames["sampled"] += 1
        return reason

    extra = {
        "converter_version": CONVERTER_VERSION, "name": spec.name, "anatomy": spec.anatomy,
        "licence": spec.licence, "citation": spec.source, "format": spec.format, "family": spec.family,
        "include": list(spec.include), "sampling": dataclasses.asdict(_sampling(spec, options)),
        "cleaning": dataclasses.asdict(_clean_options(spec, options)),
        "dedup": None if dedup is None else {"exact": dedup.exact, "phash_threshold": dedup.phash_threshold},
        "excluded_count": len(excluded), "excluded": excluded, "archive_notes": notes,
    }
    try:
        manifest = writer.write_dataset(
            options.out_dir, spec.key, tasks, load_file, workers=options.workers, overwrite=options.overwrite,
            max_side=options.max_side, nearest_size=options.nearest_size, dedup=on_example,
            fingerprint=None if dedup is None else dedup.fingerprinter(), manifest_extra=extra,
            progress=options.progress, records_per_shard=options.records_per_shard,
            not_converted={"excluded": sorted(excluded), **left_out})
    except DataError as err:
        return _row(spec, "failed", message=one_line(str(err)))
    sidecar = {"frames_sampled": frames["sampled"], **(dedup.export(spec.key) if dedup is not None else {})}
    _write_sidecar(options, spec.key, sidecar)
    return _row(spec, "converted", manifest, sidecar, " ".join(notes))


def _ref(key: str, example) -> str:
    return f"{key}:{example.source}" + (f"#{example.frame}" if example.frame >= 0 else "")


def _read_sidecar(options: ConvertOptions, key: str) -> dict | None:
    try:
        with open(_sidecar_path(options, key)) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def _write_sidecar(options: ConvertOptions, key: str, payload: dict) -> None:
    path = _sidecar_path(options, key)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temp = path + ".tmp"
    with writer.writing(temp), open(temp, "w") as handle:
        json.dump(payload, handle)
    os.replace(temp, path)
