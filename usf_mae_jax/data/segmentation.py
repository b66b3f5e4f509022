"""Segmentation data in host memory: benchmark splits with their masks, joint augmentation, and predictions
scored at each mask's own resolution.

* **Splits** (`load_segmentation`). As `downstream.load_benchmark`, plus each record's mask, a uint8 class map
  at the record's stored size (0 = background; data_prep/benchmarks/masks.py). Records without a mask
  (`has_mask` false) are left out with a warning that counts them per split and tells the images whose dataset
  lacks the mask from those whose mask file the converter dropped as unusable (listed in the manifest's
  `masks.dropped`); the counts are kept in `SegmentationData.left_out`. Classification keeps all of them.
  `classes="binary"` folds every foreground class into one (MMOTU-2D's binary task, GIST514-DB's
  lesion-versus-background).
* **Training pairs** (`make_train_transform`): `fn(image, mask, rng) -> (image, mask)` at the model's size.
  Geometric ops are applied identically to both, the image interpolated bilinearly and the mask by nearest
  neighbour so that it keeps its class values; photometric ops touch the image only (docs/segmentation.md):
    1. nearest resize of both to (size, size), the evaluation transform of the image (`augment.resize_nearest`);
    2. rotation by an angle uniform in [-rotation_degrees, rotation_degrees] about the centre, zero fill
       (black for the image, background for the mask);
    3. RandomResizedCrop with area scale (crop_scale_min, 1) and ratio (3/4, 4/3) back to (size, size)
       (`augment.random_resized_crop_box`, torchvision's draw);
    4. horizontal flip with probability 0.5;
    5. contrast and brightness jitter, x * a + 255 * b with a uniform in 1 +- contrast and b in +- brightness.
  Every draw comes from the generator passed in, seeded by (seed, epoch, record) in `EpochBatches`, so a batch
  is a pure function of the step and a resumed run sees the same pairs.
* **Evaluation** (`predict_split`): images go through the evaluation transform (nearest resize to the
  model's size); the model's logits come back at its head's resolution and are resized bilinearly (half-pixel
  centres, as `align_corners=False`) to each mask's stored size, where their argmax is scored. The logits are
  resized, never the ground truth.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import cv2
import numpy as np
from jax.sharding import Mesh

from usf_mae_jax.cli import ConfigError, DataError, MissingInputError
from usf_mae_jax.data import augment, benchmarks, downstream

log = logging.getLogger(__name__)

CLASS_MODES = ("all", "binary")
AUGMENTS = ("joint", "none")
PREDICT_CHUNK = 256  # images per inference chunk: bounds the host memory held by head-resolution logits

Transform = Callable[[np.ndarray, np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]


@dataclasses.dataclass
class MaskedSplit(downstream.SplitData):
    """A split with its masks: `masks[i]` is a uint8 (H, W) class map the size of `images[i]`."""

    masks: list[np.ndarray] = dataclasses.field(default_factory=list)

    def subset(self, start: int, stop: int) -> MaskedSplit:
        return MaskedSplit(self.name, self.images[start:stop], self.labels[start:stop], self.ids[start:stop],
                           self.masks[start:stop])


def label_subset(split: MaskedSplit, fraction: float, seed: int) -> MaskedSplit:
    """A label budget of a segmentation split: the images `downstream.label_subset` keeps (stratified by the
    image's class label, seeded), each with its own mask; `fraction` 1 returns the split unchanged."""
    chosen = downstream.label_subset(split, fraction, seed)
    if chosen is split:
        return split
    row = {record_id: i for i, record_id in enumerate(split.ids)}
    return MaskedSplit(split.name, chosen.images, chosen.labels, chosen.ids, [split.masks[row[i]] for i in chosen.ids])


@dataclasses.dataclass
class SegmentationData(downstream.BenchmarkData):
    """A benchmark's splits with masks; `mask_class_names` starts with the background."""

    mask_class_names: list[str] = dataclasses.field(default_factory=list)
    # per split, the records left out: {"no_mask": dataset lacks it, "mask_dropped": the converter dropped it}
    left_out: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)


