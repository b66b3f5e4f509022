"""Benchmark converters on tiny mock trees that reproduce the documented layouts, quirks included."""

import argparse
import csv
import json
import os

import cv2
import numpy as np
import pytest

from data_prep.__main__ import main as data_prep_main
from data_prep.benchmarks import LayoutError, cli, convert, load_split, manifest, mock, split_ids
from data_prep.benchmarks import class_names as read_class_names


def write_image(path, seed, size=(12, 16), colour=False):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, (*size, 3) if colour else size, dtype=np.uint8)
    assert cv2.imwrite(path, image)


def ids_of(src):
    return sorted(src[i]["id"] for i in range(len(src)))


# ---------------------------------------------------------------- BUS-BRA


@pytest.fixture(scope="module")
def busbra(tmp_path_factory):
    raw = tmp_path_factory.mktemp("busbra_raw")
    base = mock.write_busbra_tree(str(raw), patients=12, size=24, seed=3)
    # Whitespace quirks: padded headers and values in both CSVs (BBOX keeps its quotes, as it holds commas).
    for name in ("bus_data.csv", "5-fold-cv.csv"):
        path = os.path.join(base, name)
        with open(path) as f:
            rows = list(csv.reader(f))
        with open(path, "w") as f:
            f.writelines(",".join(f'"{v}"' if "," in v else f" {v} " for v in row) + "\n" for row in rows)
    with open(os.path.join(base, "bus_data.csv")) as f:
        data = [{k.strip(): v.strip() for k, v in r.items()} for r in csv.DictReader(f)]
    with open(os.path.join(base, "5-fold-cv.csv")) as f:
        folds = {r["ID"]: r for r in ({k.strip(): v.strip() for k, v in r.items()} for r in csv.DictReader(f))}
    missing = data[1]["ID"]
    os.remove(os.path.join(base, "Images", f"{missing}.png"))
    write_image(os.path.join(base, "Images", "stray.png"), 0)
    out = str(tmp_path_factory.mktemp("busbra_out"))
    result = convert("busbra", str(raw), out)  # the parent of BUSBRA/
    return dict(base=base, data=data, folds=folds, missing=missing, out=out, manifest=result)


def test_busbra_labels_subjects_and_skips(busbra):
    out, data = busbra["out"], busbra["data"]
    expected = {f"Images/{r['ID']}.png": (int(r["Pathology"] == "malignant"), r["Case"]) for r in data
                if r["ID"] != busbra["missing"]}
    seen = {}
    for fold in range(1, 6):
        src = load_split(out, "busbra", "test", fold=fold)
        for i in range(len(src)):
            ex = src[i]
            assert ex["image"].dtype == np.uint8 and ex["image"].shape == (24, 24, 1)
            assert ex["source"] == ex["id"]
            seen[ex["id"]] = (ex["label"], ex["subject"])
    assert seen == expected
    assert read_class_names(out, "busbra") == ["benign", "malignant"]
    m = busbra["manifest"]
    assert m["records"] == len(expected)
    assert {"file": f"Images/{busbra['missing']}.png",
            "reason": "listed in bus_data.csv but missing from Images/"} in m["skipped"]
    assert {"file": "Images/stray.png", "reason": "not listed in bus_data.csv"} in m["skipped"]
    assert any(w.startswith("BUS-BRA images: found") and "documented 1875" in w for w in m["warnings"])
    assert not any(s.startswith("Masks/") for s in seen) and os.listdir(os.path.join(busbra["base"], "Masks"))
    assert set(m["source_hashes"]) == {"bus_data.csv", "5-fold-cv.csv"}


