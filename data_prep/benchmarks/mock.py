"""A synthetic BUS-BRA-layout tree with a learnable label, for smoke tests and demos of the benchmark path.

    write_busbra_tree(root, patients=60, size=64, seed=0) -> path of the BUSBRA folder

It writes `Images/bus_NNNN-{l,r}.png`, `Masks/mask_NNNN-{l,r}.png`, `bus_data.csv` and `5-fold-cv.csv` with
the real columns. Images come from `usf_mae_jax.data.synthetic` (speckle, probe geometry, and lesions whose
class shows in their shape: benign round and smooth with posterior enhancement, malignant irregular with a
posterior shadow; `cues` sets how strongly, `usf_mae_jax.data.synthetic.Cues`), so a small classifier can learn
them. Folds are patient-level and stratified by
pathology, like the real file; in each round 15% of each class's training patients (at least one) are
validation patients.
"""

from __future__ import annotations

import csv
import os

import cv2
import numpy as np

from usf_mae_jax.data import synthetic

NUM_FOLDS = 5


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
                      cues: synthetic.Cues | None = None) -> str:
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
            image = synthetic.synthesize(size, np.random.default_rng([seed, patient, ord(side)]), label, cues=cues)
            cv2.imwrite(os.path.join(base, "Images", f"bus_{stem}.png"), image)
            # A stand-in lesion mask (0/255): the darkest blob; it only has to exist, it is never an input.
            mask = (cv2.GaussianBlur(image, (0, 0), 3) < 40).astype(np.uint8) * 255
            cv2.imwrite(os.path.join(base, "Masks", f"mask_{stem}.png"), mask)
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
