"""BUS-BRA: breast ultrasound, benign vs malignant, with the official patient-level 5-fold file.

Layout and facts from `docs/benchmarks.md` (the dataset's own CSV files):
  * `bus_data.csv` gives each image's `ID` (file stem), `Case` (the patient, our subject) and `Pathology`
    (benign = 0, malignant = 1);
  * `5-fold-cv.csv` gives `kFold` (the image's test fold) and `valid_1..valid_5`: in round k, rows with
    `kFold == k` are the test set, `valid_k == 1` marks training and `valid_k == 0` validation images;
  * `Masks/mask_<ID without "bus_">.png` is each image's binary lesion mask (0/255), stored in the image's
    record as 0/1 (`masks.MaskSpec`, kind binary); an image without one, or whose mask is unusable (another
    size, unreadable; listed in the manifest), keeps `has_mask` false.
Storage parts are the five test folds (`fold1`..`fold5`), disjoint, so each image is written once.
Header and value whitespace is stripped, and `valid_k` may read "1", "1.0" or " 1".
"""

from __future__ import annotations

import csv
import os
from collections import Counter, defaultdict

from data_prep.benchmarks import builder, common
from data_prep.benchmarks.masks import MaskSpec
from usf_mae_jax.cli import DataError

LAYOUT = """BUSBRA/
  Images/         bus_0001-l.png, ...       (1875 grayscale PNGs)
  Masks/          mask_0001-l.png, ...      (binary lesion masks, 0/255; stored with their image)
  bus_data.csv    ID, Case, Histology, Pathology, BIRADS, Device, Width, Height, Side, BBOX
  5-fold-cv.csv   ID, Pathology, kFold, valid_1, ..., valid_5"""

CLASS_NAMES = ("benign", "malignant")
NUM_FOLDS = 5
DOCUMENTED = {"images": 1875, "patients": 1064, "benign": 1268, "malignant": 607}
DOCUMENTED_FOLD_SIZES = {"fold1": 376, "fold2": 385, "fold3": 366, "fold4": 365, "fold5": 383}