def test_busbra_official_folds(busbra):
    out, folds = busbra["out"], busbra["folds"]
    present = {f"Images/{r['ID']}.png": r for r in busbra["data"] if r["ID"] != busbra["missing"]}
    for k in range(1, 6):
        test = split_ids(out, "busbra", "test", fold=k)
        train = split_ids(out, "busbra", "train", fold=k)
        val = split_ids(out, "busbra", "validation", fold=k)
        ids = {s: folds[os.path.basename(s)[:-4]] for s in present}
        assert sorted(test) == sorted(s for s, r in ids.items() if r["kFold"] == str(k))
        assert sorted(train) == sorted(s for s, r in ids.items() if r[f"valid_{k}"] == "1")
        assert sorted(val) == sorted(s for s, r in ids.items() if r[f"valid_{k}"] == "0")
        assert len(test) + len(train) + len(val) == len(present)
    assert split_ids(out, "busbra", "test") == split_ids(out, "busbra", "test", fold=1)  # default fold 1
    # Patient-level folds: no patient in two test folds.
    fold_of_patient = {}
    for k in range(1, 6):
        for ex in load_split(out, "busbra", "test", fold=k):
            assert fold_of_patient.setdefault(ex["subject"], k) == k
    with pytest.raises(ValueError, match=r"no fold 7; folds are \['1', '2', '3', '4', '5'\]"):
        split_ids(out, "busbra", "test", fold=7)


def test_busbra_idempotent_and_layout_errors(busbra, tmp_path):
    again = convert("busbra", os.path.dirname(busbra["base"]), busbra["out"])
    assert again["status"].startswith("already converted")
    bad = tmp_path / "BUSBRA"
    bad.mkdir()
    (bad / "Images").mkdir()
    (bad / "bus_data.csv").write_text("ID,Case,Pathology\n")
    with pytest.raises(LayoutError, match=r"expected 5-fold-cv.csv under .*Expected layout:\nBUSBRA/"):
        convert("busbra", str(bad), str(tmp_path / "out"))
    with pytest.raises(LayoutError, match=r"bus_data\.csv not found"):
        convert("busbra", str(tmp_path / "BUSBRA" / "Images"), str(tmp_path / "out"))
    assert not (tmp_path / "out" / "busbra").exists()


# ---------------------------------------------------------------- MMOTU-2D

MMOTU_TRAIN = {1: 0, 2: 3, 3: 0, 4: 5, 5: 7, 6: 0, 7: 2, 8: 0, 9: 2, 10: 1, 11: 0, 12: 2}
MMOTU_VAL = {13: 1, 14: 4, 15: 6, 16: 0}


@pytest.fixture(scope="module")
def mmotu(tmp_path_factory):
    raw = tmp_path_factory.mktemp("mmotu_raw")
    root = raw / "OTU_2d"
    for n in [*MMOTU_TRAIN, *MMOTU_VAL]:
        if n == 16:
            continue  # listed in val_cls.txt, missing on disk
        write_image(str(root / "images" / f"{n}.JPG"), n, colour=n % 3 == 0)
        for suffix in ("", "_binary", "_binary_binary"):
            write_image(str(root / "annotations" / f"{n}{suffix}.PNG"), 100 + n)
    # Separators: several spaces, a tab, trailing spaces, a blank line.
    seps = ["  ", "\t", " ", "   "]
    (root / "train_cls.txt").write_text("".join(f"{n}.JPG{seps[n % 4]}{lab} \n" for n, lab in MMOTU_TRAIN.items()))
    (root / "val_cls.txt").write_text("\n".join(f"{n}.JPG {lab}" for n, lab in MMOTU_VAL.items()) + "\n\n")
    (root / "train.txt").write_text("".join(f"{n}\n" for n in MMOTU_TRAIN))
    (root / "val.txt").write_text("".join(f"{n}\n" for n in MMOTU_VAL))
    out = str(tmp_path_factory.mktemp("mmotu_out"))
    return dict(raw=str(raw), root=root, out=out, manifest=convert("mmotu", str(root), out))


