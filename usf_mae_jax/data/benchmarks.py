"""Random-access reading of a converted benchmark split, for the fine-tuning and feature-extraction code.

    src = load_split(data_dir, "busbra", "train", fold=1)
    len(src); src[i] -> {"image": uint8 (H, W, C), "label": int, "subject": str, "source": str, "id": str}
    src.ids, src.labels            # without decoding any image (class-balanced sampling, audit files)
    class_names(data_dir, "busbra") -> ["benign", "malignant"]
    mask_class_names(data_dir, "busbra") -> ["background", "lesion"]   (None: converted without masks)

Conversions with masks (converter 1.1.0+, docs/segmentation.md) add `"mask"`, a uint8 (H, W) class map the
size of the image (0 = background), and `"has_mask"` to each item; `src.has_mask` tells, without decoding,
which records have one, and `src.mask_dropped` (converter 1.2.0+) which of those without one had a mask file
the converter dropped as unusable (a size mismatch, an unreadable file; the manifest's `masks.dropped`).

`data_dir` is the converter's `--out_dir` (holding `<name>/[<config>/]<version>/`) or that version folder
itself. `split` is `train`, `validation`, `test`, or `train_full` where the benchmark has it (MMOTU-2D and
GIST514-DB: the official training list before the 5% validation hold-out). `fold` picks the round
(BUS-BRA and BUSI 1..5, default 1; GIST514-DB 0..4, default 0; MMOTU-2D and labelled sets have one, 0).
`subset` picks a builder config (GIST514-DB: `roi`, the default, or `raw`; BUSI: `three_class`, the default,
or `benign_malignant`, the same folds without the normal images). `channels` (1 or 3) converts images on
read, e.g. 3 for a model that wants RGB; None returns them as stored.

The source is a plain Python sequence, so `grain.MapDataset.source(src)` works on it directly; it reads
through TFDS's ArrayRecord data sources and never imports tensorflow.
"""

from __future__ import annotations

import functools
import json
import os

import numpy as np

from usf_mae_jax.cli import ConfigError, DataError, MissingInputError

BUILDER_NAMES = {"busbra": "busbra", "mmotu": "mmotu", "gist514": "gist514", "labelled": "labelled", "busi": "busi"}
DEFAULT_SUBSETS = {"gist514": "roi", "busi": "three_class"}


def _has_splits(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "splits.json")) and os.path.isfile(
        os.path.join(path, "dataset_info.json"))


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(p) if p.isdigit() else -1 for p in name.split("."))


def find_version_dir(data_dir: str, benchmark: str, subset: str | None = None) -> str:
    """The folder of a converted benchmark (newest version), or FileNotFoundError saying what was looked for."""
    if _has_splits(data_dir):
        return data_dir
    if benchmark not in BUILDER_NAMES:
        raise ConfigError(f"unknown benchmark {benchmark!r}; choose one of {sorted(BUILDER_NAMES)}")
    base = os.path.join(data_dir, BUILDER_NAMES[benchmark])
    subset = subset or DEFAULT_SUBSETS.get(benchmark)
    if subset:
        base = os.path.join(base, subset)
    versions = sorted((d for d in os.listdir(base) if _has_splits(os.path.join(base, d))),
                      key=_version_key) if os.path.isdir(base) else []
    if not versions:
        raise MissingInputError(f"no converted {benchmark} under {base} (expected <version>/splits.json and "
                                f"dataset_info.json); run `python -m data_prep {benchmark} --raw_dir RAW "
                                f"--out_dir {data_dir}` first")
    return os.path.join(base, versions[-1])


def _read_splits(version_dir: str) -> dict:
    path = os.path.join(version_dir, "splits.json")
    return _read_splits_cached(path, os.path.getmtime(path))  # a re-conversion changes the mtime


@functools.lru_cache(maxsize=16)
def _read_splits_cached(path: str, mtime: float) -> dict:
    del mtime
    with open(path) as f:
        return json.load(f)


