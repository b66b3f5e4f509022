"""GIST514-DB: endoscopic ultrasound, GIST vs leiomyoma, with the five official COCO split files.

Layout and facts from `docs/benchmarks.md` (the dataset's own COCO files):
  * two subsets, builder configs `roi` (lesion crops, `usd514_jpeg_roi`, files `*_anno_crop_split_{k}.json`)
    and `raw` (full frames, `usd514_jpeg_raw`, files `*_anno_split_{k}.json`);
  * the categories are looked up by *name* in each file's `categories` (`lmym` = 0, `GIST` = 1, the
    positive class), never by a hard-coded id; an image's label is the category of its annotations;
  * the five `val_*` files are disjoint test sets covering all 514 images. They are the storage parts
    (`split0`..`split4`); round k tests on `val_k` and trains on `train_k`, of which a stratified 5% is held
    out for validation (seed 0, as UltraSam's setup); `train_full` keeps the whole `train_k`;
  * each annotation's polygon `segmentation` is rasterised into the image's record (`masks.rasterise`, the
    pixel-centre rule) with the class value of its category + 1 (lmym 1, GIST 2; the binary lesion mask is
    `mask > 0`). An image of another size than its COCO entry declares keeps no mask (listed in the
    manifest's `masks.dropped`; with `resize_mismatched_masks` its polygons are scaled to the image instead,
    masks.py). An image keeps the annotations of the first file that lists it (its test split's `val` file
    when it has one).
Whether the splits are patient-level is not documented, and no patient id is released: `subject` is empty.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from typing import ClassVar

import tensorflow_datasets as tfds

from data_prep.benchmarks import builder, common
from data_prep.benchmarks.masks import MaskSpec
from usf_mae_jax.cli import ConfigError, DataError

SUBSETS = {"roi": ("usd514_jpeg_roi", "anno_crop_split"), "raw": ("usd514_jpeg_raw", "anno_split")}
CLASS_NAMES = ("lmym", "GIST")
NUM_SPLITS = 5
DOCUMENTED = {"images": 514, "lmym": 251, "GIST": 263}
DOCUMENTED_TEST_SIZES = {"split0": 106, "split1": 103, "split2": 103, "split3": 103, "split4": 99}
VALIDATION_FRACTION = 0.05  # UltraSam's setup: 5% of the training part (docs/benchmarks.md)
VALIDATION_SEED = 0


def layout(subset: str) -> str:
    folder, stem = SUBSETS[subset]
    return (f"{folder}/\n  images/        *.jpg\n  annotations/   train_{stem}_{{0..4}}.json, "
            f"val_{stem}_{{0..4}}.json   (COCO: images, annotations, categories)")


@dataclasses.dataclass(frozen=True)
class Annotated:
    """One COCO image: its label, the size its entry declares, and its polygons as (class value, flat xy)."""

    label: int
    height: int
    width: int
    polygons: tuple


def _polygons(ann: dict, value: int, path: str) -> list[tuple[int, tuple[float, ...]]]:
    segmentation = ann.get("segmentation") or []
    if not isinstance(segmentation, list) or not all(isinstance(p, list) for p in segmentation):
        raise DataError(f"{path}: annotation {ann.get('id')} has a non-polygon segmentation (RLE?); only polygon "
                        "lists are supported")
    return [(value, tuple(float(v) for v in polygon)) for polygon in segmentation]


def read_coco(path: str) -> dict[str, Annotated]:
    """Maps each image's file name to its label and polygons, with the categories found by name in this file."""
    with open(path, encoding="utf-8") as f:
        try:
            coco = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(f"{path} is not valid JSON: {err}") from None
    for key in ("images", "annotations", "categories"):
        if key not in coco:
            raise DataError(f"{path} is not a COCO file: it lacks '{key}'")
    by_name = {str(c["name"]).strip().lower(): c["id"] for c in coco["categories"]}
    missing = [n for n in CLASS_NAMES if n.lower() not in by_name]
    if missing:
        raise DataError(f"{path}: categories {missing} not found; the file has "
                         f"{[c['name'] for c in coco['categories']]}")
    label_of_category = {by_name[n.lower()]: i for i, n in enumerate(CLASS_NAMES)}
    labels_of_image: dict[int, set[int]] = {}
    polygons_of_image: dict[int, list] = {}
    for ann in coco["annotations"]:
        if ann["category_id"] not in label_of_category:
            raise DataError(f"{path}: annotation {ann.get('id')} has unknown category_id {ann['category_id']}")
        label = label_of_category[ann["category_id"]]
        labels_of_image.setdefault(ann["image_id"], set()).add(label)
        polygons_of_image.setdefault(ann["image_id"], []).extend(_polygons(ann, label + 1, path))
    result, problems = {}, []
    for image in coco["images"]:
        labels = labels_of_image.get(image["id"], set())
        if len(labels) != 1:
            problems.append((image["file_name"], sorted(labels)))
            continue
        result[image["file_name"]] = Annotated(labels.pop(), int(image.get("height", 0)), int(image.get("width", 0)),
                                               tuple(polygons_of_image.get(image["id"], ())))
    if problems:
        raise DataError(f"{path}: images without exactly one category: {problems[:10]}")
    return result


