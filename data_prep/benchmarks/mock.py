"""Synthetic trees in the layouts of the benchmarks, for smoke tests and demos of the benchmark path.

    write_busbra_tree(root, patients=60, size=64, seed=0[, cues, fat_lobules]) -> the BUSBRA folder
    write_mmotu_tree(root, count=40, size=64, seed=0)                         -> the OTU_2d folder
    write_gist514_tree(root, count=20, size=64, seed=0, subset="roi")         -> usd514_jpeg_roi (or _raw)
    write_busi_tree(root, per_class=(8, 5, 4), size=24, seed=0)              -> Dataset_BUSI_with_GT

Images come from `usf_mae_jax.data.synthetic` (speckle, probe geometry, posterior shadows, and lesions whose
class shows in their shape: benign round and smooth with posterior enhancement, malignant irregular with a
posterior shadow; `cues` sets how strongly, `usf_mae_jax.data.synthetic.Cues`), so a small classifier can learn
them; with `fat_lobules=True` the tissue also holds flat hypoechoic fat lobules, the usual lesion mimics. Every
mask is the true lesion of its image, written the way the real dataset ships it (docs/benchmarks.md, "Masks"):
BUS-BRA `Masks/mask_<ID>.png` with 0/255, MMOTU-2D `annotations/N_binary.PNG` (0/255) and the colour-coded
`annotations/N.PNG`, GIST514-DB COCO polygons, BUSI `<class> (N)_mask.png` as 1-bit PNGs (all-background RGB
for `normal/`) beside RGB images whose three channels are equal, as in the release.

BUS-BRA folds are patient-level and stratified by pathology, like the real file; in each round 15% of each
class's training patients (at least one) are validation patients. MMOTU-2D gets `train*.txt` / `val*.txt`
lists (every fourth image in val); GIST514-DB five disjoint val files (image i in split i % 5).
"""

from __future__ import annotations

import csv
import json
import os
import shutil

import cv2
import numpy as np
from PIL import Image

from usf_mae_jax.data import synthetic

NUM_FOLDS = 5
# One colour per MMOTU-2D class for the mock's `N.PNG`. The release does not document its palette; this one
# is the commented-out 8-class palette of a public loader. The converter never relies on it: it learns the
# colour of each class from the data and reports disagreements (data_prep/benchmarks/masks.py).
MMOTU_PALETTE = ((64, 0, 0), (0, 64, 0), (0, 0, 64), (64, 0, 64), (64, 64, 0), (64, 64, 64), (0, 128, 0),
                 (0, 0, 128))


def _assign_folds(pathologies: list[str], rng: np.random.Generator) -> list[int]:
    """Patient-level folds 1..5, dealt round-robin within each pathology after a shuffle."""
    folds = [0] * len(pathologies)
    for name in ("benign", "malignant"):
        patients = [p for p, v in enumerate(pathologies) if v == name]
        rng.shuffle(patients)
        for rank, patient in enumerate(patients):
            folds[patient] = rank % NUM_FOLDS + 1
    return folds


def _assign_validation(pathologies: list[str], folds: list[int], rng: np.random.Generator,
                       fraction: float = 0.15) -> dict[int, set[int]]:
    """Per round k, a patient-level validation set: `fraction` of each class's non-test patients, at least one."""
    validation = {}
    for k in range(1, NUM_FOLDS + 1):
        chosen: set[int] = set()
        for name in ("benign", "malignant"):
            candidates = [p for p, v in enumerate(pathologies) if v == name and folds[p] != k]
            rng.shuffle(candidates)
            chosen.update(candidates[:max(1, round(fraction * len(candidates)))])
        validation[k] = chosen
    return validation


def write_busbra_tree(root: str, patients: int = 60, size: int = 64, seed: int = 0,
                      malignant_fraction: float = 0.4, second_image_fraction: float = 0.5,
                      cues: synthetic.Cues | None = None, fat_lobules: bool = False) -> str:
    """Writes the tree under `root/BUSBRA` and returns that folder. Deterministic for a seed."""
    if patients < 2 * NUM_FOLDS:
        raise ValueError(f"need at least {2 * NUM_FOLDS} patients for 5 stratified folds, got {patients}")
    rng = np.random.default_rng(seed)
    base = os.path.join(root, "BUSBRA")
    os.makedirs(os.path.join(base, "Images"), exist_ok=True)
    os.makedirs(os.path.join(base, "Masks"), exist_ok=True)
    pathologies = ["malignant" if rng.random() < malignant_fraction else "benign" for _ in range(patients)]
    pathologies[0], pathologies[1] = "benign", "malignant"  # both classes always present
    folds = _assign_folds(pathologies, rng)
    validation = _assign_validation(pathologies, folds, rng)
    data_rows, fold_rows = [], []
    for patient in range(patients):
        sides = ["l", "r"] if rng.random() < second_image_fraction else [str(rng.choice(["l", "r"]))]
        label = synthetic.MALIGNANT if pathologies[patient] == "malignant" else synthetic.BENIGN
        for side in sides:
            stem = f"{patient + 1:04d}-{side}"
            image, mask = synthetic.synthesize_with_mask(size, np.random.default_rng([seed, patient, ord(side)]),
                                                         label, fat_lobules=fat_lobules, cues=cues)
            cv2.imwrite(os.path.join(base, "Images", f"bus_{stem}.png"), image)
            cv2.imwrite(os.path.join(base, "Masks", f"mask_{stem}.png"), mask.astype(np.uint8) * 255)
            data_rows.append([f"bus_{stem}", patient + 1, "synthetic", pathologies[patient],
                              4 if label == synthetic.MALIGNANT else 3, "synthetic", size, size, side,
                              f"[0, 0, {size}, {size}]"])
            valid = ["" if folds[patient] == k else (0 if patient in validation[k] else 1)
                     for k in range(1, NUM_FOLDS + 1)]
            fold_rows.append([f"bus_{stem}", pathologies[patient], folds[patient], *valid])
    with open(os.path.join(base, "bus_data.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ID", "Case", "Histology", "Pathology", "BIRADS", "Device", "Width", "Height", "Side",
                         "BBOX"])
        writer.writerows(data_rows)
    with open(os.path.join(base, "5-fold-cv.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ID", "Pathology", "kFold", *(f"valid_{k}" for k in range(1, NUM_FOLDS + 1))])
        writer.writerows(fold_rows)
    return base


