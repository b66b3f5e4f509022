"""BUSI: breast ultrasound in three classes (benign, malignant, normal) with lesion masks; seeded k-fold splits.

Layout and facts from `docs/benchmarks.md` ("BUSI"; Al-Dhabyani et al., Data in Brief 2020):
  * three class folders, `benign/`, `malignant/` and `normal/` (437, 210 and 133 PNGs), each image
    `benign (N).png` beside its mask `benign (N)_mask.png`, plus `benign (N)_mask_1.png`, `_mask_2.png` when
    the image shows more than one lesion. The folder is the class. The record's mask is the union of the
    image's mask files (`masks.MaskSpec`, kind binary, `extra`); a mask file of another size than its image
    follows the rule of every converter (dropped and listed, or resized on request; masks.py);
  * `normal/` images come with masks that are all background. They are stored as what they are, annotated
    images without a lesion (`has_mask` true, an all-zero map), not as images lacking a mask;
  * no patient ids are released: `subject` is empty and every split is at image level;
  * the release holds exact duplicates. They are found by a SHA-256 of the decoded pixels (an image whose three
    channels are equal counts as one channel), which also catches a copy re-saved with other PNG settings that
    a hash of the file bytes would miss, at the cost of one decode per image in the plan stage. Of a group with
    one class the first file (class folder, then number) is kept; a group whose copies carry different classes
    has no trustworthy label, and every copy is left out. The manifest's `duplicates` section names them all.
Splits: seeded, class-stratified k-fold at image level (default 5 folds, seed 0): the folds are the disjoint
storage parts (`fold1`..`foldK`), so each image is stored once; round k tests on fold k, holds out a stratified
10% of the other folds' images of each class for validation (seed (seed, k)) and trains on the rest, the
`splits.json` structure of BUS-BRA. Two builder configs share these folds: `three_class` (benign 0, malignant 1,
normal 2) and `benign_malignant` (the same labels, normal images left out), so a fold tests the same lesion
images in both. `convert` surveys the raw folder once for both (`SurveyOnce`).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
import re
from collections import Counter, defaultdict
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds

from data_prep.benchmarks import builder, common, masks
from usf_mae_jax.cli import ConfigError

LAYOUT = """Dataset_BUSI_with_GT/
  benign/      benign (1).png, benign (1)_mask.png, benign (4)_mask_1.png, ...   (437 images)
  malignant/   malignant (1).png, malignant (1)_mask.png, ...                   (210 images)
  normal/      normal (1).png, normal (1)_mask.png (all background), ...        (133 images)"""

CLASS_NAMES = ("benign", "malignant", "normal")
SUBSETS = {"three_class": CLASS_NAMES, "benign_malignant": CLASS_NAMES[:2]}
DEFAULT_SUBSET = "three_class"
DOCUMENTED = {"images": 780, "benign": 437, "malignant": 210, "normal": 133}
DEFAULT_FOLDS = 5
VALIDATION_FRACTION = 0.1  # of each class's images outside the test fold
MASK_NAME = re.compile(r"^(?P<stem>.+?)_mask(?:_(?P<index>\d+))?$", re.IGNORECASE)
HASHED = "sha256 of the decoded pixels (an image with three equal channels counts as one channel)"


def natural_key(name: str) -> tuple:
    """Sorts `benign (2).png` before `benign (10).png`."""
    return tuple(int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name))


def pixel_digest(path: str) -> tuple[str, bool]:
    """(SHA-256 of the decoded pixels and their shape, whether the image holds colour); ValueError if unreadable."""
    image = common.decode_image(path)
    if image.shape[2] == 3 and (image[:, :, :1] == image).all():
        image = image[:, :, :1]
    digest = hashlib.sha256(repr(image.shape).encode() + np.ascontiguousarray(image).tobytes()).hexdigest()
    return digest, image.shape[2] == 3


def _class_folder(root: str, label: int, plan: common.Plan) -> list[common.Item]:
    """The images of one class folder with their mask specs; odd files are skipped with a reason."""
    name = CLASS_NAMES[label]
    folder = common.require(root, name, LAYOUT)
    images, mask_files, mask_stem = {}, defaultdict(list), {}
    for file in sorted((f for f in os.listdir(folder) if os.path.isfile(os.path.join(folder, f))), key=natural_key):
        stem, ext = os.path.splitext(file)
        if ext.lower() not in common.IMAGE_EXTENSIONS:
            plan.skip(f"{name}/{file}", "not an image file")
            continue
        match = MASK_NAME.match(stem)
        if match:
            mask_files[match["stem"].lower()].append((int(match["index"] or 0), file))
            mask_stem[match["stem"].lower()] = match["stem"]
        elif stem.lower() in images:
            plan.skip(f"{name}/{file}", f"a second image named {stem} (the first, {images[stem.lower()]}, is used)")
        else:
            images[stem.lower()] = file
    for key, files in sorted(mask_files.items()):
        if key not in images:
            for _, file in files:
                plan.skip(f"{name}/{file}", f"a mask without its image (no {mask_stem[key]}.png in {name}/)")
    items = []
    for key, file in images.items():
        found = [(f"{name}/{m}", os.path.join(folder, m)) for _, m in sorted(mask_files.get(key, []))]
        plan.mask_files += [source for source, _ in found]
        mask = masks.MaskSpec("binary", found[0][0], path=found[0][1], extra=tuple(found[1:])) if found else None
        items.append(common.Item(path=os.path.join(folder, file), source=f"{name}/{file}", label=label,
                                 subject="", part="", mask=mask))
    return items


def _deduplicate(items: list[common.Item], plan: common.Plan) -> list[common.Item]:
    """The items without exact duplicates (module docstring); the rest are skipped and reported in
    `plan.extra["duplicates"]`. Also warns about images holding colour, stored as luminance."""
    groups: dict[str, list[common.Item]] = defaultdict(list)
    readable, coloured = [], []
    for item in items:
        try:
            digest, colour = pixel_digest(item.path)
        except ValueError as err:
            plan.skip(item.source, str(err))
            continue
        groups[digest].append(item)
        readable.append(item)
        if colour:
            coloured.append(item.source)
    duplicates, conflicts, dropped = [], [], {}
    for group in groups.values():
        if len(group) < 2:
            continue
        sources = [i.source for i in group]
        if len({i.label for i in group}) == 1:
            duplicates.append({"kept": sources[0], "dropped": sources[1:], "class": CLASS_NAMES[group[0].label]})
            dropped.update({s: f"exact duplicate of {sources[0]} (same decoded pixels)" for s in sources[1:]})
        else:
            conflicts.append({"files": sources, "classes": [CLASS_NAMES[i.label] for i in group],
                              "action": "every copy left out"})
            dropped.update({s: f"exact duplicate of {[o for o in sources if o != s]} with another class; the label "
                               "is ambiguous, so every copy is left out" for s in sources})
    for source, reason in dropped.items():
        plan.skip(source, reason)
    plan.extra["duplicates"] = {"hash": HASHED, "groups": duplicates, "label_conflicts": conflicts}
    if coloured:
        plan.warnings.append(f"{len(coloured)} images are not pure grayscale (Doppler boxes, coloured marks or a "
                             f"slight colour cast) and are stored as luminance: {coloured[:masks.MAX_LISTED]}")
    return [i for i in readable if i.source not in dropped]


def _normal_masks_with_lesions(items: list[common.Item]) -> list[str]:
    """Normal images whose mask files hold a foreground pixel (none in the release); unreadable files are left
    to the mask checks."""
    found = []
    for item in items:
        if item.label != CLASS_NAMES.index("normal") or item.mask is None:
            continue
        try:
            if any(masks.read_values(path, source).any() for source, path in item.mask.files()):
                found.append(item.source)
        except masks.MaskError:
            continue
    return found


def survey(raw_dir: str, folds: int = DEFAULT_FOLDS, seed: int = 0) -> common.Plan:
    """The three-class plan of a raw BUSI folder: images, masks, duplicates removed, folds assigned."""
    if folds < 2:
        raise ConfigError(f"BUSI needs at least 2 folds, got {folds}")
    root = common.find_root(raw_dir, "malignant", "Dataset_BUSI_with_GT", LAYOUT)
    plan = common.Plan(root=root, class_names=list(CLASS_NAMES), items=[], folds={}, default_fold="1",
                       metadata_files=[])
    found = [item for label in range(len(CLASS_NAMES)) for item in _class_folder(root, label, plan)]
    counts = Counter(CLASS_NAMES[i.label] for i in found)
    plan.warnings += common.count_warnings("BUSI", {"images": len(found), **counts}, DOCUMENTED)
    plan.items = _deduplicate(found, plan)
    if len(plan.items) < folds:
        raise ConfigError(f"{root}: {len(plan.items)} distinct images cannot fill {folds} folds")
    lesions = _normal_masks_with_lesions(plan.items)
    if lesions:
        plan.warnings.append(f"{len(lesions)} normal images have masks with lesion pixels (stored as given): "
                             f"{lesions[:masks.MAX_LISTED]}")
    plan.extra["multi_mask_images"] = [{"image": i.source, "masks": [s for s, _ in i.mask.files()]}
                                       for i in plan.items if i.mask is not None and i.mask.extra]
    ids, labels = [i.source for i in plan.items], [i.label for i in plan.items]
    for item, fold in zip(plan.items, common.stratified_folds(ids, labels, folds, seed)):
        item.part = f"fold{fold}"
    for k in range(1, folds + 1):
        test = [i.source for i in plan.items if i.part == f"fold{k}"]
        rest = [i for i in plan.items if i.part != f"fold{k}"]
        train, validation = common.stratified_holdout([i.source for i in rest], [i.label for i in rest],
                                                      [""] * len(rest), VALIDATION_FRACTION, [seed, k])
        plan.folds[str(k)] = {"train": train, "validation": validation, "test": test}
    plan.extra["split_protocol"] = {"folds": folds, "seed": seed, "level": "image (BUSI has no patient ids)",
                                   "stratified_by": "class", "validation_fraction": VALIDATION_FRACTION}
    return plan


def plan_for(full: common.Plan, subset: str) -> common.Plan:
    """A fresh copy of the survey for one builder config; `benign_malignant` skips the normal images."""
    if subset not in SUBSETS:
        raise ConfigError(f"unknown BUSI subset {subset!r}; choose one of {sorted(SUBSETS)}")
    plan = copy.deepcopy(full)
    if subset == "three_class":
        return plan
    normal = {i.source for i in plan.items if i.label == CLASS_NAMES.index("normal")}
    for source in sorted(normal, key=natural_key):
        plan.skip(source, "a normal image: not a class of the benign_malignant subset")
    plan.items = [i for i in plan.items if i.source not in normal]
    plan.class_names = list(SUBSETS[subset])
    plan.folds = {k: {name: [i for i in ids if i not in normal] for name, ids in splits.items()}
                  for k, splits in plan.folds.items()}
    return plan


@dataclasses.dataclass
class SurveyOnce:
    """The survey of one raw folder, made on first use and shared by the builders of both subsets, so the
    images are decoded and hashed once."""

    raw_dir: str
    folds: int = DEFAULT_FOLDS
    seed: int = 0
    _plan: common.Plan | None = None

    def get(self) -> common.Plan:
        if self._plan is None:
            self._plan = survey(self.raw_dir, self.folds, self.seed)
        return self._plan


class Busi(builder.BenchmarkBuilder):
    """BUSI (Al-Dhabyani et al., Data in Brief 2020): 780 breast ultrasound images of 600 women."""

    name = "busi"
    BUILDER_CONFIGS: ClassVar[list] = [
        tfds.core.BuilderConfig(name="three_class", description="benign, malignant and normal images"),
        tfds.core.BuilderConfig(name="benign_malignant", description="benign and malignant images; normal left out"),
    ]
    MASK_CLASS_NAMES = ("background", "lesion")
    CHANNELS = 1
    LICENSE = "not stated in the release; see the dataset article (Al-Dhabyani et al., Data in Brief 2020)"
    HOMEPAGE = "https://scholar.cu.edu.eg/?q=afahmy/pages/dataset"
    DESCRIPTION = ("BUSI breast ultrasound, benign (0) / malignant (1) / normal (2), lesion masks; seeded "
                   "class-stratified image-level k-fold splits.")
    CITATION = """@article{aldhabyani2020busi,
  title={Dataset of breast ultrasound images}, author={Al-Dhabyani, Walid and Gomaa, Mohammed and Khaled, Hussien
  and Fahmy, Aly}, journal={Data in Brief}, volume={28}, pages={104863}, year={2020}}"""
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""Download Dataset_BUSI_with_GT (linked from the dataset article), extract it
and pass the folder (or its parent) as --raw_dir. Expected layout:
{LAYOUT}"""

    def __init__(self, *, raw_dir: str | None = None, folds: int = DEFAULT_FOLDS, seed: int = 0,
                 shared: SurveyOnce | None = None, **kwargs):
        self.folds, self.seed = folds, seed
        self.shared = shared or (SurveyOnce(raw_dir, folds, seed) if raw_dir else None)
        super().__init__(raw_dir=raw_dir, **kwargs)

    def parse(self, raw_dir: str) -> common.Plan:
        return plan_for(self.shared.get(), self.builder_config.name)

    def class_names(self) -> list[str]:
        return list(SUBSETS[self.builder_config.name])

    def conversion_options(self) -> dict:
        return {**super().conversion_options(), "folds": self.folds, "seed": self.seed}
