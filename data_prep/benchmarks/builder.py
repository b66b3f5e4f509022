"""The TFDS builder shared by the benchmarks, and `prepare`, which converts one raw folder.

Each benchmark subclasses `BenchmarkBuilder` with its name, licence, citation, manual-download instructions,
mask class names and a `parse(raw_dir)` that returns a `common.Plan`. The builder writes the plan's disjoint
*parts* (e.g. the five BUS-BRA test folds) as TFDS splits in `file_format='array_record'`, so every image is
stored once. The official splits (per fold: train, validation, test), which overlap across folds, are written
next to the shards as id lists in `splits.json`; `reader.load_split` assembles them. tensorflow is not needed:
`download_and_prepare` runs from Python (docs/design.md), and images are handed to TFDS as PNG bytes that we
encode with OpenCV (TFDS encodes arrays with tensorflow).

Since version 1.1.0 a builder with mask class names stores each image's segmentation mask in the same record
(`mask`: a uint8 class map as PNG, 0 = background; `has_mask`: False for an image whose mask is missing,
which then carries an all-zero mask), built by `masks.build` at the image's stored size and capped with it
by nearest-neighbour resizing (docs/segmentation.md). Classification reads the same records and ignores the
two fields; version 1.0.0 and 1.1.0 folders stay readable.

Since version 1.2.0 a mask that cannot be used never aborts the conversion: the plan stage
(`common.check_masks`, file headers only) drops masks whose size differs from their image, or, with
`resize_mismatched_masks`, resizes them by nearest neighbour; a mask that fails only when decoded is dropped
here. The image is kept with `has_mask` false, and the manifest names every file (`masks.dropped`,
`masks.resized`); `splits.json` lists the ids whose mask was dropped, so readers can tell them from images
that never had one.

Output, for `out_dir`:

    out_dir/<name>[/<config>]/<version>/
        dataset_info.json, features.json, <name>-<part>.array_record-*   (TFDS)
        splits.json     class names, mask class names (or null), default fold, per fold {train, validation,
                        test[, train_full]} ids, per part the ids, labels (and has_mask) in storage order,
                        and the ids whose mask was dropped
        manifest.json   counts per split, skipped files with reasons, warnings, source hashes, licence,
                        converter version, options, the masks dropped or resized, converter-specific
                        sections (`Plan.extra`), and the accounting of every file under the raw root
                        (`common.account`: inputs = converted + skipped + not_converted)

The version folder is finished iff its manifest exists; asking for other converter options (BUSI's folds and
seed, mask resizing) than a finished folder was made with is an error rather than a silent reuse. A plan
without any image, or a conversion in which no image could be decoded, is a `DataError` before any manifest
is written; a failed or interrupted conversion (a full disk included) removes the version folder, so no
half-written output is ever read as complete.
"""

from __future__ import annotations

import abc
import io
import json
import logging
import os
import re
import shutil
import time
from typing import ClassVar

import cv2
import numpy as np
import tensorflow_datasets as tfds

from data_prep.benchmarks import common, masks
from data_prep.writer import file_sha256, writing
from usf_mae_jax.cli import ConfigError, DataError

CONVERTER_VERSION = "1.2.0"
DEFAULT_MAX_SIDE = 512  # docs/design.md, "Shards": converters cap the longest side so decoding stays cheap

log = logging.getLogger(__name__)