def _check_data_dir(data_dir: str, benchmark: str) -> None:
    if not data_dir:
        raise ConfigError(f"input.data_dir is empty: point it at the --out_dir of `python -m data_prep {benchmark} "
                          "...`")
    if not os.path.isdir(data_dir):
        raise MissingInputError(f"input.data_dir {data_dir} is not a directory")


def load_segmentation(data_dir: str, benchmark: str, fold: int | None = None, subset: str | None = None,
                      classes: str = "all") -> SegmentationData:
    """The train / validation / test splits of a conversion with masks, in host memory (module docstring)."""
    if classes not in CLASS_MODES:
        raise ConfigError(f"classes must be one of {CLASS_MODES}, got {classes!r}")
    _check_data_dir(data_dir, benchmark)
    version_dir = benchmarks.find_version_dir(data_dir, benchmark, subset)
    names = benchmarks.mask_class_names(version_dir, benchmark)
    with open(os.path.join(version_dir, "manifest.json")) as f:
        manifest = json.load(f)
    if names is None:
        raise DataError(f"{version_dir} was converted without masks (converter {manifest.get('converter_version')}); "
                        f"convert it again with `python -m data_prep {benchmark} ... --overwrite` (1.1.0 or later)")
    if classes == "binary" and len(names) > 2:
        names = ["background", "foreground"]
    splits, left_out = {}, {}
    for split in downstream.SPLITS:
        source = benchmarks.load_split(version_dir, benchmark, split, fold=fold)
        kept = np.flatnonzero(source.has_mask)
        dropped = int(np.sum(source.mask_dropped & ~source.has_mask))
        left_out[split] = {"no_mask": len(source) - len(kept) - dropped, "mask_dropped": dropped}
        if len(kept) < len(source):
            log.warning("%s %s: %d of %d records are left out of segmentation: %d whose dataset has no mask, %d "
                        "whose mask the converter dropped as unusable (manifest.json, masks.dropped)", version_dir,
                        split, len(source) - len(kept), len(source), left_out[split]["no_mask"], dropped)
        if len(kept) == 0:
            raise DataError(f"{version_dir}: the {split} split of fold {fold} has no record with a mask")
        items = [source[int(i)] for i in kept]
        masks = [np.minimum(item["mask"], 1) if classes == "binary" else item["mask"] for item in items]
        splits[split] = MaskedSplit(split, [item["image"] for item in items],
                                    np.asarray([item["label"] for item in items], np.int64),
                                    [item["id"] for item in items], masks)
    overlap = set(splits["test"].ids) & (set(splits["train"].ids) | set(splits["validation"].ids))
    if overlap:
        raise DataError(f"{version_dir}: test records also in train/validation, e.g. {sorted(overlap)[:3]}")
    log.info("%s fold %s: %s images with masks; mask classes %s", benchmark, fold,
             {k: len(v) for k, v in splits.items()}, names)
    return SegmentationData(benchmark, fold, subset, version_dir, benchmarks.class_names(version_dir, benchmark),
                            int(manifest.get("options", {}).get("channels", 1)), splits, names, left_out)


# ------------------------------------------------------------------------------------- joint augmentation


def _keep_channels(result: np.ndarray, like: np.ndarray) -> np.ndarray:
    return result[:, :, None] if like.ndim == 3 and result.ndim == 2 else result