def class_names(data_dir: str, benchmark: str, subset: str | None = None) -> list[str]:
    return list(_read_splits(find_version_dir(data_dir, benchmark, subset))["class_names"])


def mask_class_names(data_dir: str, benchmark: str, subset: str | None = None) -> list[str] | None:
    """The mask classes (background first) of a conversion with masks, or None."""
    names = _read_splits(find_version_dir(data_dir, benchmark, subset)).get("mask_class_names")
    return list(names) if names else None


def split_ids(data_dir: str, benchmark: str, split: str, fold: int | str | None = None,
              subset: str | None = None) -> list[str]:
    """The record ids (sources) of one official split, in the converter's order."""
    splits = _read_splits(find_version_dir(data_dir, benchmark, subset))
    key = splits["default_fold"] if fold is None else str(fold)
    if key not in splits["folds"]:
        raise ConfigError(f"{benchmark} has no fold {fold!r}; folds are {sorted(splits['folds'])}")
    if split not in splits["folds"][key]:
        raise ConfigError(f"{benchmark} fold {key} has no split {split!r}; splits are "
                         f"{sorted(splits['folds'][key])}")
    return list(splits["folds"][key][split])


def _as_text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class SplitSource:
    """A random-access view of one split over the benchmark's storage parts."""

    def __init__(self, version_dir: str, ids: list[str], channels: int | None = None):
        if channels not in (None, 1, 3):
            raise ValueError(f"channels must be None, 1 or 3, got {channels}")
        splits = _read_splits(version_dir)
        where = {}
        for part, index in splits["parts"].items():
            has_mask = index.get("has_mask", [False] * len(index["ids"]))
            for i, (record_id, label, masked) in enumerate(zip(index["ids"], index["labels"], has_mask)):
                where[record_id] = (part, i, label, masked)
        missing = [i for i in ids if i not in where]
        if missing:
            raise DataError(f"{version_dir}: split ids not stored in any part, e.g. {missing[:5]}")
        self.version_dir = version_dir
        self.ids = list(ids)
        self.labels = np.array([where[i][2] for i in ids], np.int64)
        self.has_mask = np.array([where[i][3] for i in ids], bool)
        dropped = set(splits.get("masks_dropped", ()))
        self.mask_dropped = np.array([i in dropped for i in ids], bool)
        self._locations = [where[i][:2] for i in ids]
        self.channels = channels
        self._parts: dict = {}

    def _part(self, name: str):
        if name not in self._parts:
            import tensorflow_datasets as tfds  # imported lazily: only reading needs it

            self._parts[name] = tfds.builder_from_directory(self.version_dir).as_data_source(split=name)
        return self._parts[name]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a split of {len(self)} records")
        part, position = self._locations[index]
        example = self._part(part)[position]
        image = np.asarray(example["image"], np.uint8)
        if self.channels == 3 and image.shape[-1] == 1:
            image = np.repeat(image, 3, axis=-1)
        elif self.channels == 1 and image.shape[-1] == 3:
            image = np.round(image @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)[..., None]
        item = {"image": image, "label": int(example["label"]), "subject": _as_text(example["subject"]),
                "source": _as_text(example["source"]), "id": self.ids[index]}
        if "mask" in example:
            item["mask"] = np.asarray(example["mask"], np.uint8)[:, :, 0]
            item["has_mask"] = bool(example["has_mask"])
        return item

    def __getitems__(self, indices) -> list[dict]:
        return [self[i] for i in indices]


def load_split(data_dir: str, benchmark: str, split: str, fold: int | str | None = None,
               subset: str | None = None, channels: int | None = None) -> SplitSource:
    """A random-access source of one official split; see the module docstring."""
    version_dir = find_version_dir(data_dir, benchmark, subset)
    return SplitSource(version_dir, split_ids(version_dir, benchmark, split, fold), channels)


def manifest(data_dir: str, benchmark: str, subset: str | None = None) -> dict:
    """The conversion manifest (counts, skipped files, warnings, hashes, licence)."""
    with open(os.path.join(find_version_dir(data_dir, benchmark, subset), "manifest.json")) as f:
        return json.load(f)