def parse(raw_dir: str, subset: str) -> common.Plan:
    if subset not in SUBSETS:
        raise ConfigError(f"unknown GIST514-DB subset {subset!r}; choose one of {sorted(SUBSETS)}")
    folder, stem = SUBSETS[subset]
    text = layout(subset)
    root = common.find_root(raw_dir, f"annotations/val_{stem}_0.json", folder, text)
    images_dir = common.require(root, "images", text)
    plan = common.Plan(root=root, class_names=list(CLASS_NAMES), items=[], folds={}, default_fold="0",
                       metadata_files=[])
    train, test = [], []
    annotated: dict[str, tuple[str, Annotated]] = {}  # file name -> (COCO file, its first annotation)
    for kind, store in (("val", test), ("train", train)):
        for k in range(NUM_SPLITS):
            rel = f"annotations/{kind}_{stem}_{k}.json"
            store.append(read_coco(common.require(root, rel, text)))
            for name, entry in store[-1].items():
                annotated.setdefault(name, (rel, entry))
    plan.metadata_files += [f"annotations/{kind}_{stem}_{k}.json" for k in range(NUM_SPLITS)
                            for kind in ("train", "val")]
    label_of: dict[str, int] = {}
    for labels in train + test:
        for name, entry in labels.items():
            if label_of.setdefault(name, entry.label) != entry.label:
                plan.warnings.append(f"{name} has different categories in different split files")
    on_disk = common.case_insensitive_index(images_dir)
    source_of: dict[str, str] = {}
    for name in sorted(label_of):
        disk_name = on_disk.get(os.path.basename(name).lower())
        if disk_name is None:
            plan.skip(f"images/{os.path.basename(name)}", "listed in the COCO files but missing from images/")
            continue
        source_of[name] = f"images/{disk_name}"
        parts = [k for k in range(NUM_SPLITS) if name in test[k]]
        if len(parts) > 1:
            plan.warnings.append(f"{name} is a test image of several splits {parts}; stored in split{parts[0]}")
        part = f"split{parts[0]}" if parts else "train_only"
        coco_file, entry = annotated[name]
        mask = MaskSpec("polygons", coco_file, polygons=entry.polygons,
                        size=(entry.height, entry.width) if entry.height and entry.width else None)
        plan.items.append(common.Item(path=os.path.join(images_dir, disk_name), source=source_of[name],
                                      label=label_of[name], subject="", part=part, mask=mask))
    common.unlisted_images(images_dir, [os.path.basename(n) for n in label_of], root, plan, "the COCO files")
    for k in range(NUM_SPLITS):
        test_ids = [source_of[n] for n in sorted(test[k]) if n in source_of]
        overlap = sorted(set(train[k]) & set(test[k]))
        if overlap:
            plan.warnings.append(f"split {k}: {len(overlap)} images are in both train and val, e.g. "
                                 f"{overlap[:3]}; they are kept in test only")
        train_ids = [source_of[n] for n in sorted(train[k]) if n in source_of and n not in test[k]]
        labels = [label_of[n] for n in sorted(train[k]) if n in source_of and n not in test[k]]
        kept, held = common.stratified_holdout(train_ids, labels, [""] * len(train_ids), VALIDATION_FRACTION,
                                               VALIDATION_SEED)
        plan.folds[str(k)] = {"train": kept, "validation": held, "test": test_ids, "train_full": train_ids}
    counts = Counter(CLASS_NAMES[i.label] for i in plan.items)
    plan.warnings += common.count_warnings("GIST514-DB", {"images": len(plan.items), **counts}, DOCUMENTED)
    plan.warnings += common.count_warnings("GIST514-DB test", Counter(i.part for i in plan.items),
                                           DOCUMENTED_TEST_SIZES)
    return plan


class Gist514(builder.BenchmarkBuilder):
    """GIST514-DB (He et al., Computers in Biology and Medicine 2022): 514 endoscopic ultrasound images."""

    name = "gist514"
    BUILDER_CONFIGS: ClassVar[list] = [
        tfds.core.BuilderConfig(name="roi", description="lesion-ROI crops (usd514_jpeg_roi), the usual subset"),
        tfds.core.BuilderConfig(name="raw", description="full frames (usd514_jpeg_raw)"),
    ]
    CLASS_NAMES = CLASS_NAMES
    MASK_CLASS_NAMES = ("background", *CLASS_NAMES)
    CHANNELS = 3
    LICENSE = "CC BY-NC-SA 4.0"
    HOMEPAGE = ""
    DESCRIPTION = "GIST514-DB endoscopic ultrasound, leiomyoma (0) vs GIST (1); five official COCO splits."
    # Only the facts of docs/benchmarks.md; complete the entry from the publisher's page.
    CITATION = """@article{he2022query2,
  title={Query2 (GIST514-DB)}, author={He and others},
  journal={Computers in Biology and Medicine}, year={2022}}"""
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""Download the GIST514-DB folders (Google Drive link in the Query2 paper;
CC BY-NC-SA 4.0), extract them and pass the folder that holds them (or one of them) as --raw_dir. Expected
layout for each subset:
{layout("roi")}
{layout("raw")}"""

    def parse(self, raw_dir: str) -> common.Plan:
        return parse(raw_dir, self.builder_config.name)