def rotate_pair(image: np.ndarray, mask: np.ndarray, degrees: float) -> tuple[np.ndarray, np.ndarray]:
    """Counter-clockwise rotation about the centre, same canvas, zero fill: image bilinear, mask nearest."""
    height, width = mask.shape
    matrix = cv2.getRotationMatrix2D(((width - 1) / 2, (height - 1) / 2), degrees, 1.0)
    rotated = _keep_channels(cv2.warpAffine(image, matrix, (width, height), flags=cv2.INTER_LINEAR,
                                            borderMode=cv2.BORDER_CONSTANT, borderValue=0), image)
    return rotated, cv2.warpAffine(mask, matrix, (width, height), flags=cv2.INTER_NEAREST,
                                   borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def crop_pair(image: np.ndarray, mask: np.ndarray, box: augment.Box, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The same crop box of both, resized to (size, size): image bilinear (area when shrinking), mask nearest."""
    top, left, h, w = box
    crop = np.ascontiguousarray(mask[top:top + h, left:left + w])
    if (h, w) != (size, size):
        crop = cv2.resize(crop, (size, size), interpolation=cv2.INTER_NEAREST_EXACT)
    return augment.resized_crop(image, box, size, "bilinear"), crop


def make_train_transform(input_cfg: Any, size: int) -> Transform:
    """`fn(image (H, W, C), mask (H, W), rng) -> (image (size, size, C), mask (size, size))` (module doc)."""
    if input_cfg.augment not in AUGMENTS:
        raise ConfigError(f"input.augment for segmentation is one of {AUGMENTS}, got {input_cfg.augment!r}")
    scale_min = float(input_cfg.crop_scale_min)
    if not 0.0 < scale_min <= 1.0:
        raise ConfigError(f"input.crop_scale_min must lie in (0, 1], got {scale_min}")
    degrees, contrast, brightness = (float(input_cfg[k]) for k in ("rotation_degrees", "contrast", "brightness"))
    if degrees < 0 or not 0 <= contrast < 1 or not 0 <= brightness < 1:
        raise ConfigError("input.rotation_degrees must be >= 0 and input.contrast / input.brightness in [0, 1), "
                          f"got {degrees}, {contrast}, {brightness}")

    def transform(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        image, mask = augment.resize_nearest(image, size), augment.resize_nearest(mask, size)
        if input_cfg.augment == "none":
            return image, mask
        if degrees:
            image, mask = rotate_pair(image, mask, rng.uniform(-degrees, degrees))
        box = augment.random_resized_crop_box(size, size, (scale_min, 1.0), augment.CROP_RATIO, rng)
        image, mask = crop_pair(image, mask, box, size)
        if rng.random() < 0.5:
            image, mask = augment.hflip(image), augment.hflip(mask)
        gain, offset = rng.uniform(1 - contrast, 1 + contrast), rng.uniform(-brightness, brightness) * 255
        image = np.clip(image.astype(np.float32) * gain + offset, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(image), np.ascontiguousarray(mask)

    return transform


def augmented_pairs(split: MaskedSplit, indices: np.ndarray, transform: Transform, seed: int, epoch: int,
                    pool: ThreadPoolExecutor) -> dict[str, np.ndarray]:
    """{"image": uint8 (B, S, S, C), "mask": int32 (B, S, S)}, each pair seeded by (seed, epoch, index)."""
    def one(i: int) -> tuple[np.ndarray, np.ndarray]:
        image, mask = transform(split.images[int(i)], split.masks[int(i)], np.random.default_rng([seed, epoch, int(i)]))
        return (image[:, :, None] if image.ndim == 2 else image), mask
    pairs = list(pool.map(one, indices))
    return {"image": np.stack([p[0] for p in pairs]), "mask": np.stack([p[1] for p in pairs]).astype(np.int32)}


# ------------------------------------------------------------------------------------------- evaluation


def resize_logits(logits: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(h, w, C) float logits -> (H, W, C), bilinear with half-pixel centres (torch's align_corners=False)."""
    if logits.shape[:2] == tuple(shape):
        return logits
    resized = cv2.resize(np.ascontiguousarray(logits, np.float32), (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
    return resized[:, :, None] if resized.ndim == 2 else resized


def predict_split(logits_fn: Callable, split: MaskedSplit, size: int, mesh: Mesh, batch_size: int,
                  pool: ThreadPoolExecutor) -> list[np.ndarray]:
    """uint8 class maps of a split, each at its mask's size: `logits_fn(global uint8 images) -> (B, h, w, C)`
    runs on the evaluation transform's images, its logits are resized to the mask and argmaxed."""
    predictions = []
    for start in range(0, len(split), PREDICT_CHUNK):
        chunk = split.subset(start, start + PREDICT_CHUNK)
        logits = downstream.map_split(logits_fn, chunk, size, mesh, batch_size, pool)
        predictions += [resize_logits(one, mask.shape).argmax(axis=-1).astype(np.uint8)
                        for one, mask in zip(logits, chunk.masks)]
    return predictions