class BenchmarkBuilder(tfds.core.GeneratorBasedBuilder, abc.ABC):
    """Base of the benchmark builders. Subclasses set the class attributes and implement `parse`."""

    VERSION = tfds.core.Version(CONVERTER_VERSION)
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "Records with the design's field names; official splits in splits.json.",
        "1.1.0": "Segmentation masks in the image's record (mask, has_mask) for builders with mask classes.",
        "1.2.0": "Unusable masks are dropped (or resized on request) and listed, never abort the conversion."}
    LICENSE = ""
    CITATION = ""
    HOMEPAGE = ""
    DESCRIPTION = ""
    CHANNELS = 1
    CLASS_NAMES: tuple[str, ...] = ()
    MASK_CLASS_NAMES: tuple[str, ...] = ()  # background first; empty: the records carry no mask

    def __init__(self, *, raw_dir: str | None = None, max_side: int | None = DEFAULT_MAX_SIDE,
                 resize_mismatched_masks: bool = False, **kwargs):
        self.raw_dir = raw_dir
        self.max_side = max_side
        self.resize_mismatched_masks = resize_mismatched_masks
        self._plan: common.Plan | None = None
        self.failed: list[dict[str, str]] = []
        self.thresholded: list[str] = []  # binary masks that were not exactly two-valued
        self.without_mask: list[str] = []  # records of a masked dataset whose dataset lacks the mask
        self.masks_dropped: list[dict[str, str]] = []  # masks that failed while decoding: {mask, image, reason}
        super().__init__(**kwargs)

    @abc.abstractmethod
    def parse(self, raw_dir: str) -> common.Plan:
        """Reads the raw folder's label and split files into a plan."""

    @property
    def plan(self) -> common.Plan:
        if self._plan is None:
            if not self.raw_dir:
                raise ConfigError(f"{self.name}: converting needs raw_dir, the manually downloaded folder")
            plan = self.parse(self.raw_dir)
            common.check_masks(plan, self.resize_mismatched_masks)
            self._plan = plan
        return self._plan

    def conversion_options(self) -> dict:
        """The options that change what is written, beyond max_side and channels; recorded in the manifest and
        compared with a finished conversion's. Subclasses with their own options extend it."""
        return {"resize_mismatched_masks": self.resize_mismatched_masks}

    def class_names(self) -> list[str]:
        return list(self.CLASS_NAMES)

    def channels(self) -> int:
        return self.CHANNELS

    def mask_class_names(self) -> list[str] | None:
        """The mask classes, background first, or None when the records carry no mask."""
        return list(self.MASK_CLASS_NAMES) or None

    def dataset_name(self) -> str:
        """The records' `dataset` field: the builder name, with its config for subsets (gist514/roi)."""
        return f"{self.name}/{self.builder_config.name}" if self.builder_config else self.name

    def _info(self) -> tfds.core.DatasetInfo:
        features = {
            "image": tfds.features.Image(shape=(None, None, self.channels()), encoding_format="png"),
            "height": tfds.features.Scalar(np.int32),
            "width": tfds.features.Scalar(np.int32),
            "dataset": tfds.features.Text(),
            "source": tfds.features.Text(),
            "subject": tfds.features.Text(),
            "frame": tfds.features.Scalar(np.int32),
            "label": tfds.features.ClassLabel(names=self.class_names()),
        }
        if self.mask_class_names():
            features["mask"] = tfds.features.Image(shape=(None, None, 1), encoding_format="png")
            features["has_mask"] = tfds.features.Scalar(np.bool_)
        return tfds.core.DatasetInfo(builder=self, description=self.DESCRIPTION,
                                     features=tfds.features.FeaturesDict(features),
                                     supervised_keys=("image", "label"), homepage=self.HOMEPAGE or None,
                                     citation=self.CITATION, license=self.LICENSE)

    def _split_generators(self, dl_manager):
        del dl_manager  # the raw folder comes from raw_dir: the data needs a manual, licensed download
        plan = self.plan
        return {part: self._generate_examples([it for it in plan.items if it.part == part])
                for part in plan.parts()}

    def _generate_examples(self, items):
        dataset = self.dataset_name()
        with_masks = bool(self.mask_class_names())
        dropped_at_plan = {entry["image"] for entry in self.plan.masks_dropped}
        for item in items:
            try:
                stored = common.decode_image(item.path)
            except ValueError as err:
                # Decoding runs in the writer; the failure is recorded here and reported in the manifest.
                self.failed.append({"file": item.source, "reason": str(err)})
                continue
            image = common.convert_channels(common.cap_side(stored, self.max_side), self.channels())
            example = {"image": io.BytesIO(common.encode_png(image)), "height": image.shape[0],
                       "width": image.shape[1], "dataset": dataset, "source": item.source,
                       "subject": item.subject, "frame": -1, "label": item.label}
            if with_masks:
                example.update(self._mask_fields(item, stored.shape[:2], image.shape[:2], dropped_at_plan))
            yield item.source, example

    def _mask_fields(self, item: common.Item, stored_shape: tuple[int, int], shape: tuple[int, int],
                     dropped_at_plan: set[str]) -> dict:
        """`mask` (PNG of the class map at the record's size) and `has_mask`. A mask that cannot be built is
        dropped and recorded: the image is written without it."""
        empty = {"mask": io.BytesIO(common.encode_png(np.zeros((*shape, 1), np.uint8))), "has_mask": False}
        if item.mask is None:
            if item.source not in dropped_at_plan:
                self.without_mask.append(item.source)
            return empty
        try:
            mask, thresholded = masks.build(item.mask, stored_shape)
        except masks.MaskError as err:
            self.masks_dropped.append({"mask": err.file, "image": item.source, "reason": err.reason})
            return empty
        self.thresholded += thresholded
        mask = common.cap_side(mask[:, :, None], self.max_side, cv2.INTER_NEAREST_EXACT)
        return {"mask": io.BytesIO(common.encode_png(mask)), "has_mask": True}

    def dropped_masks(self) -> list[dict[str, str]]:
        """Every mask dropped, at the plan stage (sizes, headers) or while writing (decoding), in that order."""
        return self.plan.masks_dropped + self.masks_dropped

    def mask_warnings(self) -> list[str]:
        """Manifest warnings about the masks written: thresholded files and records without a mask (the
        dropped and resized masks have their own manifest sections)."""
        warnings = masks.thresholded_warning(self.thresholded)
        if self.without_mask:
            warnings.append(f"{len(self.without_mask)} images have no mask (stored with has_mask false, left out of "
                            f"segmentation): {sorted(self.without_mask)[:masks.MAX_LISTED]}")
        return warnings


