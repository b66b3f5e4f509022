"""A generic labelled ultrasound set: class folders, or a `path,label[,subject,split]` CSV.

For users' own downstream tasks (fetal-heart views, thyroid nodules, ...; docs/benchmarks.md):
  * a folder with one sub-folder per class (class names sorted; images found recursively);
  * or a CSV with a header holding at least `path` and `label` (paths relative to the CSV's folder or
    absolute), optionally `subject` and `split` (train | validation | val | test).
Without a split column the converter makes subject-level stratified splits (default 70/10/20, seed 0): no
subject straddles two splits, and an empty subject makes the image its own group. With `folds` K >= 2 it makes
K subject-level, class-stratified folds instead (`common.stratified_group_folds`): round k tests on fold k and
holds out `val_fraction` of the other subjects for validation; the storage parts are then the folds, so every
image is stored once, and the rounds are folds "1".."K" (the default fold "1"). Files that look like masks
(`*_mask*`, `*_binary*`, `*_seg*`, or under a `mask(s)` / `annotations` folder) are skipped with a reason:
masks never become inputs. Without folds, the storage parts are the three splits themselves (fold "0").

Segmentation sets: masks come from a `mask` column of the CSV (paths like `path`), or from a mask folder
(`masks_dir`) holding, for the image `<relative path>.<ext>`, the file `<relative path>.<any image ext>`.
With one mask class (the default, `lesion`) a mask is binary (0/255 or 0/1); with several, its pixel values
are the classes 1..K, 0 being background (data_prep/benchmarks/masks.py). The mask is stored in the image's
record; an image without one keeps `has_mask` false, and so does one whose mask is unusable (another size,
unreadable, a class value beyond the named ones), which the manifest lists. A mask folder inside the
class-folder tree is not a class.

Class folders are walked with `data_prep.walk`: symlinked files and folders are followed, and a symlink that
cannot be (broken, looping) is skipped with that reason. A file listed twice in the CSV is converted once,
with a warning. A CSV or split value that cannot work is a `DataError` naming the file and the row.
"""

from __future__ import annotations

import csv
import os
import re

from PIL import Image

from data_prep.benchmarks import builder, common
from data_prep.benchmarks.masks import MaskSpec
from data_prep.walk import walk
from usf_mae_jax.cli import ConfigError, DataError

LAYOUT = """either  SRC/<class name>/**/*.png|jpg|jpeg|bmp|tif   (one sub-folder per class)
or      SRC.csv with a header: path,label[,subject,split,mask]"""
SPLIT_NAMES = {"train": "train", "validation": "validation", "val": "validation", "valid": "validation",
               "test": "test"}
MASK_NAME = re.compile(r"(_mask|_binary|_seg|_label)", re.IGNORECASE)
MASK_DIRS = {"mask", "masks", "annotations", "annotation", "labels", "segmentations"}


def looks_like_mask(relative: str) -> bool:
    parts = relative.replace("\\", "/").split("/")
    return bool(MASK_NAME.search(os.path.splitext(parts[-1])[0])) or any(p.lower() in MASK_DIRS for p in parts)


def _rows_from_folders(src: str, plan: common.Plan, masks_dir: str | None) -> list[dict[str, str]]:
    outside = os.path.realpath(masks_dir) if masks_dir else None
    classes = sorted(d for d in os.listdir(src) if os.path.isdir(os.path.join(src, d))
                     and os.path.realpath(os.path.join(src, d)) != outside)
    if not classes:
        raise common.LayoutError(f"{src} has no class sub-folders. Expected layout:\n{LAYOUT}")
    rows = []
    for name in classes:
        tree = walk(os.path.join(src, name))
        for why, paths in tree.left_out.items():
            for path in paths:
                plan.skip(f"{name}/{path}", f"cannot be read as a file ({why.replace('_', ' ')})")
        for path in tree.files:
            relative = f"{name}/{path}"
            if not path.lower().endswith(common.IMAGE_EXTENSIONS):
                plan.skip(relative, "not an image file")
            elif looks_like_mask(path):
                plan.skip(relative, "looks like a mask (name or folder); masks are never inputs")
            else:
                rows.append({"path": relative, "label": name, "subject": "", "split": "", "mask": ""})
    return rows


def _rows_from_csv(path: str) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        try:
            return _csv_rows(path, csv.reader(f))
        except (UnicodeDecodeError, csv.Error) as err:
            raise DataError(f"{path} is not a UTF-8 CSV file ({err})") from None


