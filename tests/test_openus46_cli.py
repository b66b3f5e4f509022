"""`python -m data_prep openus46` end to end: --list, missing folders, the summary, the known cross-dataset
duplicate groups, hold-out by a benchmark test split's hashes, and resuming after an interrupted run."""

from __future__ import annotations

import argparse
import json
import os

import cv2
import numpy as np
import pytest
from openus46_mocks import build
from test_dedup import smooth_image
from test_openus46_datasets import read_records

from data_prep.__main__ import main as data_prep_main
from data_prep.openus46 import cli, convert


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return cli.run(parser.parse_args(argv))


def _write(path, image):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cv2.imwrite(str(path), image)


def test_list_shows_all_46_and_which_folders_exist(tmp_path, capsys):
    (tmp_path / "hc18").mkdir()
    assert run_cli(["--list", "--raw_dir", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| key")]
    assert len(rows) == 46
    assert "| hc18 | HC (HC18) | fetal head | PNG (gray) | F2 | CC BY 4.0 | found |" in table
    assert "| bus_bra | BUS-BRA (held out) |" in table and table.count("| missing |") == 45


def test_missing_dataset_prints_expected_path(tmp_path, capsys):
    raw, out = tmp_path / "raw", tmp_path / "out"
    build("hc18", str(raw))
    assert run_cli(["--raw_dir", str(raw), "--out_dir", str(out), "--datasets", "hc18,upbd", "--no_progress"]) == 0
    err = capsys.readouterr().err
    assert f"upbd: RAW/upbd/ not found; expected the extracted UPBD (UBPD) at {raw / 'upbd'}" in err
    summary = json.loads((out / "openus46_summary.json").read_text())
    assert [(r["key"], r["status"], r["images"]) for r in summary["datasets"]] == [
        ("hc18", "converted", 3), ("upbd", "missing", 0)]
    assert "| hc18 | converted | 3 |" in (out / "openus46_summary.md").read_text()


def test_bad_dataset_key_is_an_error(tmp_path, capsys):
    assert data_prep_main(["openus46", "--raw_dir", str(tmp_path), "--out_dir", str(tmp_path / "out"),
                           "--datasets", "hc19"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m data_prep openus46: --datasets: unknown OpenUS-46 dataset 'hc19'; valid keys:")
    assert len(err.splitlines()) == 1 and not (tmp_path / "out").exists()


def test_rar_only_dataset_fails_with_instructions(tmp_path, capsys):
    raw, out = tmp_path / "raw", tmp_path / "out"
    (raw / "fast_u_net" / "Dataset" / "HC").mkdir(parents=True)
    (raw / "fast_u_net" / "Dataset" / "HC" / "HC_image1.rar").write_bytes(b"Rar!")
    assert data_prep_main(["openus46", "--raw_dir", str(raw), "--out_dir", str(out), "--datasets", "fast_u_net",
                           "--no_progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("python -m data_prep openus46: 1 of 1 datasets failed")
    assert "unrar x 'HC_image1.rar'" in err and str(out / "openus46_summary.md") in err
    row = json.loads((out / "openus46_summary.json").read_text())["datasets"][0]
    assert row["status"] == "no inputs" and "unrar x 'HC_image1.rar'" in row["message"]
    assert not (out / "fast_u_net" / "manifest.json").exists()


def _known_group_tree(raw):
    """HC18 and FETAL_PLANES_DB originals, and the copies that Fast-U-Net, Ultrasound Fetus and DFHI hold."""
    hc_a, hc_b, planes = smooth_image(10), smooth_image(11), smooth_image(12, 72, 96)
    _write(raw / "hc18/training_set/001_HC.png", hc_a)
    _write(raw / "hc18/training_set/002_HC.png", hc_b)
    _write(raw / "fast_u_net/Dataset/HC/resized_data/image/001_HC.png", cv2.resize(hc_a, (56, 40)))
    _write(raw / "fast_u_net/Dataset/AC/resized_data/image/1.png", smooth_image(13))  # unique
    _write(raw / "ultrasound_fetus/UFD/Data/Data/train/benign/002_HC.png", hc_b)  # exact copy
    diverse = np.stack([cv2.resize(hc_a, (120, 83))] * 3, -1)  # resized, stored as RGB
    _write(raw / "dfhi/Diverse Fetal Head Images/Orginal_train_images_to_959_661/d1.png", diverse)
    rgba = np.dstack([planes, planes, planes, np.full_like(planes, 255)])
    _write(raw / "fetal_planes_db/Images/Patient00001_Plane1_1_of_1.png", rgba)
    _write(raw / "dfhi/Trans-thalamic/Trans-thalamic/tt1.png", np.stack([planes] * 3, -1))
    _write(raw / "dfhi/Trans-thalamic/Trans-thalamic/tt2.png", smooth_image(14))  # unique


def test_known_duplicate_groups_collapse(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    _known_group_tree(raw)
    keys = "dfhi,fast_u_net,ultrasound_fetus,hc18,fetal_planes_db"
    assert run_cli(["--raw_dir", str(raw), "--out_dir", str(out), "--datasets", keys, "--no_progress"]) == 0
    summary = json.loads((out / "openus46_summary.json").read_text())
    rows = {row["key"]: row for row in summary["datasets"]}
    assert [row["key"] for row in summary["datasets"]][:2] == ["hc18", "fetal_planes_db"]
    assert {k: (r["images"], r["duplicates_removed"]) for k, r in rows.items()} == {
        "hc18": (2, 0), "fetal_planes_db": (1, 0), "fast_u_net": (1, 1), "ultrasound_fetus": (0, 1),
        "dfhi": (1, 2)}
    dropped = {}
    for key in rows:
        manifest = json.loads((out / key / "manifest.json").read_text())
        dropped.update({d["source"]: d["reason"] for d in manifest["dropped"]})
    assert dropped["UFD/Data/Data/train/benign/002_HC.png"] == "exact duplicate of hc18:training_set/002_HC.png"
    assert dropped["Dataset/HC/resized_data/image/001_HC.png"].endswith("of hc18:training_set/001_HC.png")
    assert dropped["Diverse Fetal Head Images/Orginal_train_images_to_959_661/d1.png"].endswith(
        "of hc18:training_set/001_HC.png")
    assert dropped["Trans-thalamic/Trans-thalamic/tt1.png"].endswith(
        "of fetal_planes_db:Images/Patient00001_Plane1_1_of_1.png")
    assert [r["source"] for r in read_records(str(out), "dfhi")] == ["Trans-thalamic/Trans-thalamic/tt2.png"]


def test_holdout_by_benchmark_test_split_hashes(tmp_path):
    raw, out, split = tmp_path / "raw", tmp_path / "out", tmp_path / "busbra_test"
    test_image = smooth_image(20)
    _write(split / "bus_0001-l.png", test_image)
    _write(raw / "breast/BrEaST-Lesions_USG-images_and_masks/case001.png", test_image)  # leaked copy
    _write(raw / "breast/BrEaST-Lesions_USG-images_and_masks/case002.png", smooth_image(21))
    assert run_cli(["--raw_dir", str(raw), "--out_dir", str(out), "--datasets", "breast", "--no_progress",
                    "--holdout_hashes", str(split)]) == 0
    row = json.loads((out / "openus46_summary.json").read_text())["datasets"][0]
    assert (row["images"], row["held_out_matches"], row["duplicates_removed"]) == (1, 1, 0)
    manifest = json.loads((out / "breast" / "manifest.json").read_text())
    assert manifest["dropped"] == [{"source": "BrEaST-Lesions_USG-images_and_masks/case001.png", "frame": -1,
                                    "reason": "held out: identical to an image of busbra_test"}]


def test_resume_after_an_interrupted_run(tmp_path, monkeypatch):
    raw, out = tmp_path / "raw", tmp_path / "out"
    _known_group_tree(raw)
    args = ["--raw_dir", str(raw), "--out_dir", str(out), "--datasets", "hc18,ultrasound_fetus", "--no_progress"]
    real_load = convert.load_file

    def crash_on_fetus(task):
        if task[1] == "ultrasound_fetus":
            raise KeyboardInterrupt  # the user stops the run in the middle of the second dataset
        return real_load(task)

    monkeypatch.setattr(convert, "load_file", crash_on_fetus)
    with pytest.raises(KeyboardInterrupt):
        run_cli(args)
    hc18_manifest = (out / "hc18" / "manifest.json").read_text()
    assert not (out / "ultrasound_fetus" / "manifest.json").exists()
    monkeypatch.setattr(convert, "load_file", real_load)
    assert run_cli(args) == 0
    assert (out / "hc18" / "manifest.json").read_text() == hc18_manifest  # finished dataset not redone
    rows = json.loads((out / "openus46_summary.json").read_text())["datasets"]
    assert [(r["key"], r["status"], r["images"], r["duplicates_removed"]) for r in rows] == [
        ("hc18", "already converted", 2, 0), ("ultrasound_fetus", "converted", 0, 1)]  # dedup survives resume
    assert run_cli(args) == 0
    rows = json.loads((out / "openus46_summary.json").read_text())["datasets"]
    assert [r["status"] for r in rows] == ["already converted", "already converted"]
    assert rows[1]["duplicates_removed"] == 1
