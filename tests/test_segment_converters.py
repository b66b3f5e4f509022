"""Benchmark converters keep the masks: each record carries the mask of its image, aligned and exact.

Mock trees in the real layouts (data_prep.benchmarks.mock) whose masks are the true synthetic lesions, plus
hand-made files for the edge cases: a palette PNG, a thresholded mask, a colour that belongs to another class,
polygons rasterised by the pixel-centre rule, and the real releases' unusable masks (a mask of another size, as
MMOTU-2D's 256x256 `598_binary.PNG`; an unreadable header; a file that fails only when decoded; a declared COCO
size that differs), which are dropped and named, or resized on request, and never abort a conversion.
"""

from __future__ import annotations

import json
import os

import cv2
import numpy as np
import pytest
from PIL import Image

from data_prep.benchmarks import Busbra, Mmotu, cli, convert, load_split, manifest, mask_class_names, mock
from data_prep.benchmarks.masks import rasterise
from usf_mae_jax.cli import ConfigError
from usf_mae_jax.data import segmentation as segdata
from usf_mae_jax.data import synthetic


def records(out, benchmark, split="test", **kwargs):
    src = load_split(out, benchmark, split, **kwargs)
    return {item["id"]: item for item in src}


# ---------------------------------------------------------------- BUS-BRA


@pytest.fixture(scope="module")
def busbra(tmp_path_factory):
    raw = tmp_path_factory.mktemp("busbra")
    base = mock.write_busbra_tree(str(raw), patients=10, size=32, seed=4, fat_lobules=True)
    missing = sorted(os.listdir(os.path.join(base, "Masks")))[0]
    os.remove(os.path.join(base, "Masks", missing))
    out = str(tmp_path_factory.mktemp("busbra_out"))
    return dict(base=base, out=out, manifest=convert("busbra", str(raw), out), missing=missing)


