"""Shared pieces of the benchmark converters: layout discovery, the conversion plan, image loading, splits.

A converter parses a raw dataset folder into a `Plan`: every image to convert (`Item`), the disjoint storage
parts they are written to, and the official splits as lists of record ids. The TFDS builder (`builder.py`)
then only encodes what the plan lists. Parsing never guesses: a missing expected file raises `LayoutError`
with the expected layout, a malformed label or split file a `DataError` naming it, and anything skipped or
unexpected goes into the plan's `skipped` / `warnings`, which end up in the manifest.

Datasets with segmentation masks give each item a `masks.MaskSpec` and the plan its mask class names; the
builder stores the mask in the image's record (data_prep/benchmarks/masks.py). `check_masks` runs on every
plan before anything is written: it compares each mask with its image from the file headers and drops (or,
on request, marks for resizing) the masks that do not fit, listing each in `masks_dropped` / `masks_resized`,
so one odd mask file never aborts a conversion and is known before the slow work starts.

`account` checks that nothing vanished: every file under the dataset root (found by `data_prep.walk`, which
follows symlinks and reports the ones it cannot) is converted, skipped with a reason, or listed in
`not_converted` by category (`metadata` label files, `mask` files stored in their image's record, other
non-inputs, broken symlinks).
"""

from __future__ import annotations

import dataclasses
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence

import cv2
import numpy as np

from data_prep.benchmarks import masks
from data_prep.benchmarks.masks import MaskSpec
from data_prep.formats.image2d import check_pixel_count
from data_prep.walk import walk
from usf_mae_jax.cli import DataError, MissingInputError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class LayoutError(MissingInputError):
    """A raw dataset folder does not have the documented layout (a `FileNotFoundError` too)."""


@dataclasses.dataclass
class Item:
    """One image to convert. `source` (the path relative to the dataset root) is also the record id."""

    path: str
    source: str
    label: int
    subject: str
    part: str
    mask: MaskSpec | None = None  # how to build its mask, for datasets with masks


@dataclasses.dataclass
class Plan:
    """What a converter found in a raw folder; see the module docstring."""

    root: str
    class_names: list[str]
    items: list[Item]
    folds: dict[str, dict[str, list[str]]]
    default_fold: str
    metadata_files: list[str]
    skipped: list[dict[str, str]] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)
    walk_root: bool = True  # False when the inputs are the rows of a list (a CSV), not the files under root
    mask_files: list[str] = dataclasses.field(default_factory=list)  # relative paths read as masks
    masks_dropped: list[dict[str, str]] = dataclasses.field(default_factory=list)  # {mask, image, reason}
    masks_resized: list[dict[str, str]] = dataclasses.field(default_factory=list)  # {mask, image, from, to}
    extra: dict = dataclasses.field(default_factory=dict)  # converter-specific manifest sections (BUSI's duplicates)

    def skip(self, file: str, reason: str) -> None:
        self.skipped.append({"file": file, "reason": reason})

    def parts(self) -> list[str]:
        return sorted({item.part for item in self.items})


def find_root(raw_dir: str, marker: str, folder_name: str, layout: str) -> str:
    """The dataset root: `raw_dir` itself, `raw_dir/folder_name`, or a single sub-folder holding `marker`.

    Users point at either the extracted folder or its parent. Raises LayoutError naming the missing marker and
    showing the expected layout.
    """
    if not os.path.isdir(raw_dir):
        raise LayoutError(f"{raw_dir} is not a directory. Expected layout:\n{layout}")
    candidates = [raw_dir, os.path.join(raw_dir, folder_name)]
    candidates += sorted(os.path.join(raw_dir, d) for d in os.listdir(raw_dir)
                         if os.path.isdir(os.path.join(raw_dir, d)))
    for candidate in candidates:
        if os.path.exists(os.path.join(candidate, marker)):
            return candidate
    raise LayoutError(f"{os.path.join(raw_dir, marker)} not found (nor {folder_name}/{marker} below it): "
                      f"point --raw_dir at the extracted {folder_name} folder or its parent. "
                      f"Expected layout:\n{layout}")


def require(root: str, relative: str, layout: str) -> str:
    """The path of an expected file or folder under `root`, or a LayoutError naming it."""
    path = os.path.join(root, relative)
    if not os.path.exists(path):
        raise LayoutError(f"expected {relative} under {root}, but {path} is missing. Expected layout:\n{layout}")
    return path