def _part_index(version_dir: str, parts: list[str], num_mask_classes: int) -> tuple[dict[str, dict], list[int]]:
    """Reads back every part: (per part its ids, labels and has_mask in storage order, as TFDS reorders
    examples; the number of records in which each mask class occurs)."""
    reader = tfds.builder_from_directory(version_dir)
    index, occurs = {}, np.zeros(num_mask_classes, np.int64)
    for part in parts:
        source = reader.as_data_source(split=part)
        entry: dict[str, list] = {"ids": [], "labels": []}
        for i in range(len(source)):
            example = source[i]
            entry["ids"].append(example["source"].decode() if isinstance(example["source"], bytes)
                                else example["source"])
            entry["labels"].append(int(example["label"]))
            if num_mask_classes:
                entry.setdefault("has_mask", []).append(bool(example["has_mask"]))
                present = np.unique(np.asarray(example["mask"]))
                occurs[present[present < num_mask_classes]] += int(example["has_mask"])
        index[part] = entry
    return index, occurs.tolist()


def _write_json(path: str, payload: dict) -> None:
    tmp = f"{path}.tmp"
    with writing(tmp), open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)


def prepare(builder: BenchmarkBuilder, overwrite: bool = False) -> dict:
    """Converts the builder's raw folder, writes splits.json and manifest.json, and returns the manifest.

    Idempotent: a finished conversion (its manifest exists) is returned as it is unless `overwrite`; one made
    with other `conversion_options` is a ConfigError, so new options are never silently ignored.
    """
    version_dir = builder.data_dir
    manifest_path = os.path.join(version_dir, "manifest.json")
    if os.path.exists(manifest_path) and not overwrite:
        with open(manifest_path) as f:
            manifest = json.load(f)
        wanted = builder.conversion_options()
        made = {key: manifest.get("options", {}).get(key) for key in wanted}
        if made != wanted:
            raise ConfigError(f"{version_dir} was converted with {made}, not {wanted}; pass --overwrite to "
                              "convert it again")
        manifest["status"] = "already converted (pass overwrite to redo)"
        return manifest
    if os.path.exists(version_dir):
        shutil.rmtree(version_dir)
    plan = builder.plan  # parse first: a bad layout fails before anything is written
    if not plan.items:
        raise DataError(f"{plan.root}: no image to convert{_first_skip(plan.skipped)}")
    try:
        return _convert(builder, plan, version_dir, manifest_path)
    except BaseException:
        shutil.rmtree(version_dir, ignore_errors=True)
        raise