def test_busbra_masks_are_the_lesions_of_their_images(busbra):
    base, out = busbra["base"], busbra["out"]
    assert mask_class_names(out, "busbra") == ["background", "lesion"]
    seen = 0
    for fold in range(1, 6):
        for record_id, item in records(out, "busbra", fold=fold).items():
            stem = os.path.basename(record_id)[len("bus_"):-len(".png")]
            if f"mask_{stem}.png" == busbra["missing"]:
                assert not item["has_mask"] and not item["mask"].any()  # classification keeps the image
                assert item["image"].shape == (32, 32, 1)
                continue
            raw = cv2.imread(os.path.join(base, "Masks", f"mask_{stem}.png"), cv2.IMREAD_GRAYSCALE)
            np.testing.assert_array_equal(item["mask"], raw // 255)
            patient, side = int(stem[:4]) - 1, stem[-1]
            image, truth = synthetic.synthesize_with_mask(32, np.random.default_rng([4, patient, ord(side)]),
                                                          item["label"], fat_lobules=True)
            np.testing.assert_array_equal(item["mask"], truth)  # the true lesion, pixel for pixel
            np.testing.assert_array_equal(item["image"][:, :, 0], image)  # aligned with its image
            seen += 1
    m = busbra["manifest"]
    assert seen == m["masks"]["records_with_mask"] == m["records"] - 1
    assert any(w.startswith("1 images have no mask") and busbra["missing"][len("mask_"):] in w for w in m["warnings"])
    assert m["options"]["masks"] and m["not_converted"]["mask"] == sorted(
        f"Masks/{n}" for n in os.listdir(os.path.join(base, "Masks")))


def test_capped_images_keep_aligned_nearest_masks(busbra, tmp_path):
    convert("busbra", os.path.dirname(busbra["base"]), str(tmp_path), max_side=20)
    small = records(str(tmp_path), "busbra", fold=1)
    full = records(busbra["out"], "busbra", fold=1)
    for record_id, item in small.items():
        assert item["mask"].shape == item["image"].shape[:2] == (20, 20)
        expected = cv2.resize(full[record_id]["mask"], (20, 20), interpolation=cv2.INTER_NEAREST_EXACT)
        np.testing.assert_array_equal(item["mask"], expected)
        assert set(np.unique(item["mask"])) <= {0, 1}


def test_unusable_busbra_masks_are_dropped_named_and_never_abort(tmp_path, caplog):
    raw = tmp_path / "raw"
    base = mock.write_busbra_tree(str(raw), patients=10, size=24, seed=0)
    small, garbage, truncated = sorted(os.listdir(os.path.join(base, "Masks")))[:3]
    cv2.imwrite(os.path.join(base, "Masks", small), np.zeros((20, 24), np.uint8))
    with open(os.path.join(base, "Masks", garbage), "wb") as f:
        f.write(b"not a PNG at all")
    noise = np.random.default_rng(0).integers(0, 2, (24, 24), dtype=np.uint8) * 255
    png = cv2.imencode(".png", noise)[1]
    with open(os.path.join(base, "Masks", truncated), "wb") as f:
        f.write(png.tobytes()[:80])  # the header still reads 24x24; the pixels do not decode
    # The plan stage finds the mismatch and the unreadable header from the headers, before writing anything.
    plan = Busbra(raw_dir=str(raw), data_dir=str(tmp_path / "out")).plan
    assert [(e["mask"], e["image"]) for e in plan.masks_dropped] == [
        (f"Masks/{small}", f"Images/bus_{small[5:]}"), (f"Masks/{garbage}", f"Images/bus_{garbage[5:]}")]
    assert not os.path.exists(tmp_path / "out")
    m = convert("busbra", str(raw), str(tmp_path / "out"))
    images = sorted(os.listdir(os.path.join(base, "Images")))
    assert m["records"] == len(images) and m["skipped"] == []  # every image converted
    dropped = {e["mask"]: e for e in m["masks"]["dropped"]}
    assert dropped[f"Masks/{small}"] == {"mask": f"Masks/{small}", "image": f"Images/bus_{small[5:]}",
                                         "reason": "size 20x24 differs from the image's 24x24 (height x width)"}
    assert dropped[f"Masks/{garbage}"]["reason"].startswith("cannot be read (cannot identify image file")
    assert dropped[f"Masks/{truncated}"]["reason"].startswith("cannot be read (")  # found while writing
    assert m["masks"]["records_with_mask"] == len(images) - 3 and m["masks"]["resized"] == []
    assert m["accounting"]["inputs"] == sum(m["accounting"][k] for k in ("converted", "skipped", "not_converted"))
    summary = cli._summary(m)
    assert f"  masks dropped: 3, their images kept without a mask (in classification, not in segmentation): " \
           f"Masks/{small} (size 20x24 differs" in summary
    assert f"Masks/{garbage} (cannot be read" in summary and f"Masks/{truncated} (cannot be read" in summary
    # Classification keeps the three images; segmentation leaves them out and says why.
    out, ids = str(tmp_path / "out"), {f"Images/bus_{name[5:]}" for name in (small, garbage, truncated)}
    kept = {i for k in range(1, 6) for i in load_split(out, "busbra", "test", fold=k).ids}
    assert ids <= kept
    with caplog.at_level("WARNING"):
        data = segdata.load_segmentation(out, "busbra", fold=1)
    left = {i for s in data.splits.values() for i in s.ids}
    assert not ids & left and len(left) == len(images) - 3
    assert sum(counts["mask_dropped"] for counts in data.left_out.values()) == 3
    assert all(counts["no_mask"] == 0 for counts in data.left_out.values())
    assert "whose mask the converter dropped as unusable" in caplog.text


def test_non_binary_and_palette_masks(tmp_path):
    raw = tmp_path / "raw"
    base = mock.write_busbra_tree(str(raw), patients=10, size=16, seed=2)
    names = sorted(os.listdir(os.path.join(base, "Masks")))
    palette = Image.fromarray(np.eye(16, dtype=np.uint8), mode="P")  # indices 0/1, colour (128, 0, 0) for 1
    palette.putpalette([0, 0, 0, 128, 0, 0] + [0] * 762)
    palette.save(os.path.join(base, "Masks", names[0]))
    blurred = np.zeros((16, 16), np.uint8)
    blurred[4:8, 4:8], blurred[8, 4:8] = 255, 100  # an interpolated edge: 100 falls below the 128 threshold
    cv2.imwrite(os.path.join(base, "Masks", names[1]), blurred)
    out = str(tmp_path / "out")
    m = convert("busbra", str(raw), out)
    items = {os.path.basename(i)[4:]: item for fold in range(1, 6)
             for i, item in records(out, "busbra", fold=fold).items()}
    np.testing.assert_array_equal(items[names[0][5:]]["mask"], np.eye(16, dtype=np.uint8))
    np.testing.assert_array_equal(items[names[1][5:]]["mask"], blurred == 255)
    assert [w for w in m["warnings"] if "thresholded" in w] == [
        f"1 binary masks hold more than one non-zero value and were thresholded at 128: ['Masks/{names[1]}']"]


# ---------------------------------------------------------------- MMOTU-2D


@pytest.fixture(scope="module")
def mmotu(tmp_path_factory):
    raw = tmp_path_factory.mktemp("mmotu")
    base = mock.write_mmotu_tree(str(raw), count=24, size=24, seed=3)
    labels = {}
    for part in ("train", "val"):
        with open(os.path.join(base, f"{part}_cls.txt")) as f:
            labels.update({f"images/{line.split()[0]}": int(line.split()[1]) for line in f if line.strip()})
    wrong = "images/5.JPG"  # its N.PNG gets the colour of another class
    coded = cv2.imread(os.path.join(base, "annotations", "5.PNG"))
    other = (labels[wrong] + 1) % 8
    coded[coded.any(axis=2)] = mock.MMOTU_PALETTE[other][::-1]
    cv2.imwrite(os.path.join(base, "annotations", "5.PNG"), coded)
    out = str(tmp_path_factory.mktemp("mmotu_out"))
    return dict(base=base, out=out, labels=labels, wrong=wrong, manifest=convert("mmotu", base, out))


def test_mmotu_class_map_is_label_plus_one_inside_the_binary_mask(mmotu):
    out, base = mmotu["out"], mmotu["base"]
    assert mask_class_names(out, "mmotu")[1:] == manifest(out, "mmotu")["class_names"]
    items = {**records(out, "mmotu", "train_full"), **records(out, "mmotu", "test")}
    assert len(items) == 24
    for record_id, item in items.items():
        stem = os.path.splitext(os.path.basename(record_id))[0]
        binary = cv2.imread(os.path.join(base, "annotations", f"{stem}_binary.PNG"), cv2.IMREAD_GRAYSCALE) > 0
        assert binary.any()
        np.testing.assert_array_equal(item["mask"], binary * (mmotu["labels"][record_id] + 1))
        assert item["label"] == mmotu["labels"][record_id]


def test_mmotu_colour_coding_mismatch_is_reported(mmotu):
    warnings = [w for w in mmotu["manifest"]["warnings"] if w.startswith("colour-coded masks")]
    assert warnings == [f"colour-coded masks disagree with the class lists for 1 images (their colour belongs to "
                        f"another class; colours shared by classes: {_shared(mmotu)}): ['{mmotu['wrong']}']"]


def _shared(mmotu) -> dict:
    """The colour the modified image now shares with another class, as the warning names it."""
    label = mmotu["labels"][mmotu["wrong"]]
    names = manifest(mmotu["out"], "mmotu")["class_names"]
    return {mock.MMOTU_PALETTE[(label + 1) % 8]: sorted([names[label], names[(label + 1) % 8]])}


def test_mmotu_mask_of_another_size_never_aborts_and_can_be_resized(tmp_path):
    base = mock.write_mmotu_tree(str(tmp_path / "raw"), count=24, size=40, seed=1)
    path = os.path.join(base, "annotations", "8_binary.PNG")  # image 8 is a test image
    full = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
    small = cv2.resize(full, (16, 16), interpolation=cv2.INTER_NEAREST_EXACT)  # as the release's 598_binary.PNG
    cv2.imwrite(path, small)
    assert [e["mask"] for e in Mmotu(raw_dir=base, data_dir=str(tmp_path / "x")).plan.masks_dropped] == [
        "annotations/8_binary.PNG"]  # known from the headers, before the slow work
    out = str(tmp_path / "out")
    m = convert("mmotu", base, out)
    assert m["records"] == 24 and m["masks"]["dropped"] == [
        {"mask": "annotations/8_binary.PNG", "image": "images/8.JPG",
         "reason": "size 16x16 differs from the image's 40x40 (height x width)"}]
    assert ("  masks dropped: 1, their images kept without a mask (in classification, not in segmentation): "
            "annotations/8_binary.PNG (size 16x16 differs from the image's 40x40 (height x width))") in cli._summary(m)
    test = records(out, "mmotu", "test")
    assert "images/8.JPG" in test and not test["images/8.JPG"]["has_mask"]
    data = segdata.load_segmentation(out, "mmotu")
    assert "images/8.JPG" not in data.splits["test"].ids and len(data.splits["test"]) == len(test) - 1
    assert data.left_out["test"] == {"no_mask": 0, "mask_dropped": 1}
    with open(os.path.join(data.version_dir, "splits.json")) as f:
        assert json.load(f)["masks_dropped"] == ["images/8.JPG"]
    # A user who knows the mask is only scaled resizes it, and the manifest says so for that file.
    with pytest.raises(ConfigError, match="pass --overwrite"):
        convert("mmotu", base, out, resize_mismatched_masks=True)
    m = convert("mmotu", base, out, resize_mismatched_masks=True, overwrite=True)
    assert m["masks"]["dropped"] == [] and m["masks"]["resized"] == [
        {"mask": "annotations/8_binary.PNG", "image": "images/8.JPG", "from": "16x16", "to": "40x40"}]
    assert m["options"]["resize_mismatched_masks"] and "masks resized" in cli._summary(m)
    item = records(out, "mmotu", "test")["images/8.JPG"]
    expected = cv2.resize(small, (40, 40), interpolation=cv2.INTER_NEAREST_EXACT) > 0
    assert item["has_mask"]
    np.testing.assert_array_equal(item["mask"], expected * np.uint8(item["label"] + 1))


# ---------------------------------------------------------------- GIST514-DB


def test_polygons_rasterise_by_the_pixel_centre_rule():
    square = rasterise([(1, (2, 2, 6, 2, 6, 6, 2, 6))], 8, 8)
    expected = np.zeros((8, 8), np.uint8)
    expected[2:6, 2:6] = 1
    np.testing.assert_array_equal(square, expected)
    # Right triangle (0,0) (10,0) (0,5): pixel (r, c) is inside iff c + 2r + 1.5 < 10; no centre lies on an edge.
    triangle = rasterise([(2, (0, 0, 10, 0, 0, 5))], 6, 12)
    rows, cols = np.mgrid[0:6, 0:12]
    np.testing.assert_array_equal(triangle, np.where(cols + 2 * rows <= 8, 2, 0))
    assert triangle.astype(bool).sum() == 25
    # A later polygon overwrites an earlier one; a square sharing an edge shares no pixel.
    both = rasterise([(1, (0, 0, 4, 0, 4, 4, 0, 4)), (2, (4, 0, 8, 0, 8, 4, 4, 4))], 4, 8)
    np.testing.assert_array_equal(both, np.repeat([[1] * 4 + [2] * 4], 4, axis=0))


def test_gist514_masks_from_polygons_with_categories_by_name(tmp_path):
    for subset in ("roi", "raw"):
        mock.write_gist514_tree(str(tmp_path / "raw"), count=10, size=24, seed=5, subset=subset)
    out = str(tmp_path / "out")
    convert("gist514", str(tmp_path / "raw"), out, subset="both")
    for subset in ("roi", "raw"):
        assert mask_class_names(out, "gist514", subset) == ["background", "lmym", "GIST"]
        items = records(out, "gist514", fold=0, subset=subset)
        assert len(items) == 2
        for record_id, item in items.items():
            index = int(record_id[-7:-4])
            kind = synthetic.MALIGNANT if index % 2 else synthetic.BENIGN
            _, truth = synthetic.synthesize_with_mask(24, np.random.default_rng([5, index]), kind, fat_lobules=True)
            assert set(np.unique(item["mask"])) == {0, item["label"] + 1}  # GIST = 2, lmym = 1
            assert np.sum((item["mask"] > 0) != truth) <= 2  # the mock's polygons trace the lesion's outline


def _declare(base: str, scale: int) -> str:
    """Scales the first image's declared size and polygons in val_anno_split_0.json; returns its file name."""
    path = os.path.join(base, "annotations", "val_anno_split_0.json")
    with open(path) as f:
        coco = json.load(f)
    entry = coco["images"][0]
    entry["height"], entry["width"] = entry["height"] * scale, entry["width"] * scale
    for ann in coco["annotations"]:
        if ann["image_id"] == entry["id"]:
            ann["segmentation"] = [[v * scale for v in polygon] for polygon in ann["segmentation"]]
    with open(path, "w") as f:
        json.dump(coco, f)
    return entry["file_name"]


def test_gist514_declared_size_that_differs_drops_or_scales_the_polygons(tmp_path):
    base = mock.write_gist514_tree(str(tmp_path / "raw"), count=10, size=24, seed=0, subset="raw")
    convert("gist514", str(tmp_path / "raw"), str(tmp_path / "plain"), subset="raw")
    name = _declare(base, 2)  # annotated on a 48x48 canvas, the image is 24x24
    m = convert("gist514", str(tmp_path / "raw"), str(tmp_path / "out"), subset="raw")
    assert m["records"] == 10 and m["masks"]["dropped"] == [
        {"mask": "annotations/val_anno_split_0.json", "image": f"images/{name}",
         "reason": "declares the image as 48x48, but it is 24x24 (height x width)"}]
    item = records(str(tmp_path / "out"), "gist514", fold=0, subset="raw")[f"images/{name}"]
    assert not item["has_mask"] and not item["mask"].any()
    m = convert("gist514", str(tmp_path / "raw"), str(tmp_path / "scaled"), subset="raw", resize_mismatched_masks=True)
    assert m["masks"]["dropped"] == [] and m["masks"]["resized"] == [
        {"mask": "annotations/val_anno_split_0.json", "image": f"images/{name}", "from": "48x48", "to": "24x24"}]
    scaled = records(str(tmp_path / "scaled"), "gist514", fold=0, subset="raw")[f"images/{name}"]
    plain = records(str(tmp_path / "plain"), "gist514", fold=0, subset="raw")[f"images/{name}"]
    assert scaled["has_mask"] and scaled["mask"].any()
    np.testing.assert_array_equal(scaled["mask"], plain["mask"])  # halving the doubled polygons restores them


# ---------------------------------------------------------------- labelled


def test_labelled_mask_folder_and_csv_column(tmp_path):
    src, masks_dir = tmp_path / "set", tmp_path / "set" / "masks"  # the mask folder inside src is no class
    for i in range(10):
        image, truth = synthetic.synthesize_with_mask(16, np.random.default_rng(i), i % 2)
        for folder, array in ((src / f"class{i % 2}", image), (masks_dir / f"class{i % 2}", truth * 255)):
            folder.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(folder / f"{i}.png"), array.astype(np.uint8))
    os.remove(masks_dir / "class1" / "9.png")
    cv2.imwrite(str(masks_dir / "class0" / "4.png"), np.zeros((8, 8), np.uint8))  # half the image's size
    out = str(tmp_path / "out")
    m = convert("labelled", str(src), out, masks_dir=str(masks_dir))
    assert m["class_names"] == ["class0", "class1"] and m["masks"]["records_with_mask"] == 8
    assert m["masks"]["dropped"] == [{"mask": "masks/class0/4.png", "image": "class0/4.png",
                                      "reason": "size 8x8 differs from the image's 16x16 (height x width)"}]
    items = {i: item for s in ("train", "validation", "test") for i, item in records(out, "labelled", s).items()}
    assert len(items) == 10
    for record_id, item in items.items():
        index = int(os.path.basename(record_id)[:-4])
        _, truth = synthetic.synthesize_with_mask(16, np.random.default_rng(index), index % 2)
        np.testing.assert_array_equal(item["mask"], truth if index not in (4, 9) else np.zeros_like(truth))
        assert item["has_mask"] == (index not in (4, 9))
    # A CSV naming multi-class masks: pixel values are the classes; a value beyond them drops that mask alone.
    multi = np.zeros((16, 16), np.uint8)
    multi[2:5, 2:5], multi[8:12, 8:12] = 1, 2
    cv2.imwrite(str(tmp_path / "m0.png"), multi)
    cv2.imwrite(str(tmp_path / "m1.png"), multi * 2)
    (tmp_path / "set.csv").write_text("path,label,mask\nset/class0/0.png,a,m0.png\nset/class1/1.png,b,m1.png\n"
                                      "set/class0/2.png,a,\n")
    m = convert("labelled", str(tmp_path / "set.csv"), str(tmp_path / "bad"), mask_classes=("cyst", "solid"),
                val_fraction=0.0, test_fraction=0.0)
    assert m["records"] == 3 and m["masks"]["dropped"] == [
        {"mask": "m1.png", "image": "set/class1/1.png", "reason": "holds class value 4, but only 0..2 are named"}]
    bad = records(str(tmp_path / "bad"), "labelled", "train")
    assert bad["set/class0/0.png"]["has_mask"] and not bad["set/class1/1.png"]["has_mask"]
    cv2.imwrite(str(tmp_path / "m1.png"), multi)
    m = convert("labelled", str(tmp_path / "set.csv"), str(tmp_path / "csv"), mask_classes=("cyst", "solid"),
                val_fraction=0.0, test_fraction=0.0)
    assert m["masks"]["class_names"] == ["background", "cyst", "solid"]
    train = records(str(tmp_path / "csv"), "labelled", "train")
    np.testing.assert_array_equal(train["set/class0/0.png"]["mask"], multi)
    assert not train["set/class0/2.png"]["has_mask"]