def _lesion_image(size: int, rng: np.random.Generator, kind: int, colour: bool) -> tuple[np.ndarray, np.ndarray]:
    """(RGB image, lesion mask): a synthetic frame, with a reddish Doppler-like tint when `colour`."""
    image, mask = synthetic.synthesize_with_mask(size, rng, kind, fat_lobules=True)
    rgb = np.repeat(image[:, :, None], 3, axis=2)
    if colour:
        rgb[:, :, 0] = np.clip(rgb[:, :, 0].astype(np.int32) + 60 * mask, 0, 255).astype(np.uint8)
    return rgb, mask


def write_mmotu_tree(root: str, count: int = 40, size: int = 64, seed: int = 0) -> str:
    """Writes `root/OTU_2d`: JPEG images, binary and colour-coded masks, and the four list files."""
    base = os.path.join(root, "OTU_2d")
    os.makedirs(os.path.join(base, "images"), exist_ok=True)
    os.makedirs(os.path.join(base, "annotations"), exist_ok=True)
    rng = np.random.default_rng(seed)
    lists: dict[str, list[tuple[int, int]]] = {"train": [], "val": []}
    for n in range(1, count + 1):
        label = (n - 1) % len(MMOTU_PALETTE) if n <= 2 * len(MMOTU_PALETTE) else int(rng.integers(8))
        kind = synthetic.BENIGN if label < 4 else synthetic.MALIGNANT
        image, mask = _lesion_image(size, np.random.default_rng([seed, n]), kind, colour=n % 7 == 0)
        cv2.imwrite(os.path.join(base, "images", f"{n}.JPG"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        cv2.imwrite(os.path.join(base, "annotations", f"{n}_binary.PNG"), mask.astype(np.uint8) * 255)
        coded = np.zeros((size, size, 3), np.uint8)
        coded[mask] = MMOTU_PALETTE[label]
        cv2.imwrite(os.path.join(base, "annotations", f"{n}.PNG"), cv2.cvtColor(coded, cv2.COLOR_RGB2BGR))
        lists["val" if n % 4 == 0 else "train"].append((n, label))
    for part, rows in lists.items():
        with open(os.path.join(base, f"{part}_cls.txt"), "w") as f:
            f.writelines(f"{n}.JPG  {label}\n" for n, label in rows)
        with open(os.path.join(base, f"{part}.txt"), "w") as f:
            f.writelines(f"{n}\n" for n, _ in rows)
    return base


def lesion_polygons(mask: np.ndarray) -> list[list[float]]:
    """COCO polygons [x0, y0, x1, y1, ...] tracing a mask's outline in COCO's corner-based coordinates.

    OpenCV's contour runs through the centres of the boundary pixels; moving each point half a pixel along
    the contour's outward normal puts it on the pixels' outer edge, so that rasterising the polygon by the
    pixel-centre rule (data_prep/benchmarks/masks.py) gives back the mask up to a few corner pixels.
    """
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    polygons = []
    for contour in contours:
        points = contour.reshape(-1, 2).astype(np.float64)
        if len(points) < 3:
            continue
        tangent = np.roll(points, -1, axis=0) - np.roll(points, 1, axis=0)
        normal = np.stack([tangent[:, 1], -tangent[:, 0]], axis=1)
        normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-9)
        signed_area = np.sum(points[:, 0] * np.roll(points[:, 1], -1) - np.roll(points[:, 0], -1) * points[:, 1])
        polygons.append((points + 0.5 + 0.5 * np.sign(signed_area) * normal).round(3).reshape(-1).tolist())
    return polygons


def write_gist514_tree(root: str, count: int = 20, size: int = 64, seed: int = 0, subset: str = "roi") -> str:
    """Writes one GIST514-DB subset folder (`roi` or `raw`) with five COCO train/val split files."""
    folder, stem = {"roi": ("usd514_jpeg_roi", "anno_crop_split"), "raw": ("usd514_jpeg_raw", "anno_split")}[subset]
    base = os.path.join(root, folder)
    os.makedirs(os.path.join(base, "images"), exist_ok=True)
    os.makedirs(os.path.join(base, "annotations"), exist_ok=True)
    categories = [{"id": 11, "name": "GIST"}, {"id": 4, "name": "lmym"}]  # ids on purpose not 0/1
    images, annotations = [], []
    for i in range(count):
        gist = i % 2 == 1
        image, mask = _lesion_image(size, np.random.default_rng([seed, i]), synthetic.MALIGNANT if gist
                                    else synthetic.BENIGN, colour=False)
        name = f"case{i:03d}.jpg"
        cv2.imwrite(os.path.join(base, "images", name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        images.append({"file_name": name, "id": 100 + i, "height": size, "width": size, "anatomy_id": 1})
        annotations.append({"id": 500 + i, "image_id": 100 + i, "category_id": 11 if gist else 4,
                            "segmentation": lesion_polygons(mask), "iscrowd": 0})
    for k in range(NUM_FOLDS):
        for kind, keep in (("val", lambda i, k=k: i % NUM_FOLDS == k), ("train", lambda i, k=k: i % NUM_FOLDS != k)):
            chosen = [i for i in range(count) if keep(i)]
            coco = {"images": [images[i] for i in chosen], "annotations": [annotations[i] for i in chosen],
                    "categories": categories}
            with open(os.path.join(base, "annotations", f"{kind}_{stem}_{k}.json"), "w") as f:
                json.dump(coco, f)
    return base


BUSI_CLASSES = ("benign", "malignant", "normal")


def _busi_image(folder: str, name: str, n: int, size: int, seed: int) -> np.ndarray:
    """Writes `<name> (n).png` (gray stored as RGB, of a size varying by image) and returns its lesion mask."""
    label = BUSI_CLASSES.index(name)
    rng = np.random.default_rng([seed, label, n])
    shape = (size + int(rng.integers(0, 6)), size + int(rng.integers(0, 10)))
    lesion = synthetic.NO_LESION if name == "normal" else (synthetic.BENIGN, synthetic.MALIGNANT)[label]
    image, mask = synthetic.synthesize_with_mask(shape, rng, lesion)
    Image.fromarray(np.repeat(image[:, :, None], 3, axis=2)).save(os.path.join(folder, f"{name} ({n}).png"))
    return mask


def _save_busi_mask(path: str, mask: np.ndarray, normal: bool) -> None:
    if normal:  # the release's normal masks are all-black RGB files
        Image.fromarray(np.zeros((*mask.shape, 3), np.uint8)).save(path)
    else:
        Image.fromarray(mask.astype(bool)).save(path)  # mode "1", as most of the release's masks


def write_busi_tree(root: str, per_class: tuple[int, int, int] = (8, 5, 4), size: int = 24, seed: int = 0,
                    quirks: bool = True) -> str:
    """Writes `root/Dataset_BUSI_with_GT` with BUSI's exact names and returns that folder.

    `per_class` counts the benign, malignant and normal files. With `quirks`, the release's oddities are
    reproduced: `benign (2)` has its lesion split over three masks (`_mask`, `_mask_1`, `_mask_2`) whose union
    is the lesion; the last benign file is a byte copy of `benign (1)` (a duplicate within a class) and the last
    malignant file a copy of `benign (3)` (a duplicate with another class), masks included. Normal masks are
    empty. Deterministic for a seed.
    """
    if quirks and (per_class[0] < 4 or per_class[1] < 2):
        raise ValueError("the quirks need at least 4 benign and 2 malignant files")
    base = os.path.join(root, "Dataset_BUSI_with_GT")
    for name, count in zip(BUSI_CLASSES, per_class):
        folder = os.path.join(base, name)
        os.makedirs(folder, exist_ok=True)
        for n in range(1, count + 1):
            if quirks and (name, n) in (("benign", count), ("malignant", count)):
                continue  # written below as copies
            mask = _busi_image(folder, name, n, size, seed)
            if quirks and (name, n) == ("benign", 2):
                columns = np.flatnonzero(mask.any(axis=0))
                for k, part in enumerate(np.array_split(columns, 3)):
                    piece = np.zeros_like(mask)
                    piece[:, part] = mask[:, part]
                    _save_busi_mask(os.path.join(folder, f"{name} ({n})_mask{f'_{k}' if k else ''}.png"), piece,
                                    False)
            else:
                _save_busi_mask(os.path.join(folder, f"{name} ({n})_mask.png"), mask, name == "normal")
    if quirks:
        for target, source in ((("benign", per_class[0]), ("benign", 1)), (("malignant", per_class[1]), ("benign", 3))):
            for suffix in ("", "_mask"):
                shutil.copyfile(os.path.join(base, source[0], f"{source[0]} ({source[1]}){suffix}.png"),
                                os.path.join(base, target[0], f"{target[0]} ({target[1]}){suffix}.png"))
    return base