def read_lines(path: str) -> list[str]:
    """The lines of a text list file (UTF-8, BOM allowed); a file in another encoding is a DataError."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.readlines()
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not a UTF-8 text file ({err})") from None


def case_insensitive_index(folder: str) -> dict[str, str]:
    """Maps lower-cased file names in `folder` to the names on disk (lists say 1.JPG, disks may say 1.jpg)."""
    return {name.lower(): name for name in os.listdir(folder)}


def read_image(path: str, channels: int, max_side: int | None) -> np.ndarray:
    """Reads an image as uint8 HWC with `channels` (1 or 3) channels, longest side capped at `max_side`.

    16-bit images are scaled to 8 bits; an alpha channel is dropped; colour is returned as RGB. A colour image
    whose channels are all equal becomes 1-channel without loss; a real colour image asked for 1 channel is
    converted to luminance. Raises ValueError naming the file when it cannot be decoded, or when its header
    announces more than `formats.image2d.MAX_PIXELS` pixels (checked before decoding).
    """
    return convert_channels(cap_side(decode_image(path), max_side), channels)


def decode_image(path: str) -> np.ndarray:
    """The image at its stored size, uint8 HWC with 1 or 3 (RGB) channels (see `read_image`)."""
    check_pixel_count(path)
    image = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ValueError(f"cannot decode image {path}")
    if image.dtype == np.uint16:
        image = (image // 257).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ValueError(f"unsupported pixel type {image.dtype} in {path}")
    if image.ndim == 2:
        return image[:, :, None]
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    if image.shape[2] == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return image


def cap_side(image: np.ndarray, max_side: int | None, interpolation: int = cv2.INTER_AREA) -> np.ndarray:
    """Shrinks an HWC image so that its longest side is at most `max_side` (a mask: INTER_NEAREST_EXACT)."""
    if not max_side or max(image.shape[:2]) <= max_side:
        return image
    scale = max_side / max(image.shape[:2])
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    resized = cv2.resize(image, size, interpolation=interpolation)
    return resized if resized.ndim == 3 else resized[:, :, None]


def convert_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """An HWC uint8 image with 1 or 3 channels as `channels` channels (gray replicated, or luminance)."""
    if channels == 3 and image.shape[2] == 1:
        return np.repeat(image, 3, axis=2)
    if channels == 1 and image.shape[2] == 3:
        if (image[:, :, :1] == image).all():
            return np.ascontiguousarray(image[:, :, :1])
        return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)[:, :, None]
    return image


def encode_png(image: np.ndarray) -> bytes:
    """Lossless PNG bytes of a uint8 HWC image with 1 or 3 (RGB) channels."""
    pixels = image[:, :, 0] if image.shape[2] == 1 else cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, buffer = cv2.imencode(".png", pixels)
    if not ok:
        raise ValueError(f"PNG encoding failed for an image of shape {image.shape}")
    return buffer.tobytes()


def check_masks(plan: Plan, resize: bool) -> None:
    """The plan stage's mask check, from file headers only (module docstring).

    An item whose mask files (or declared polygon size) differ in size from its image, or whose mask header
    cannot be read, loses its mask (`has_mask` false; the image stays in classification) and each such file
    goes into `plan.masks_dropped`. With `resize`, a mask that is readable and only of another size is kept,
    marked to be resized by nearest neighbour, and listed in `plan.masks_resized`. An image whose own header
    cannot be read is left to the decoder, which skips it with its reason.
    """
    for item in plan.items:
        if item.mask is None:
            continue
        try:
            shape = masks.header_shape(item.path)
        except masks.READ_ERRORS:
            continue
        quirks = masks.check(item.mask, shape)
        if not quirks:
            continue
        if resize and all(q.shape for q in quirks):
            item.mask = dataclasses.replace(item.mask, resize=True)
            plan.masks_resized += [{"mask": q.file, "image": item.source, "from": masks.shape_text(q.shape),
                                    "to": masks.shape_text(shape)} for q in quirks]
        else:
            item.mask = None
            plan.masks_dropped += [{"mask": q.file, "image": item.source, "reason": q.reason} for q in quirks]


def stratified_folds(ids: Sequence[str], labels: Sequence[int], folds: int, seed: int) -> list[int]:
    """The fold (1..`folds`) of each id: every class is shuffled and dealt round the folds, each class starting
    where the previous one stopped, so each fold holds about 1/`folds` of every class and the fold sizes
    differ by at most one. Deterministic for a seed, whatever the order of `ids`."""
    by_class: dict[int, list[str]] = defaultdict(list)
    for image_id, label in zip(ids, labels):
        by_class[int(label)].append(image_id)
    rng = np.random.default_rng([seed, folds])
    fold_of: dict[str, int] = {}
    dealt = 0
    for label in sorted(by_class):
        members = sorted(by_class[label])
        rng.shuffle(members)
        for image_id in members:
            fold_of[image_id] = dealt % folds + 1
            dealt += 1
    return [fold_of[i] for i in ids]


def stratified_group_folds(ids: Sequence[str], labels: Sequence[int], groups: Sequence[str], folds: int,
                           seed: int) -> list[int]:
    """The fold (1..`folds`) of each id, with whole groups (subjects) dealt as `stratified_folds` deals images:
    a group counts for the class of the majority of its images, and an empty group id is the image alone."""
    members: dict[str, list[int]] = defaultdict(list)
    for i, group in enumerate(groups):
        members[group or f"\0{ids[i]}"].append(i)
    names = sorted(members)
    majority = [int(np.bincount([labels[i] for i in members[g]]).argmax()) for g in names]
    fold_of_group = dict(zip(names, stratified_folds(names, majority, folds, seed)))
    fold_of = {}
    for group, indices in members.items():
        for i in indices:
            fold_of[i] = fold_of_group[group]
    return [fold_of[i] for i in range(len(ids))]


def stratified_holdout(ids: Sequence[str], labels: Sequence[int], groups: Sequence[str], fraction: float,
                       seed: int | Sequence[int]) -> tuple[list[str], list[str]]:
    """Splits `ids` into (kept, held out) with about `fraction` of each class's groups held out.

    Groups (subjects) never straddle the two parts; an empty group id makes the image its own group. A group
    counts for the class of the majority of its images. Each class with at least two groups contributes at
    least one held-out group, so a small class is still represented. Deterministic for a seed.
    """
    members: dict[str, list[int]] = defaultdict(list)
    for i, group in enumerate(groups):
        members[group or f"\0{ids[i]}"].append(i)
    by_class: dict[int, list[str]] = defaultdict(list)
    for group, indices in members.items():
        by_class[int(np.bincount([labels[i] for i in indices]).argmax())].append(group)
    rng = np.random.default_rng(seed)
    held: set[str] = set()
    for label in sorted(by_class):
        class_groups = sorted(by_class[label])
        rng.shuffle(class_groups)
        count = round(fraction * len(class_groups))
        if fraction > 0 and len(class_groups) >= 2:
            count = max(count, 1)
        held.update(class_groups[:count])
    held_ids = {ids[i] for group in held for i in members[group]}
    return [i for i in ids if i not in held_ids], [i for i in ids if i in held_ids]


def count_warnings(what: str, found: dict, documented: dict) -> list[str]:
    """One warning per key whose count differs from the documented total (dataset papers and files)."""
    return [f"{what} {key}: found {found.get(key, 0)}, documented {value}"
            for key, value in documented.items() if found.get(key, 0) != value]


def unlisted_images(folder: str, listed: Iterable[str], relative_to: str, plan: Plan, list_name: str) -> None:
    """Records every image file in `folder` that the label files do not list, so none is dropped silently."""
    listed_lower = {name.lower() for name in listed}
    for name in sorted(os.listdir(folder)):
        if name.lower().endswith(IMAGE_EXTENSIONS) and name.lower() not in listed_lower:
            plan.skip(os.path.relpath(os.path.join(folder, name), relative_to), f"not listed in {list_name}")


def account(plan: Plan, converted: set[str], failed: list[dict[str, str]]) -> tuple[dict, dict[str, list[str]]]:
    """(accounting, not_converted) of a finished conversion; see the module docstring.

    `converted` holds the record ids written, `failed` the items the writer could not decode. Accounting is
    {inputs, converted, skipped, not_converted} with inputs = converted + skipped + not_converted; `skipped`
    counts the distinct files named in the plan's `skipped` and in `failed` (a listed file missing on disk
    included). A file both converted and skipped is a converter bug and raises RuntimeError.
    """
    skipped = {entry["file"] for entry in plan.skipped + failed}
    both = sorted(converted & skipped)
    if both:
        raise RuntimeError(f"files both converted and skipped (a converter bug): {both[:5]}")
    not_converted: dict[str, list[str]] = {}
    metadata, mask_files = set(plan.metadata_files), set(plan.mask_files)
    if plan.walk_root:
        tree = walk(plan.root)
        for relative in tree.files:
            if relative not in converted and relative not in skipped:
                why = "metadata" if relative in metadata else "mask" if relative in mask_files else "not_an_input"
                not_converted.setdefault(why, []).append(relative)
        for why, paths in tree.left_out.items():
            paths = [p for p in paths if p not in skipped]
            if paths:
                not_converted[why] = paths
    elif metadata:
        not_converted["metadata"] = sorted(metadata)
    count = sum(len(paths) for paths in not_converted.values())
    accounting = {"inputs": len(converted) + len(skipped) + count, "converted": len(converted),
                  "skipped": len(skipped), "not_converted": count}
    return accounting, dict(sorted(not_converted.items()))
