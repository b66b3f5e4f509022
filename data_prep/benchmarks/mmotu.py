"""MMOTU-2D: ovarian tumour ultrasound, 8 classes, with the official train and val lists.

Layout and facts from `docs/benchmarks.md` (the dataset's own list files):
  * `train_cls.txt` / `val_cls.txt` hold "N.JPG<whitespace>label" lines; the separator is not always one
    space, so lines are split on any whitespace;
  * `train.txt` / `val.txt` list the same stems and are cross-checked when present;
  * `annotations/N_binary.PNG` is the image's binary tumour mask. Each image holds one tumour, of the class
    its `*_cls.txt` line gives, so the record's mask is class + 1 inside the binary mask and 0 outside: the
    8-class map, from which the binary one is `mask > 0` (`masks.MaskSpec`, kind binary, value label + 1);
  * a binary mask of another size than its image (the real release's `598_binary.PNG` is 256x256 for a
    604 x 566 image) is dropped and listed, its image kept without a mask, or resized on request (masks.py);
  * `annotations/N.PNG` is colour-coded by class; it is checked against the lists, and a disagreement is a
    manifest warning listing the images (`masks.colour_coding_warnings`). `N_binary_binary.PNG` (a copy) is
    not read;
  * no patient ids are released, so `subject` is empty and splits are image-level.
Storage parts are `train` (1000 images) and `val` (469). The official protocol trains on train and tests on
val; as UltraSam's public setup does (docs/benchmarks.md), a stratified 5% of train is held out for
validation (seed 0); `train_full` keeps the whole list.
"""

from __future__ import annotations

import os
from collections import Counter

from data_prep.benchmarks import builder, common, masks
from usf_mae_jax.cli import DataError

LAYOUT = """OTU_2d/
  images/         1.JPG ... 1469.JPG        (3-channel; some colour Doppler)
  annotations/    N.PNG, N_binary.PNG, N_binary_binary.PNG   (masks; stored with their image)
  train.txt       one stem per line (1000 lines)
  val.txt         one stem per line (469 lines)
  train_cls.txt   "N.JPG <label>" per line, label 0..7
  val_cls.txt     same format"""

CLASS_NAMES = ("chocolate_cyst", "serous_cystadenoma", "teratoma", "theca_cell_tumour", "simple_cyst",
               "normal_ovary", "mucinous_cystadenoma", "high_grade_serous")
DOCUMENTED = {
    "train": dict(zip(CLASS_NAMES, (226, 153, 228, 57, 47, 180, 71, 38))),
    "val": dict(zip(CLASS_NAMES, (110, 66, 108, 31, 19, 87, 33, 15))),
}
VALIDATION_FRACTION = 0.05  # UltraSam's setup: 5% of the training part (docs/benchmarks.md)
VALIDATION_SEED = 0


