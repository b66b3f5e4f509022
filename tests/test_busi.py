"""BUSI: a mock tree with the release's exact names and quirks, converted by `python -m data_prep busi`.

The mock (data_prep.benchmarks.mock.write_busi_tree) writes `benign (N).png` beside `benign (N)_mask.png`, one
lesion split over `_mask`, `_mask_1` and `_mask_2`, a duplicate within a class, a duplicate across classes, and
empty normal masks; the tests check each against the records, the splits and the manifest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from configs import finetune, segment
from data_prep.__main__ import main as data_prep_main
from data_prep.benchmarks import busi, convert, load_split, manifest, mock
from usf_mae_jax.data import downstream
from usf_mae_jax.data import segmentation as segdata

REPO = Path(__file__).resolve().parents[1]
PER_CLASS = (9, 6, 5)  # benign, malignant, normal files; 7 + 5 + 5 images once the duplicates are out
SUBSETS = ("three_class", "benign_malignant")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    raw = tmp_path_factory.mktemp("busi")
    base = mock.write_busi_tree(str(raw), per_class=PER_CLASS, size=20, seed=1)
    out = str(tmp_path_factory.mktemp("busi_out"))
    return dict(base=base, out=out, manifests=convert("busi", str(raw), out, subset="both"))


def records(out, subset, split="test", fold=1):
    return {item["id"]: item for item in load_split(out, "busi", split, fold=fold, subset=subset)}


def every_record(out, subset):
    return {i: item for k in range(1, 6) for i, item in records(out, subset, fold=k).items()}


def mask_file(base, name):
    return np.asarray(Image.open(os.path.join(base, name)).convert("L")) > 0


def test_names_with_spaces_and_parentheses_and_multi_mask_union(tree):
    items = every_record(tree["out"], "three_class")
    expected = ({f"benign/benign ({n}).png" for n in (1, 2, 4, 5, 6, 7, 8)}
                | {f"malignant/malignant ({n}).png" for n in range(1, 6)}
                | {f"normal/normal ({n}).png" for n in range(1, 6)})
    assert set(items) == expected
    union = np.zeros_like(mask_file(tree["base"], "benign/benign (2)_mask.png"))
    for suffix in ("", "_1", "_2"):
        part = mask_file(tree["base"], f"benign/benign (2)_mask{suffix}.png")
        assert part.any() and not (part & union).any()  # three disjoint pieces of one lesion
        union |= part
    np.testing.assert_array_equal(items["benign/benign (2).png"]["mask"], union)
    assert items["benign/benign (2).png"]["has_mask"]
    for record_id, item in items.items():
        assert item["label"] == busi.CLASS_NAMES.index(record_id.split("/")[0]) and item["subject"] == ""
        assert item["image"].shape[:2] == item["mask"].shape and item["image"].shape[2] == 1
    assert tree["manifests"]["three_class"]["multi_mask_images"] == [
        {"image": "benign/benign (2).png",
         "masks": [f"benign/benign (2)_mask{s}.png" for s in ("", "_1", "_2")]}]


def test_normal_images_keep_their_empty_masks(tree):
    normal = {i: item for i, item in every_record(tree["out"], "three_class").items() if i.startswith("normal/")}
    assert len(normal) == 5
    assert all(item["has_mask"] and not item["mask"].any() for item in normal.values())
    lesions = [item for i, item in every_record(tree["out"], "three_class").items() if not i.startswith("normal/")]
    assert all(item["has_mask"] and item["mask"].any() for item in lesions)


def test_duplicates_are_removed_and_reported(tree):
    m = tree["manifests"]["three_class"]
    assert m["duplicates"]["groups"] == [
        {"kept": "benign/benign (1).png", "dropped": ["benign/benign (9).png"], "class": "benign"}]
    assert m["duplicates"]["label_conflicts"] == [
        {"files": ["benign/benign (3).png", "malignant/malignant (6).png"], "classes": ["benign", "malignant"],
         "action": "every copy left out"}]
    reasons = {s["file"]: s["reason"] for s in m["skipped"]}
    assert reasons["benign/benign (9).png"] == "exact duplicate of benign/benign (1).png (same decoded pixels)"
    assert "with another class" in reasons["benign/benign (3).png"]
    assert "with another class" in reasons["malignant/malignant (6).png"]
    counts = m["accounting"]
    files = sum(len(files) for _, _, files in os.walk(tree["base"]))
    assert counts == {"inputs": files, "converted": 17, "skipped": 3, "not_converted": files - 20}
    assert set(m["not_converted"]) == {"mask"}
    assert m["counts"]["labels"] == {"benign": 7, "malignant": 5, "normal": 5}


def test_folds_are_stratified_disjoint_and_cover_everything(tree):
    out = tree["out"]
    tests, labels = [], {}
    for k in range(1, 6):
        test, train, validation = (records(out, "three_class", s, k) for s in ("test", "train", "validation"))
        tests.append(set(test))
        assert not (set(test) & set(train)) and not (set(test) & set(validation)) and not (set(train) & set(validation))
        assert len(test) + len(train) + len(validation) == 17
        assert {item["label"] for item in validation.values()} == {0, 1, 2}  # every class validates
        labels.update({i: item["label"] for i, item in test.items()})
    assert set().union(*tests) == set(labels) and sum(map(len, tests)) == 17  # disjoint, covering all
    for label, size in ((0, 7), (1, 5), (2, 5)):
        per_fold = [sum(labels[i] == label for i in fold) for fold in tests]
        assert max(per_fold) - min(per_fold) <= 1 and sum(per_fold) == size  # each class spread evenly
    sizes = [len(fold) for fold in tests]
    assert max(sizes) - min(sizes) <= 1


def test_benign_malignant_shares_the_folds_without_normal(tree):
    out = tree["out"]
    for k in range(1, 6):
        for split in ("train", "validation", "test"):
            three = records(out, "three_class", split, k)
            two = records(out, "benign_malignant", split, k)
            assert set(two) == {i for i, item in three.items() if item["label"] != 2}
            assert all(two[i]["label"] == three[i]["label"] for i in two)
    m = tree["manifests"]["benign_malignant"]
    assert m["class_names"] == ["benign", "malignant"] and m["records"] == 12
    assert {s["file"] for s in m["skipped"] if "benign_malignant" in s["reason"]} == {
        f"normal/normal ({n}).png" for n in range(1, 6)}


def test_folds_are_deterministic_for_a_seed(tree):
    first = busi.survey(tree["base"], folds=5, seed=0)
    again = busi.survey(tree["base"], folds=5, seed=0)
    other = busi.survey(tree["base"], folds=5, seed=1)
    assert first.folds == again.folds
    assert [i.part for i in first.items] == [i.part for i in again.items]
    assert [i.part for i in first.items] != [i.part for i in other.items]
    three = busi.survey(tree["base"], folds=3, seed=0)
    assert sorted(three.folds) == ["1", "2", "3"]


def test_a_normal_mask_with_lesion_pixels_is_a_warning(tmp_path):
    base = mock.write_busi_tree(str(tmp_path), per_class=(4, 2, 2), size=16, seed=0, quirks=False)
    path = os.path.join(base, "normal", "normal (2)_mask.png")
    marked = np.zeros_like(np.asarray(Image.open(path)))
    marked[3:6, 3:6] = 255
    Image.fromarray(marked).save(path)
    assert busi.survey(base).warnings[-1] == ("1 normal images have masks with lesion pixels (stored as given): "
                                              "['normal/normal (2).png']")


def test_cli_summary_options_and_one_line_errors(tree, tmp_path, capsys):
    out = str(tmp_path / "out")
    args = ["busi", "--raw_dir", os.path.dirname(tree["base"]), "--out_dir", out, "--folds", "3", "--seed", "2",
            "--subset", "three_class"]
    assert data_prep_main(args) == 0
    printed = capsys.readouterr().out.splitlines()
    assert "busi/three_class: converted, 17 records, classes ['benign', 'malignant', 'normal']" in printed
    assert [line.split(":")[0] for line in printed if line.startswith("  fold ")] == ["  fold 1", "  fold 2",
                                                                                       "  fold 3"]
    assert ("  exact duplicates within a class, first copy kept: 1: benign/benign (1).png = benign/benign (9).png"
            in printed)
    assert ("  exact duplicates with different classes, every copy left out: 1: benign/benign (3).png = "
            "malignant/malignant (6).png") in printed
    assert "  images with several lesion masks (united): 1" in printed
    assert manifest(out, "busi")["options"]["folds"] == 3
    # The same folder asked for other folds is refused in one line rather than silently reused.
    assert data_prep_main([*args[:5], "--folds", "4", "--subset", "three_class"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was converted with" in err[0] and "--overwrite" in err[0]
    assert data_prep_main(["busi", "--raw_dir", str(tmp_path / "nope"), "--out_dir", str(tmp_path / "new")]) == 2
    assert capsys.readouterr().err.startswith(f"python -m data_prep busi: {tmp_path / 'nope'} is not a directory")
    assert data_prep_main(["busi", "--raw_dir", tree["base"], "--out_dir", out, "--folds", "1"]) == 2
    assert "expected at least 2 folds, got '1'" in capsys.readouterr().err


def test_finetune_and_segment_presets_read_the_conversion(tree):
    out = tree["out"]
    three = finetune.get_config("busi,runlocal")
    data = downstream.load_benchmark(out, three.dataset, three.fold, three.subset)
    assert data.class_names == ["benign", "malignant", "normal"]
    assert sum(len(s) for s in data.splits.values()) == 17
    two = finetune.get_config("busi,subset=benign_malignant,fold=3,mode=linear")
    data = downstream.load_benchmark(out, two.dataset, two.fold, two.subset)
    assert data.class_names == ["benign", "malignant"] and set(data.splits["test"].labels) <= {0, 1}
    seg = segment.get_config("busi,runlocal")
    assert seg.subset == "benign_malignant"
    lesions = segdata.load_segmentation(out, seg.dataset, seg.fold, seg.subset, seg.classes)
    assert sum(len(s) for s in lesions.splits.values()) == 12
    assert all(mask.any() for s in lesions.splits.values() for mask in s.masks)
    with_normal = segdata.load_segmentation(out, "busi", None, "three_class", "binary")
    assert sum(len(s) for s in with_normal.splits.values()) == 17  # normal images, all-background masks
    assert with_normal.left_out == {s: {"no_mask": 0, "mask_dropped": 0} for s in ("train", "validation", "test")}


def test_launch_prints_the_busi_configs():
    for path, expected in (("configs/finetune.py:busi,subset=benign_malignant,runlocal", "benign_malignant"),
                           ("configs/segment.py:busi,subset=three_class,runlocal", "three_class")):
        result = subprocess.run([sys.executable, "launch.py", f"--config={path}", "--print_config"], cwd=REPO,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        config = json.loads(result.stdout)
        assert (config["dataset"], config["subset"]) == ("busi", expected)