def read_csv(path: str, required: tuple[str, ...]) -> list[dict[str, str]]:
    """Rows of a CSV with whitespace stripped from names and values; errors name the file and the column."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        try:
            header = [h.strip() for h in next(reader)]
            missing = [c for c in required if c not in header]
            if missing:
                raise DataError(f"{path} lacks the column(s) {missing}; found {header}")
            return [{h: v.strip() for h, v in zip(header, row)} for row in reader if any(v.strip() for v in row)]
        except StopIteration:
            raise DataError(f"{path} is empty; expected the columns {', '.join(required)}") from None
        except (UnicodeDecodeError, csv.Error) as err:
            raise DataError(f"{path} is not a UTF-8 CSV file ({err})") from None


def _flag(value: str, path: str, row_id: str, column: str) -> int | None:
    if value == "":
        return None
    try:
        return int(float(value))
    except ValueError:
        raise DataError(f"{path}: {column} of {row_id} is {value!r}, expected 0, 1 or empty") from None


def parse(raw_dir: str) -> common.Plan:
    root = common.find_root(raw_dir, "bus_data.csv", "BUSBRA", LAYOUT)
    images_dir = common.require(root, "Images", LAYOUT)
    data_path = common.require(root, "bus_data.csv", LAYOUT)
    folds_path = common.require(root, "5-fold-cv.csv", LAYOUT)
    data = read_csv(data_path, ("ID", "Case", "Pathology"))
    fold_rows = {r["ID"]: r for r in read_csv(folds_path, ("ID", "kFold", *(f"valid_{k}" for k in range(1, 6))))}
    plan = common.Plan(root=root, class_names=list(CLASS_NAMES), items=[], folds={}, default_fold="1",
                       metadata_files=["bus_data.csv", "5-fold-cv.csv"])
    on_disk = common.case_insensitive_index(images_dir)
    masks_dir = os.path.join(root, "Masks")
    mask_names = common.case_insensitive_index(masks_dir) if os.path.isdir(masks_dir) else {}
    if not mask_names:
        plan.warnings.append(f"{masks_dir} is missing or empty: the records carry no lesion mask")
    fold_of: dict[str, int] = {}
    for row in data:
        image_id, pathology = row["ID"], row["Pathology"].lower()
        if pathology not in CLASS_NAMES:
            raise DataError(f"{data_path}: Pathology of {image_id} is {row['Pathology']!r}, "
                             f"expected benign or malignant")
        name = on_disk.get(f"{image_id}.png".lower())
        if name is None:
            plan.skip(f"Images/{image_id}.png", "listed in bus_data.csv but missing from Images/")
            continue
        fold_row = fold_rows.get(image_id)
        if fold_row is None:
            plan.skip(f"Images/{name}", "listed in bus_data.csv but not in 5-fold-cv.csv")
            continue
        fold = _flag(fold_row["kFold"], folds_path, image_id, "kFold")
        if fold not in range(1, NUM_FOLDS + 1):
            raise DataError(f"{folds_path}: kFold of {image_id} is {fold_row['kFold']!r}, expected 1..5")
        if fold_row.get("Pathology", pathology).lower() != pathology:
            plan.warnings.append(f"{image_id}: Pathology differs between bus_data.csv ({pathology}) and "
                                 f"5-fold-cv.csv ({fold_row['Pathology']}); bus_data.csv is used")
        fold_of[f"Images/{name}"] = fold
        mask_name = mask_names.get(f"mask_{image_id.removeprefix('bus_')}.png".lower())
        mask = None
        if mask_name is not None:
            plan.mask_files.append(f"Masks/{mask_name}")
            mask = MaskSpec("binary", f"Masks/{mask_name}", path=os.path.join(masks_dir, mask_name))
        plan.items.append(common.Item(path=os.path.join(images_dir, name), source=f"Images/{name}",
                                      label=CLASS_NAMES.index(pathology), subject=row["Case"],
                                      part=f"fold{fold}", mask=mask))
    common.unlisted_images(images_dir, [os.path.basename(i.source) for i in plan.items]
                           + [s["file"].split("/")[-1] for s in plan.skipped], root, plan, "bus_data.csv")
    for k in range(1, NUM_FOLDS + 1):
        splits = {"train": [], "validation": [], "test": []}
        for item in plan.items:
            image_id = os.path.splitext(os.path.basename(item.source))[0]
            if fold_of[item.source] == k:
                splits["test"].append(item.source)
                continue
            flag = _flag(fold_rows[image_id][f"valid_{k}"], folds_path, image_id, f"valid_{k}")
            if flag is None:
                plan.warnings.append(f"round {k}: {image_id} (fold {fold_of[item.source]}) has an empty "
                                     f"valid_{k}; left out of train and validation")
            else:
                splits["train" if flag == 1 else "validation"].append(item.source)
        plan.folds[str(k)] = splits
    _check(plan, fold_of)
    return plan


def _check(plan: common.Plan, fold_of: dict[str, int]) -> None:
    """Warns about patients in two folds and about counts that differ from the documented totals."""
    folds_of_patient: dict[str, set[int]] = defaultdict(set)
    for item in plan.items:
        folds_of_patient[item.subject].add(fold_of[item.source])
    for patient, folds in sorted(folds_of_patient.items()):
        if len(folds) > 1:
            plan.warnings.append(f"patient {patient} appears in folds {sorted(folds)}; the folds should be "
                                 f"patient-level")
    labels = Counter(CLASS_NAMES[i.label] for i in plan.items)
    found = {"images": len(plan.items), "patients": len(folds_of_patient), **labels}
    plan.warnings += common.count_warnings("BUS-BRA", found, DOCUMENTED)
    plan.warnings += common.count_warnings("BUS-BRA test", Counter(i.part for i in plan.items),
                                           DOCUMENTED_FOLD_SIZES)


class Busbra(builder.BenchmarkBuilder):
    """BUS-BRA (Gómez-Flores et al., Medical Physics 2024): 1875 breast ultrasound images of 1064 patients."""

    name = "busbra"
    CLASS_NAMES = CLASS_NAMES
    MASK_CLASS_NAMES = ("background", "lesion")
    CHANNELS = 1
    LICENSE = "CC BY 4.0"
    HOMEPAGE = "https://zenodo.org/records/8231412"
    DESCRIPTION = "BUS-BRA breast ultrasound, benign (0) vs malignant (1), official patient-level 5-fold CV."
    CITATION = """@article{gomezflores2024busbra,
  title={BUS-BRA: A Breast Ultrasound Dataset for Assessing Computer-aided Diagnosis Systems},
  author={G{\\'o}mez-Flores, Wilfrido and others}, journal={Medical Physics}, year={2024}}"""
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""Download BUSBRA.zip (133,917,740 bytes, MD5
1f8b2be6476d58fc97bfb5e5a1ea9bab) from Zenodo record 8231412 (CC BY 4.0), extract it and pass the folder (or
its parent) as --raw_dir. Expected layout:
{LAYOUT}"""

    def parse(self, raw_dir: str) -> common.Plan:
        return parse(raw_dir)