def test_mmotu_labels_and_splits(mmotu):
    out = mmotu["out"]
    train_full = load_split(out, "mmotu", "train_full")
    assert {ex["id"]: ex["label"] for ex in train_full} == {f"images/{n}.JPG": lab for n, lab in MMOTU_TRAIN.items()}
    test = load_split(out, "mmotu", "test")
    assert {ex["id"]: ex["label"] for ex in test} == {f"images/{n}.JPG": MMOTU_VAL[n] for n in (13, 14, 15)}
    assert all(ex["image"].shape == (12, 16, 3) and ex["subject"] == "" for ex in test)
    train, val = split_ids(out, "mmotu", "train"), split_ids(out, "mmotu", "validation")
    assert sorted(train + val) == sorted(split_ids(out, "mmotu", "train_full")) and not set(train) & set(val)
    assert 1 <= len(val) <= 5
    m = mmotu["manifest"]
    assert m["skipped"] == [{"file": "images/16.JPG", "reason": "listed in val_cls.txt but missing from images/"}]
    assert any(w == "MMOTU-2D train chocolate_cyst: found 5, documented 226" for w in m["warnings"])
    assert read_class_names(out, "mmotu")[7] == "high_grade_serous"
    assert manifest(out, "mmotu")["records"] == 15  # annotations/ never ingested


def test_mmotu_bad_line_and_missing_list(tmp_path, mmotu):
    root = tmp_path / "OTU_2d"
    (root / "images").mkdir(parents=True)
    (root / "train_cls.txt").write_text("1.JPG 0\n2.JPG\n")
    with pytest.raises(ValueError, match=r"train_cls.txt:2: expected '<image> <label>'"):
        convert("mmotu", str(tmp_path), str(tmp_path / "out"))
    (root / "train_cls.txt").write_text("1.JPG 0\n")
    with pytest.raises(LayoutError, match=r"expected val_cls.txt under .*Expected layout:\nOTU_2d/"):
        convert("mmotu", str(tmp_path), str(tmp_path / "out"))


# ---------------------------------------------------------------- GIST514-DB

GIST_LABELS = {f"img{i:02d}.jpg": ("GIST" if i % 2 else "lmym") for i in range(10)}


def write_gist_variant(base, variant):
    folder, stem = {"roi": ("usd514_jpeg_roi", "anno_crop_split"), "raw": ("usd514_jpeg_raw", "anno_split")}[variant]
    root = base / folder
    names = sorted(GIST_LABELS)
    for i, name in enumerate(names):
        write_image(str(root / "images" / name), i, colour=True)
    (root / "annotations").mkdir(parents=True)
    # Categories in a shuffled order with ids that are not 0/1: they must be read by name.
    categories = [{"id": 7, "name": "GIST"}, {"id": 3, "name": "lmym"}]
    for k in range(5):
        for kind, members in (("val", names[2 * k:2 * k + 2]), ("train", names[:2 * k] + names[2 * k + 2:])):
            images = [{"file_name": n, "id": 50 + j, "height": 12, "width": 16, "anatomy_id": 1}
                      for j, n in enumerate(members)]
            anns = [{"id": j, "image_id": 50 + j, "category_id": 7 if GIST_LABELS[n] == "GIST" else 3,
                     "segmentation": [[0, 0, 5, 0, 5, 5]]} for j, n in enumerate(members)]
            path = root / "annotations" / f"{kind}_{stem}_{k}.json"
            path.write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
    return root


def test_gist514_both_variants(tmp_path):
    raw = tmp_path / "raw"
    write_gist_variant(raw, "roi")
    write_gist_variant(raw, "raw")
    out = str(tmp_path / "out")
    manifests = convert("gist514", str(raw), out, subset="both")
    assert set(manifests) == {"roi", "raw"} and manifests["raw"]["config"] == "raw"
    names = sorted(GIST_LABELS)
    for variant in ("roi", "raw"):
        assert read_class_names(out, "gist514", variant) == ["lmym", "GIST"]
        for k in range(5):
            test = load_split(out, "gist514", "test", fold=k, subset=variant)
            assert ids_of(test) == [f"images/{n}" for n in names[2 * k:2 * k + 2]]
            for ex in test:
                assert ex["label"] == int(GIST_LABELS[os.path.basename(ex["id"])] == "GIST")
            full = split_ids(out, "gist514", "train_full", fold=k, subset=variant)
            assert sorted(full) == [f"images/{n}" for n in names[:2 * k] + names[2 * k + 2:]]
            train, val = (split_ids(out, "gist514", s, fold=k, subset=variant) for s in ("train", "validation"))
            assert sorted(train + val) == sorted(full) and len(val) == 2  # one per class: both have >= 2
    first = load_split(out, "gist514", "test", fold=0)[0]
    assert first["image"].shape == (12, 16, 3)
    assert any(w == "GIST514-DB images: found 10, documented 514" for w in manifest(out, "gist514", "raw")["warnings"])