def read_cls_list(path: str) -> list[tuple[str, int]]:
    """(file name, label) pairs of a *_cls.txt file; a malformed line is an error naming file and line."""
    pairs = []
    for number, line in enumerate(common.read_lines(path), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or not fields[1].lstrip("-").isdigit():
            raise DataError(f"{path}:{number}: expected '<image> <label>', got {line.rstrip()!r}")
        label = int(fields[1])
        if not 0 <= label < len(CLASS_NAMES):
            raise DataError(f"{path}:{number}: label {label} is outside 0..{len(CLASS_NAMES) - 1}")
        pairs.append((fields[0], label))
    return pairs


def read_stems(path: str) -> list[str]:
    return [os.path.splitext(line.strip())[0] for line in common.read_lines(path) if line.strip()]


def parse(raw_dir: str) -> common.Plan:
    root = common.find_root(raw_dir, "train_cls.txt", "OTU_2d", LAYOUT)
    images_dir = common.require(root, "images", LAYOUT)
    plan = common.Plan(root=root, class_names=list(CLASS_NAMES), items=[], folds={}, default_fold="0",
                       metadata_files=[])
    on_disk = common.case_insensitive_index(images_dir)
    annotations_dir = os.path.join(root, "annotations")
    annotations = common.case_insensitive_index(annotations_dir) if os.path.isdir(annotations_dir) else {}
    if not annotations:
        plan.warnings.append(f"{annotations_dir} is missing or empty: the records carry no tumour mask")
    coded: list[tuple[str, int, str]] = []
    listed: list[str] = []
    for part in ("train", "val"):
        cls_name = f"{part}_cls.txt"
        pairs = read_cls_list(common.require(root, cls_name, LAYOUT))
        plan.metadata_files.append(cls_name)
        stems_path = os.path.join(root, f"{part}.txt")
        if os.path.exists(stems_path):
            plan.metadata_files.append(f"{part}.txt")
            stems, cls_stems = set(read_stems(stems_path)), {os.path.splitext(n)[0] for n in pairs_names(pairs)}
            if stems != cls_stems:
                plan.warnings.append(f"{part}.txt and {cls_name} disagree on {len(stems ^ cls_stems)} images, "
                                     f"e.g. {sorted(stems ^ cls_stems)[:5]}; {cls_name} is used")
        else:
            plan.warnings.append(f"{part}.txt is missing; the split comes from {cls_name} alone")
        counts: Counter = Counter()
        for file_name, label in pairs:
            listed.append(file_name)
            name = on_disk.get(file_name.lower())
            if name is None:
                plan.skip(f"images/{file_name}", f"listed in {cls_name} but missing from images/")
                continue
            counts[CLASS_NAMES[label]] += 1
            stem = os.path.splitext(name)[0]
            plan.items.append(common.Item(path=os.path.join(images_dir, name), source=f"images/{name}",
                                          label=label, subject="", part=part,
                                          mask=_binary_mask(plan, annotations_dir, annotations, stem, label)))
            colour_name = annotations.get(f"{stem}.png".lower())
            if colour_name is not None:
                plan.mask_files.append(f"annotations/{colour_name}")
                coded.append((f"images/{name}", label, os.path.join(annotations_dir, colour_name)))
        plan.warnings += common.count_warnings(f"MMOTU-2D {part}", counts, DOCUMENTED[part])
    common.unlisted_images(images_dir, listed, root, plan, "train_cls.txt or val_cls.txt")
    if annotations:
        plan.warnings += masks.colour_coding_warnings(coded, list(CLASS_NAMES))
        if len(coded) < len(plan.items):
            plan.warnings.append(f"{len(plan.items) - len(coded)} images have no colour-coded annotations/N.PNG "
                                 "to check their class against")
    sources = Counter(i.source for i in plan.items)
    repeated = sorted(s for s, n in sources.items() if n > 1)
    if repeated:
        raise DataError(f"{root}: images listed more than once across train_cls.txt and val_cls.txt: "
                         f"{repeated[:10]}")
    train = [i for i in plan.items if i.part == "train"]
    kept, held = common.stratified_holdout([i.source for i in train], [i.label for i in train],
                                           [i.subject for i in train], VALIDATION_FRACTION, VALIDATION_SEED)
    plan.folds["0"] = {"train": kept, "validation": held,
                       "test": [i.source for i in plan.items if i.part == "val"],
                       "train_full": [i.source for i in train]}
    return plan


def _binary_mask(plan: common.Plan, folder: str, annotations: dict[str, str], stem: str,
                 label: int) -> masks.MaskSpec | None:
    """The spec of `annotations/<stem>_binary.PNG` with the class value label + 1, or None when it is missing."""
    name = annotations.get(f"{stem}_binary.png".lower())
    if name is None:
        return None
    plan.mask_files.append(f"annotations/{name}")
    return masks.MaskSpec("binary", f"annotations/{name}", path=os.path.join(folder, name), value=label + 1)


def pairs_names(pairs: list[tuple[str, int]]) -> list[str]:
    return [name for name, _ in pairs]


class Mmotu(builder.BenchmarkBuilder):
    """MMOTU-2D (Zhao et al., arXiv 2207.06799): 1469 ovarian tumour images in 8 classes."""

    name = "mmotu"
    CLASS_NAMES = CLASS_NAMES
    MASK_CLASS_NAMES = ("background", *CLASS_NAMES)
    CHANNELS = 3
    LICENSE = "not stated by the MMOTU release (docs/benchmarks.md); see its terms"
    HOMEPAGE = ""
    DESCRIPTION = "MMOTU-2D ovarian tumour ultrasound, 8 classes; official train (1000) and val (469) lists."
    CITATION = """@article{zhao2022mmotu,
  title={A Multi-Modality Ovarian Tumor Ultrasound Image Dataset for Unsupervised Cross-Domain Semantic
         Segmentation},
  author={Zhao, Qi and others}, journal={arXiv preprint arXiv:2207.06799}, year={2022}}"""
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""Download the OTU_2d folder of the MMOTU dataset (a Google Drive folder
linked from the dataset paper), extract it and pass the folder (or its parent) as --raw_dir. Expected layout:
{LAYOUT}"""

    def parse(self, raw_dir: str) -> common.Plan:
        return parse(raw_dir)
