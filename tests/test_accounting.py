"""Nothing vanishes from a manifest: inputs = converted + skipped + not_converted for every converter.

Each source tree holds the symlinks users' dataset folders really have (a folder linked from elsewhere, a
second path to a folder, a link to an ancestor, a dangling link, two links pointing at each other) next to
images, masks and notes, and each test states by hand where every entry must end up.
(The 46 OpenUS-46 mock layouts are checked the same way in test_openus46_datasets.py.)
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import cv2
import numpy as np
from test_benchmarks import write_gist_variant

from data_prep import synthetic, writer
from data_prep.__main__ import main as data_prep_main
from data_prep.benchmarks import convert, mock
from data_prep.openus46.convert import ConvertOptions, convert_dataset
from data_prep.openus46.registry import REGISTRY


def write_image(path: Path, value: int = 60) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.full((6, 8), value, np.uint8) + np.eye(6, 8, dtype=np.uint8))


def add_symlink_faults(root: Path, outside: Path) -> None:
    """The symlinks every test tree gets, all relative to `root`."""
    write_image(outside / "linked.png", 90)
    os.symlink(outside, root / "from_elsewhere")  # followed
    os.symlink("missing.png", root / "dangling.png")
    os.symlink("loop_b.png", root / "loop_a.png")
    os.symlink("loop_a.png", root / "loop_b.png")


def check_counts(manifest: dict) -> dict:
    counts = manifest["accounting"]
    assert counts["inputs"] == counts["converted"] + counts["skipped"] + counts["not_converted"]
    assert manifest["inputs"] == counts["inputs"]
    assert counts["not_converted"] == sum(len(paths) for paths in manifest["not_converted"].values())
    return counts


def test_folder_converter(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    write_image(src / "a.png")
    write_image(src / "sub" / "b.png", 70)
    write_image(src / "sub" / "b_mask.png", 255)
    (src / "empty.png").write_bytes(b"")
    (src / "notes.txt").write_text("x")
    (src / ".DS_Store").write_bytes(b"\0")
    os.symlink("sub", src / "same_as_sub")  # a second path to sub/: its images are written once
    os.symlink("..", src / "sub" / "up")  # a link to an ancestor
    add_symlink_faults(src, tmp_path / "outside")
    assert data_prep_main(["folder", "--src", str(src), "--out_dir", str(out), "--name", "f", "--workers", "1",
                           "--no_progress"]) == 0
    manifest = writer.read_manifest(out / "f")
    assert check_counts(manifest) == {"inputs": 12, "converted": 3, "skipped": 1, "not_converted": 8}
    assert sorted(manifest["source_hashes"]) == ["a.png", "from_elsewhere/linked.png", "sub/b.png"]
    assert [entry["input"] for entry in manifest["skipped"]] == [str(src / "empty.png")]
    assert manifest["not_converted"] == {
        "broken_symlink": ["dangling.png"], "duplicate_folder_link": ["same_as_sub"],
        "excluded": ["sub/b_mask.png"], "hidden": [".DS_Store"], "not_an_image_extension": ["notes.txt"],
        "symlink_loop": ["loop_a.png", "loop_b.png", "sub/up"]}


def test_synthetic_converter(tmp_path):
    parser = argparse.ArgumentParser()
    synthetic.add_arguments(parser)
    args = parser.parse_args(["--out_dir", str(tmp_path), "--count", "5", "--size", "16", "--workers", "1",
                              "--no_progress"])
    assert synthetic.run(args) == 0
    manifest = writer.read_manifest(tmp_path / "synthetic")
    assert check_counts(manifest) == {"inputs": 5, "converted": 5, "skipped": 0, "not_converted": 0}


def yields_nothing_for_odd_tasks(task):
    if task % 2 == 0:
        yield writer.Example(image=np.full((4, 4), task, np.uint8), source=f"{task}.png")


def test_writer_counts_a_loader_that_yields_nothing(tmp_path):
    manifest = writer.write_dataset(tmp_path, "w", range(4), yields_nothing_for_odd_tasks, progress=False,
                                    not_converted={"excluded": ["x.png"], "empty_category": []})
    assert check_counts(manifest) == {"inputs": 5, "converted": 2, "skipped": 2, "not_converted": 1}
    assert manifest["skipped"] == [{"input": "1", "reason": "the loader yielded no image"},
                                   {"input": "3", "reason": "the loader yielded no image"}]
    assert manifest["not_converted"] == {"excluded": ["x.png"]}


def test_openus46_converter(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    root = raw / "hc18"
    write_image(root / "training_set" / "001_HC.png")
    write_image(root / "training_set" / "001_HC_Annotation.png", 255)
    (root / "training_set" / "002_HC.png").write_bytes(b"not a png")
    (root / "training_set_pixel_size_and_HC.csv").write_text("filename,pixel size\n")
    os.symlink(tmp_path / "outside", root / "test_set")  # the test images live elsewhere: followed
    write_image(tmp_path / "outside" / "500_HC.png", 80)
    os.symlink("missing_HC.png", root / "training_set" / "003_HC.png")  # matches the include glob
    os.symlink("training_set", root / "copy_of_training_set")
    row = convert_dataset(REGISTRY["hc18"], ConvertOptions(raw_dir=str(raw), out_dir=str(out), progress=False),
                          dedup=None)
    assert row["status"] == "converted" and row["images"] == 2
    manifest = json.loads((out / "hc18" / "manifest.json").read_text())
    assert check_counts(manifest) == {"inputs": 7, "converted": 2, "skipped": 1, "not_converted": 4}
    assert sorted(manifest["source_hashes"]) == ["test_set/500_HC.png", "training_set/001_HC.png"]
    assert [os.path.relpath(s["input"], root) for s in manifest["skipped"]] == ["training_set/002_HC.png"]
    assert manifest["not_converted"] == {
        "broken_symlink": ["training_set/003_HC.png"], "duplicate_folder_link": ["copy_of_training_set"],
        "not_included": ["training_set/001_HC_Annotation.png", "training_set_pixel_size_and_HC.csv"]}


def test_busbra_benchmark(tmp_path):
    base = Path(mock.write_busbra_tree(str(tmp_path / "raw"), patients=10, size=16, seed=1))
    images = sorted(p.name for p in (base / "Images").iterdir())
    masks = sorted(p.name for p in (base / "Masks").iterdir())
    (base / "README.txt").write_text("about the data")
    os.symlink("nowhere", base / "Images" / "bus_9999-l.png")  # not in bus_data.csv, and dangling
    add_symlink_faults(base, tmp_path / "outside")
    manifest = convert("busbra", str(base), str(tmp_path / "out"))
    counts = check_counts(manifest)
    assert counts == {"inputs": len(images) + len(masks) + 8, "converted": len(images), "skipped": 1,
                      "not_converted": len(masks) + 7}
    assert manifest["skipped"] == [{"file": "Images/bus_9999-l.png", "reason": "not listed in bus_data.csv"}]
    assert manifest["not_converted"] == {
        "broken_symlink": ["dangling.png"], "mask": [f"Masks/{m}" for m in masks],
        "metadata": ["5-fold-cv.csv", "bus_data.csv"],
        "not_an_input": ["README.txt", "from_elsewhere/linked.png"],
        "symlink_loop": ["loop_a.png", "loop_b.png"]}


def test_mmotu_benchmark(tmp_path):
    root = tmp_path / "OTU_2d"
    labels = {1: 0, 2: 3, 3: 5, 4: 1, 5: 0, 6: 2}
    for n in labels:
        write_image(root / "images" / f"{n}.JPG", 10 * n)
        write_image(root / "annotations" / f"{n}_binary.PNG", 255)
    (root / "train_cls.txt").write_text("".join(f"{n}.JPG {labels[n]}\n" for n in (1, 2, 3, 4)))
    (root / "val_cls.txt").write_text("5.JPG 0\n6.JPG 2\n7.JPG 1\n")  # 7 is listed but missing
    manifest = convert("mmotu", str(root), str(tmp_path / "out"))
    assert check_counts(manifest) == {"inputs": 15, "converted": 6, "skipped": 1, "not_converted": 8}
    assert manifest["not_converted"] == {  # the binary masks are stored in their images' records
        "mask": [f"annotations/{n}_binary.PNG" for n in labels], "metadata": ["train_cls.txt", "val_cls.txt"]}


def test_gist514_benchmark(tmp_path):
    root = write_gist_variant(tmp_path, "roi")
    (root / "images" / "stray.jpg").write_bytes(b"")
    manifest = convert("gist514", str(tmp_path), str(tmp_path / "out"), subset="roi")
    assert check_counts(manifest) == {"inputs": 21, "converted": 10, "skipped": 1, "not_converted": 10}
    assert manifest["skipped"] == [{"file": "images/stray.jpg", "reason": "not listed in the COCO files"}]
    assert sorted(manifest["not_converted"]) == ["metadata"]


def test_labelled_folders(tmp_path):
    src = tmp_path / "views"
    for cls in ("a4c", "plax"):
        for i in range(5):
            write_image(src / cls / f"{i}.png", 20 * i + (cls == "plax"))
    write_image(src / "a4c" / "0_mask.png", 255)
    os.symlink(tmp_path / "more_plax", src / "plax" / "more")  # followed
    write_image(tmp_path / "more_plax" / "5.png", 200)
    os.symlink("nowhere.png", src / "a4c" / "gone.png")
    (src / "notes.txt").write_text("x")  # not in a class folder
    manifest = convert("labelled", str(src), str(tmp_path / "out"))
    assert check_counts(manifest) == {"inputs": 14, "converted": 11, "skipped": 2, "not_converted": 1}
    assert {s["file"]: s["reason"] for s in manifest["skipped"]} == {
        "a4c/0_mask.png": "looks like a mask (name or folder); masks are never inputs",
        "a4c/gone.png": "cannot be read as a file (broken symlink)"}
    assert manifest["not_converted"] == {"not_an_input": ["notes.txt"]}


def test_labelled_csv(tmp_path):
    rows = ["path,label"]
    for i in range(6):
        write_image(tmp_path / "data" / f"{i}.png", 30 * i)
        rows.append(f"data/{i}.png,{i % 2}")
    rows += ["data/0.png,0", "data/missing.png,1"]  # a repeated row and a missing file
    os.symlink("nowhere.png", tmp_path / "data" / "dangling.png")
    rows.append("data/dangling.png,0")
    (tmp_path / "set.csv").write_text("\n".join(rows) + "\n")
    manifest = convert("labelled", str(tmp_path / "set.csv"), str(tmp_path / "out"))
    assert check_counts(manifest) == {"inputs": 9, "converted": 6, "skipped": 2, "not_converted": 1}
    assert manifest["skipped"] == [{"file": "data/missing.png", "reason": "listed but missing"},
                                   {"file": "data/dangling.png", "reason": "listed, but a broken symlink"}]
    assert manifest["not_converted"] == {"metadata": ["set.csv"]}
    assert f"data/0.png is listed twice in {tmp_path / 'set.csv'}; the first row is used" in manifest["warnings"]


def test_busi_benchmark(tmp_path):
    base = Path(mock.write_busi_tree(str(tmp_path / "raw"), per_class=(5, 3, 2), size=12, seed=0))
    files = sorted(str(p.relative_to(base)) for p in base.rglob("*") if p.is_file())
    (base / "benign" / "notes.txt").write_text("about benign")
    write_image(base / "normal" / "normal (9)_mask.png", 0)  # a mask without its image
    write_image(base / "benign" / "benign (2).tif", 90)  # a second image of that name
    (base / "README.txt").write_text("about the data")
    add_symlink_faults(base, tmp_path / "outside")
    manifests = convert("busi", str(base), str(tmp_path / "out"), subset="both")
    masks = [f for f in files if "_mask" in f]
    for subset, converted, normal in (("three_class", 7, 0), ("benign_malignant", 5, 2)):
        manifest = manifests[subset]
        # 3 duplicates, the note, the orphan mask, the second image, and in benign_malignant the normal images.
        assert check_counts(manifest) == {"inputs": len(files) + 8, "converted": converted, "skipped": 6 + normal,
                                          "not_converted": len(masks) + 5}
        reasons = {s["file"]: s["reason"] for s in manifest["skipped"]}
        assert reasons["normal/normal (9)_mask.png"] == "a mask without its image (no normal (9).png in normal/)"
        assert reasons["benign/benign (2).tif"] == ("a second image named benign (2) (the first, benign (2).png, "
                                                    "is used)")
        assert reasons["benign/notes.txt"] == "not an image file"
        assert manifest["not_converted"] == {
            "broken_symlink": ["dangling.png"], "mask": masks, "not_an_input": ["README.txt",
                                                                               "from_elsewhere/linked.png"],
            "symlink_loop": ["loop_a.png", "loop_b.png"]}