def test_gist514_missing_file_and_unknown_category(tmp_path):
    root = write_gist_variant(tmp_path, "raw")
    os.remove(root / "annotations" / "val_anno_split_3.json")
    with pytest.raises(LayoutError, match=r"expected annotations/val_anno_split_3.json under .*usd514_jpeg_raw/"):
        convert("gist514", str(tmp_path), str(tmp_path / "out"), subset="raw")
    with pytest.raises(LayoutError, match=r"val_anno_crop_split_0\.json not found"):
        convert("gist514", str(tmp_path), str(tmp_path / "out"), subset="roi")
    path = root / "annotations" / "train_anno_split_0.json"
    coco = json.loads(path.read_text())
    coco["categories"] = [{"id": 7, "name": "GIST"}, {"id": 3, "name": "schwannoma"}]
    path.write_text(json.dumps(coco))
    write_gist_variant(tmp_path / "again", "raw")
    (tmp_path / "again" / "usd514_jpeg_raw" / "annotations" / "train_anno_split_0.json").write_text(json.dumps(coco))
    with pytest.raises(ValueError, match=r"categories \['lmym'\] not found; the file has \['GIST', 'schwannoma'\]"):
        convert("gist514", str(tmp_path / "again"), str(tmp_path / "out"), subset="raw")


# ---------------------------------------------------------------- generic labelled set