def _first_skip(skipped: list[dict[str, str]]) -> str:
    if not skipped:
        return ""
    return f" ({len(skipped)} files skipped, first: {skipped[0]['file']}: {skipped[0]['reason']})"


def _convert(builder: BenchmarkBuilder, plan: common.Plan, version_dir: str, manifest_path: str) -> dict:
    """Runs TFDS and writes splits.json and the manifest; the caller removes `version_dir` on failure."""
    start = time.time()
    try:
        with writing(version_dir):  # array_record reports a full disk as a RuntimeError: name the folder
            builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=plan.root))
    except AssertionError as err:  # TFDS refuses a split to which no example was yielded
        if "No examples were yielded" not in str(err):
            raise
        part = re.search(r'split "([^"]+)"', str(err))
        raise DataError(f"{plan.root}: no image of part {part.group(1) if part else '?'!r} could be decoded"
                        f"{_first_skip(builder.failed)}") from err
    mask_names = builder.mask_class_names()
    index, occurs = _part_index(version_dir, plan.parts(), len(mask_names or []))
    records = sum(len(p["ids"]) for p in index.values())
    converted = {i for p in index.values() for i in p["ids"]}
    accounting, not_converted = common.account(plan, converted, builder.failed)
    failed = {f["file"] for f in builder.failed}
    folds = {fold: {name: [i for i in ids if i not in failed] for name, ids in splits.items()}
             for fold, splits in plan.folds.items()}
    dropped = builder.dropped_masks()
    _write_json(os.path.join(version_dir, "splits.json"), {
        "benchmark": builder.name, "config": builder.builder_config.name if builder.builder_config else None,
        "class_names": builder.class_names(), "mask_class_names": mask_names, "default_fold": plan.default_fold,
        "folds": folds, "parts": index,
        "masks_dropped": sorted({entry["image"] for entry in dropped} & converted) if mask_names else []})
    manifest = {
        "dataset": builder.name,
        "config": builder.builder_config.name if builder.builder_config else None,
        "converter_version": CONVERTER_VERSION,
        "raw_root": os.path.abspath(plan.root),
        "licence": builder.LICENSE,
        "options": {"max_side": builder.max_side, "channels": builder.channels(), "masks": bool(mask_names),
                    **builder.conversion_options()},
        "class_names": builder.class_names(),
        "records": records,
        "counts": {
            "parts": {part: len(p["ids"]) for part, p in index.items()},
            "splits": {fold: {name: len(ids) for name, ids in splits.items()} for fold, splits in folds.items()},
            "labels": {name: int(sum(np.sum(np.asarray(p["labels"]) == c) for p in index.values()))
                       for c, name in enumerate(builder.class_names())},
        },
        "inputs": accounting["inputs"],
        "accounting": accounting,
        "skipped": plan.skipped + builder.failed,
        "not_converted": not_converted,
        "masks": None if not mask_names else {
            "class_names": mask_names,
            "records_with_mask": sum(sum(p["has_mask"]) for p in index.values()),
            "records_per_class": dict(zip(mask_names, occurs)),
            "dropped": dropped,  # {mask, image, reason}: the image is stored with has_mask false
            "resized": plan.masks_resized},  # {mask, image, from, to}: resized by nearest neighbour
        "warnings": plan.warnings + builder.mask_warnings(),
        "source_hashes": {rel: file_sha256(os.path.join(plan.root, rel)) for rel in plan.metadata_files},
        "seconds": round(time.time() - start, 2),
        "status": "converted",
    }
    clash = sorted(set(plan.extra) & set(manifest))
    if clash:
        raise RuntimeError(f"converter sections {clash} would overwrite manifest fields (a converter bug)")
    manifest.update(plan.extra)
    _write_json(manifest_path, manifest)
    for warning in manifest["warnings"]:
        log.warning("%s: %s", builder.name, warning)
    if dropped:
        log.warning("%s: %d masks dropped, their images kept without a mask (manifest masks.dropped): %s",
                    builder.name, len(dropped), [f"{e['mask']}: {e['reason']}" for e in dropped[:masks.MAX_LISTED]])
    return manifest