def _csv_rows(path: str, reader) -> list[dict[str, str]]:
    header = [h.strip().lower() for h in next(reader, [])]
    missing = [c for c in ("path", "label") if c not in header]
    if missing:
        raise DataError(f"{path} lacks the column(s) {missing} in its header {header}; "
                        f"expected path,label[,subject,split]")
    rows = []
    for number, values in enumerate(reader, 2):
        if not any(v.strip() for v in values):
            continue
        row = {h: v.strip() for h, v in zip(header, values)}
        if not row.get("path") or not row.get("label"):
            raise DataError(f"{path}:{number}: empty path or label in {values}")
        rows.append({"path": row["path"], "label": row["label"], "subject": row.get("subject", ""),
                     "split": row.get("split", ""), "mask": row.get("mask", "")})
    return rows


def _sorted_labels(labels: set[str]) -> list[str]:
    """Class names in numeric order when all labels are integers (0, 1, 2, ..., 10), else alphabetical."""
    if all(label.lstrip("-").isdigit() for label in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def _mask_file(row: dict[str, str], root: str, masks_dir: str | None, relative: str) -> str | None:
    """The mask file of a row: its `mask` column, or the file with the image's relative stem in `masks_dir`."""
    if row["mask"]:
        return row["mask"] if os.path.isabs(row["mask"]) else os.path.join(root, row["mask"])
    if not masks_dir:
        return None
    stem = os.path.join(masks_dir, os.path.splitext(relative)[0])
    return next((stem + ext for ext in common.IMAGE_EXTENSIONS + tuple(e.upper() for e in common.IMAGE_EXTENSIONS)
                 if os.path.isfile(stem + ext)), None)


def _mask_spec(path: str | None, root: str, mask_classes: tuple[str, ...], plan: common.Plan) -> MaskSpec | None:
    if path is None or not os.path.isfile(path):
        return None
    relative = os.path.relpath(path, root)
    if not relative.startswith(".."):
        plan.mask_files.append(relative)
    shown = path if relative.startswith("..") else relative
    if len(mask_classes) == 1:
        return MaskSpec("binary", shown, path=path)
    return MaskSpec("index", shown, path=path, max_value=len(mask_classes))


def parse(src: str, val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0,
          masks_dir: str | None = None, mask_classes: tuple[str, ...] = ("lesion",), folds: int = 0) -> common.Plan:
    if not os.path.exists(src):
        raise common.LayoutError(f"{src} does not exist. Expected layout:\n{LAYOUT}")
    if masks_dir and not os.path.isdir(masks_dir):
        raise common.LayoutError(f"the mask folder {masks_dir} does not exist")
    is_csv = os.path.isfile(src)
    root = os.path.dirname(os.path.abspath(src)) if is_csv else src
    plan = common.Plan(root=root, class_names=[], items=[], folds={}, default_fold="0",
                       metadata_files=[os.path.basename(src)] if is_csv else [], walk_root=not is_csv)
    rows = _rows_from_csv(src) if is_csv else _rows_from_folders(src, plan, masks_dir)
    if not rows:
        raise common.LayoutError(f"{src} lists no images. Expected layout:\n{LAYOUT}")
    plan.class_names = _sorted_labels({r["label"] for r in rows})
    plan.extra["mask_column"] = any(r["mask"] for r in rows)  # masks named, wherever they live
    with_split = [r for r in rows if r["split"]]
    if with_split and len(with_split) != len(rows):
        raise DataError(f"{src}: the split column is filled for {len(with_split)} of {len(rows)} rows; "
                         f"fill it for all rows or for none")
    seen = set()
    for row in rows:
        full = row["path"] if os.path.isabs(row["path"]) else os.path.join(root, row["path"])
        relative = os.path.relpath(full, root)
        split = row["split"].lower()
        if split and split not in SPLIT_NAMES:
            raise DataError(f"{src}: split {row['split']!r} of {row['path']} is not one of {sorted(SPLIT_NAMES)}")
        if relative in seen:
            plan.warnings.append(f"{relative} is listed twice in {src}; the first row is used")
            continue
        if not os.path.isfile(full):
            plan.skip(relative, "listed, but a broken symlink" if os.path.islink(full) else "listed but missing")
            continue
        if is_csv and looks_like_mask(relative):
            plan.skip(relative, "looks like a mask (name or folder); masks are never inputs")
            continue
        seen.add(relative)
        mask = _mask_spec(_mask_file(row, root, masks_dir, relative), root, mask_classes, plan)
        plan.items.append(common.Item(path=full, source=relative, label=plan.class_names.index(row["label"]),
                                      subject=row["subject"], part=SPLIT_NAMES[split] if split else "", mask=mask))
    if folds:
        if with_split:
            raise ConfigError(f"{src} has a split column; --folds makes its own folds: drop one of them")
        _assign_folds(plan, folds, val_fraction, seed)
        return plan
    if not with_split:
        _assign_splits(plan, val_fraction, test_fraction, seed)
    plan.folds["0"] = {name: [i.source for i in plan.items if i.part == name]
                       for name in ("train", "validation", "test")}
    return plan


def _assign_folds(plan: common.Plan, folds: int, val_fraction: float, seed: int) -> None:
    """K subject-level, class-stratified folds; round k: test fold k, validation a held-out share of the rest."""
    if folds < 2 or len({i.subject or i.source for i in plan.items}) < folds:
        raise ConfigError(f"--folds {folds}: needs at least 2 folds and as many subjects as folds")
    items = plan.items
    assignment = common.stratified_group_folds([i.source for i in items], [i.label for i in items],
                                               [i.subject for i in items], folds, seed)
    for item, fold in zip(items, assignment):
        item.part = f"fold{fold}"
    for k in range(1, folds + 1):
        rest = [i for i in items if i.part != f"fold{k}"]
        train, validation = common.stratified_holdout([i.source for i in rest], [i.label for i in rest],
                                                      [i.subject for i in rest], val_fraction, [seed, k])
        plan.folds[str(k)] = {"train": train, "validation": validation,
                              "test": [i.source for i in items if i.part == f"fold{k}"]}
    plan.default_fold = "1"
    plan.extra["split_protocol"] = {"folds": folds, "seed": seed, "level": "subject (an empty subject: the image)",
                                   "stratified_by": "class", "validation_fraction": val_fraction}


def _assign_splits(plan: common.Plan, val_fraction: float, test_fraction: float, seed: int) -> None:
    """Subject-level stratified train/validation/test, by two nested hold-outs."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ConfigError(f"split fractions must be in [0, 1) and sum below 1, got val {val_fraction}, "
                         f"test {test_fraction}")
    items = plan.items
    rest, test = common.stratified_holdout([i.source for i in items], [i.label for i in items],
                                           [i.subject for i in items], test_fraction, seed)
    remaining = [i for i in items if i.source in set(rest)]
    relative_val = val_fraction / (1.0 - test_fraction)
    _, val = common.stratified_holdout([i.source for i in remaining], [i.label for i in remaining],
                                       [i.subject for i in remaining], relative_val, seed + 1)
    test_set, val_set = set(test), set(val)
    for item in items:
        item.part = "test" if item.source in test_set else "validation" if item.source in val_set else "train"


def grayscale_only(plan: common.Plan) -> bool:
    """True when every image is stored grayscale (read from the file headers only, so it is cheap).

    A file whose header PIL cannot read is left to the decoder, which reports it as skipped.
    """
    for item in plan.items:
        try:
            with Image.open(item.path) as image:
                mode = image.mode
        except (OSError, SyntaxError, ValueError):
            continue
        if mode not in ("1", "L", "I", "I;16", "I;16B", "I;16L", "F", "LA"):
            return False
    return True


class Labelled(builder.BenchmarkBuilder):
    """A user's labelled ultrasound images; classes and channels come from the data."""

    name = "labelled"
    LICENSE = "the licence of the user's data"
    DESCRIPTION = "A generic labelled image set (class folders or a path,label[,subject,split] CSV)."
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"Pass the class folder or the CSV as --src. Expected layout:\n{LAYOUT}"

    def __init__(self, *, raw_dir: str | None = None, dataset: str | None = None, val_fraction: float = 0.1,
                 test_fraction: float = 0.2, seed: int = 0, masks_dir: str | None = None,
                 mask_classes: tuple[str, ...] = ("lesion",), folds: int = 0, **kwargs):
        if not mask_classes or len(set(mask_classes)) != len(mask_classes) or "background" in mask_classes:
            raise ConfigError(f"mask classes must be distinct names other than 'background', got {mask_classes}")
        self.split_options = dict(val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
                                  masks_dir=masks_dir, mask_classes=tuple(mask_classes), folds=int(folds))
        self.dataset = dataset or (os.path.splitext(os.path.basename(os.path.normpath(raw_dir)))[0]
                                   if raw_dir else "labelled")
        self._channels: int | None = None
        super().__init__(raw_dir=raw_dir, **kwargs)

    def parse(self, raw_dir: str) -> common.Plan:
        return parse(raw_dir, **self.split_options)

    def dataset_name(self) -> str:
        return self.dataset

    def class_names(self) -> list[str]:
        return self.plan.class_names if self.raw_dir else []

    def mask_class_names(self) -> list[str] | None:
        """background + the mask classes when a mask folder is given or the CSV names masks (even if every one
        was dropped as unusable), else None."""
        if not self.raw_dir or not (self.split_options["masks_dir"] or self.plan.mask_files
                                    or self.plan.extra.get("mask_column")):
            return None
        return ["background", *self.split_options["mask_classes"]]

    def channels(self) -> int:
        if self._channels is None:
            self._channels = 1 if not self.raw_dir or grayscale_only(self.plan) else 3
        return self._channels

    def conversion_options(self) -> dict:
        options = self.split_options
        return {**super().conversion_options(), "folds": options["folds"], "seed": options["seed"],
                "val_fraction": options["val_fraction"], "test_fraction": options["test_fraction"]}