def test_labelled_folders_skip_masks_and_split_by_class(tmp_path):
    src = tmp_path / "thyroid"
    for cls, count in (("benign", 10), ("malignant", 10)):
        for i in range(count):
            write_image(str(src / cls / f"{i}.png"), i)
        write_image(str(src / cls / "0_mask.png"), 99)
        write_image(str(src / cls / "masks" / "0.png"), 98)
    (src / "benign" / "notes.txt").write_text("x")
    out = str(tmp_path / "out")
    m = convert("labelled", str(src), out)
    assert m["class_names"] == ["benign", "malignant"] and m["records"] == 20
    reasons = {s["file"]: s["reason"] for s in m["skipped"]}
    assert reasons["benign/0_mask.png"].startswith("looks like a mask")
    assert reasons["malignant/masks/0.png"].startswith("looks like a mask")
    assert reasons["benign/notes.txt"] == "not an image file"
    splits = {s: load_split(out, "labelled", s) for s in ("train", "validation", "test")}
    assert [len(s) for s in splits.values()] == [14, 2, 4]
    for s in splits.values():
        assert sorted(np.bincount(s.labels, minlength=2)) == [len(s) // 2] * 2  # stratified
    ex = splits["test"][0]
    assert ex["image"].shape == (12, 16, 1) and ex["label"] == int(ex["id"].startswith("malignant/"))
    assert load_split(out, "labelled", "test", channels=3)[0]["image"].shape == (12, 16, 3)


def test_labelled_csv_subject_level_and_cli(tmp_path, capsys):
    images = tmp_path / "data"
    rows = ["path,label,subject"]
    for i in range(24):
        write_image(str(images / f"{i}.png"), i, colour=True)
        rows.append(f"data/{i}.png,view{i % 3},patient{i // 2}")
    rows.append("data/missing.png,view0,patient99")
    (tmp_path / "set.csv").write_text("\n".join(rows) + "\n")
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser, "labelled")
    args = parser.parse_args(["--src", str(tmp_path / "set.csv"), "--out_dir", str(tmp_path / "out"),
                              "--name", "views"])
    assert cli.run(args, "labelled") == 0
    assert "labelled: converted, 24 records" in capsys.readouterr().out
    out = str(tmp_path / "out")
    subject_split = {}
    for split in ("train", "validation", "test"):
        for ex in load_split(out, "labelled", split):
            assert subject_split.setdefault(ex["subject"], split) == split  # no subject in two splits
    assert {ex["label"] for ex in load_split(out, "labelled", "test")} == {0, 1, 2}
    assert manifest(out, "labelled")["skipped"] == [{"file": "data/missing.png", "reason": "listed but missing"}]
    assert data_prep_main(["labelled", "--src", str(tmp_path / "nothing"), "--out_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"python -m data_prep labelled: {tmp_path / 'nothing'} does not exist. Expected layout:")
    assert len(err.splitlines()) == 1


def test_labelled_folds_are_subject_level_stratified_and_cover_everything_once(tmp_path):
    """A DDTI-like segmentation set (one class, masks of the same names in another folder, no split column) and a
    CSV with subjects: --folds K gives K rounds whose test folds partition the set, with no subject straddling
    a fold and each class spread over the folds."""
    images = tmp_path / "data"
    rows = ["path,label,subject"]
    for i in range(30):
        write_image(str(images / f"{i}.png"), i)
        rows.append(f"data/{i}.png,{'ab'[(i // 3) % 2]},patient{i // 3}")  # 10 patients of 3 images, 5 per class
    (tmp_path / "set.csv").write_text("\n".join(rows) + "\n")
    out = str(tmp_path / "out")
    m = convert("labelled", str(tmp_path / "set.csv"), out, folds=3, seed=1)
    assert m["records"] == 30 and m["options"]["folds"] == 3 and sorted(m["counts"]["splits"]) == ["1", "2", "3"]
    tests = [load_split(out, "labelled", "test", fold=k) for k in (1, 2, 3)]
    assert sorted(i for t in tests for i in t.ids) == sorted(f"data/{i}.png" for i in range(30))
    fold_of_subject = {}
    for k, test in enumerate(tests, 1):
        assert set(test.labels) == {0, 1} and len(test) in (9, 12)  # 3 or 4 whole patients, both classes
        for index in range(len(test)):
            assert fold_of_subject.setdefault(test[index]["subject"], k) == k
        train, validation = (load_split(out, "labelled", s, fold=k) for s in ("train", "validation"))
        assert set(train.ids).isdisjoint(validation.ids) and len(train) + len(validation) + len(test) == 30
        assert set(train.ids).isdisjoint(test.ids)
    assert load_split(out, "labelled", "test").ids == tests[0].ids  # the default round is 1
    again = convert("labelled", str(tmp_path / "set.csv"), str(tmp_path / "again"), folds=3, seed=1)
    assert again["counts"]["splits"] == m["counts"]["splits"]
    with pytest.raises(ValueError, match=r"was converted with .*.folds.: 3.*, not .*.folds.: 4"):
        convert("labelled", str(tmp_path / "set.csv"), out, folds=4, seed=1)


def test_labelled_csv_names_masks_outside_its_folder(tmp_path):
    """DDTI's layout: the CSV lives apart from the release and names images and masks by absolute paths, the masks
    in `mask/` under the images' own names. The masks are kept (they once were silently ignored)."""
    raw = tmp_path / "ddti" / "1_or_data"
    (raw / "mask").mkdir(parents=True)
    rows = ["path,label,mask"]
    for i in range(1, 7):
        write_image(str(raw / "image" / f"{i}.PNG"), i)
        mask = np.zeros((12, 16), np.uint8)
        mask[3:8, 4:10] = 255
        assert cv2.imwrite(str(raw / "mask" / f"{i}.PNG"), mask)
        rows.append(f"{raw / 'image' / f'{i}.PNG'},nodule,{raw / 'mask' / f'{i}.PNG'}")
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "ddti.csv").write_text("\n".join(rows) + "\n")
    m = convert("labelled", str(tmp_path / "lists" / "ddti.csv"), str(tmp_path / "out"), folds=2,
                mask_classes=("nodule",))
    assert m["masks"]["class_names"] == ["background", "nodule"] and m["masks"]["records_with_mask"] == 6
    example = load_split(str(tmp_path / "out"), "labelled", "test", fold=1)[0]
    assert example["has_mask"] and int(example["mask"].sum()) == 5 * 6
