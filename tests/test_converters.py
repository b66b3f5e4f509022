"""Image reader and the generic converters: odd and corrupt inputs are normalised or reported, never crash."""

import io
import subprocess
import sys
from pathlib import Path

import grain
import numpy as np
import pytest
from faults import huge_png_header
from PIL import Image

from data_prep import writer
from data_prep.__main__ import main as data_prep_main
from data_prep.benchmarks import common
from data_prep.formats.image2d import read_image
from usf_mae_jax.data import records
from usf_mae_jax.data.synthetic import SyntheticUltrasound

REPO = Path(__file__).resolve().parents[1]
RAMP = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5


def _write_odd_images(root: Path) -> None:
    (root / "sub").mkdir(parents=True)
    Image.fromarray(RAMP).save(root / "gray.png")
    Image.fromarray(RAMP.astype(np.uint16) * 250).save(root / "deep16.png")  # 16-bit, 0..58750
    Image.fromarray(np.stack([RAMP] * 3, axis=2)).save(root / "sub" / "gray_as_rgb.png")
    colour = np.stack([RAMP, 255 - RAMP, np.zeros_like(RAMP)], axis=2)
    Image.fromarray(colour).save(root / "sub" / "colour.bmp")
    Image.fromarray(RAMP).convert("P").save(root / "palette.png")
    rgba = np.dstack([np.stack([RAMP] * 3, axis=2), np.full_like(RAMP, 255)])
    Image.fromarray(rgba, "RGBA").save(root / "rgba.png")
    Image.fromarray(np.stack([RAMP] * 3, axis=2)).convert("CMYK").save(root / "cmyk.jpg", quality=100)
    Image.fromarray(RAMP.astype(np.uint16) * 100).save(root / "deep16.tif")
    (root / "empty.png").write_bytes(b"")
    good = io.BytesIO()
    Image.fromarray(RAMP).save(good, format="PNG")
    (root / "truncated.png").write_bytes(good.getvalue()[:40])
    (root / "notes.txt").write_text("not an image")
    Image.fromarray(RAMP > 100).save(root / "sub" / "lesion_mask.png")


def test_read_image_modes(tmp_path):
    _write_odd_images(tmp_path)
    np.testing.assert_array_equal(read_image(tmp_path / "gray.png"), RAMP)
    np.testing.assert_array_equal(read_image(tmp_path / "sub" / "gray_as_rgb.png"), RAMP)
    np.testing.assert_array_equal(read_image(tmp_path / "palette.png"), RAMP)
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.png"), RAMP)
    deep = read_image(tmp_path / "deep16.png")
    assert deep.dtype == np.uint8 and (deep.min(), deep.max()) == (0, 255)
    # min/max rescaling keeps a linear ramp linear: value 1250 k -> 255 k / 47
    np.testing.assert_array_equal(deep, np.round(np.arange(48).reshape(6, 8) * 255 / 47).astype(np.uint8))
    tiff = read_image(tmp_path / "deep16.tif")
    assert tiff.shape == (6, 8) and (tiff.min(), tiff.max()) == (0, 255)
    colour = read_image(tmp_path / "sub" / "colour.bmp")
    np.testing.assert_array_equal(colour, np.stack([RAMP, 255 - RAMP, np.zeros_like(RAMP)], axis=2))
    cmyk = read_image(tmp_path / "cmyk.jpg")
    assert cmyk.dtype == np.uint8 and cmyk.shape[:2] == (6, 8)


@pytest.mark.parametrize("name, message", [("empty.png", "empty file"), ("truncated.png", "cannot decode"),
                                           ("notes.txt", "cannot decode"), ("missing.png", "not found")])
def test_read_image_errors_name_the_file(tmp_path, name, message):
    _write_odd_images(tmp_path)
    with pytest.raises(ValueError, match=message) as info:
        read_image(tmp_path / name)
    assert str(tmp_path / name) in str(info.value)


@pytest.mark.parametrize("reader", [read_image, lambda path: common.read_image(str(path), 1, 512)])
def test_pixel_cap_is_checked_on_the_header(tmp_path, reader):
    """Above 200 MP the file is refused from its header; the pixel data (garbage here) is never decoded."""
    huge_png_header(tmp_path / "huge.png", 15_000, 15_000)
    with pytest.raises(ValueError) as info:
        reader(tmp_path / "huge.png")
    assert str(info.value) == (f"{tmp_path / 'huge.png'}: image too large (15000x15000 = 225 megapixels, above "
                               "the 200-megapixel cap); not decoded")
    huge_png_header(tmp_path / "at_cap.png", 20_000, 10_000)  # exactly 200 MP: allowed, so decoding is tried
    with pytest.raises(ValueError, match="cannot decode"):
        reader(tmp_path / "at_cap.png")


def test_folder_converter_reports_odd_inputs(tmp_path, capsys):
    src, out = tmp_path / "raw", tmp_path / "out"
    _write_odd_images(src)
    code = data_prep_main(["folder", "--src", str(src), "--out_dir", str(out), "--name", "odd", "--workers", "1",
                           "--no_progress"])
    assert code == 0
    manifest = writer.read_manifest(out / "odd")
    skipped = {entry["input"].replace(str(src) + "/", ""): entry["reason"] for entry in manifest["skipped"]}
    assert set(skipped) == {"empty.png", "truncated.png"}
    assert "empty file" in skipped["empty.png"] and "cannot decode" in skipped["truncated.png"]
    assert manifest["not_converted"] == {"excluded": ["sub/lesion_mask.png"],
                                         "not_an_image_extension": ["notes.txt"]}
    assert manifest["total"] == 8 and manifest["channels"] == {"1": 7, "3": 1}
    sources = []
    data = grain.sources.ArrayRecordDataSource([str(out / "odd" / n) for n in manifest["shards"]["train"]])
    for i in range(len(data)):
        record = records.decode(data[i])
        sources.append(record["source"])
        if record["source"] in ("gray.png", "palette.png", "rgba.png", "sub/gray_as_rgb.png"):
            np.testing.assert_array_equal(record["image"][:, :, 0], RAMP)
    assert sources == sorted(sources) and "sub/colour.bmp" in sources
    printed = capsys.readouterr().out
    assert "skipped" in printed and "empty.png" in printed and "not converted (excluded): 1 files" in printed


def test_folder_include_exclude(tmp_path):
    src, out = tmp_path / "raw", tmp_path / "out"
    _write_odd_images(src)
    code = data_prep_main(["folder", "--src", str(src), "--out_dir", str(out), "--name", "pngs", "--include",
                           "*.png", "--exclude", "*16*", "--workers", "1", "--no_progress"])
    manifest = writer.read_manifest(out / "pngs")
    # gray, palette, rgba, empty, truncated, sub/gray_as_rgb are converted or skipped; the other 6 files
    # (not *.png, the mask, *16*) are excluded
    assert code == 0 and manifest["total"] == 4
    assert manifest["accounting"] == {"inputs": 12, "converted": 4, "skipped": 2, "not_converted": 6}
    assert manifest["inputs"] == 12 and "deep16.png" in manifest["not_converted"]["excluded"]


def _speckle(seed: int, shape=(24, 32)) -> np.ndarray:
    return np.random.default_rng(seed).integers(20, 200, shape, dtype=np.uint8)


def test_folder_never_ingests_masks_of_the_real_releases_layouts(tmp_path, capsys):
    """HC18 keeps `NNN_HC_Annotation.png` beside its frames, C-TRUS its JPEG masks in `labels/` under the images'
    names; a mask under an innocent name is caught by its content (nearly all pixels black or white)."""
    src, out = tmp_path / "raw", tmp_path / "out"
    (src / "original").mkdir(parents=True)
    (src / "labels").mkdir()
    blob = np.zeros((24, 32), np.uint8)
    blob[6:18, 8:20] = 255
    Image.fromarray(_speckle(0)).save(src / "original" / "A1.jpg", quality=95)
    Image.fromarray(blob).save(src / "labels" / "A1.jpg", quality=95)  # JPEG: grey edge pixels around the blob
    Image.fromarray(_speckle(1)).save(src / "010_2HC.png")
    Image.fromarray(blob).save(src / "010_2HC_Annotation.png")
    Image.fromarray(blob).save(src / "outline.png")
    code = data_prep_main(["folder", "--src", str(src), "--out_dir", str(out), "--name", "us", "--workers", "1",
                           "--no_progress"])
    manifest = writer.read_manifest(out / "us")
    assert code == 0 and manifest["total"] == 2
    assert manifest["not_converted"] == {"excluded": ["010_2HC_Annotation.png", "labels/A1.jpg"]}
    assert [e["input"] for e in manifest["skipped"]] == [str(src / "outline.png")]
    assert manifest["skipped"][0]["reason"].startswith("mask-like content: 100.0% of its pixels are near 0 or 255")
    assert "skipped" in capsys.readouterr().out
    code = data_prep_main(["folder", "--src", str(src), "--out_dir", str(out), "--name", "all", "--keep_masks",
                           "--workers", "1", "--no_progress"])
    assert code == 0 and writer.read_manifest(out / "all")["total"] == 5


def test_synthetic_converter_cli_writes_labels(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "data_prep", "synthetic", "--out_dir", str(out), "--count", "6",
                             "--size", "32", "--workers", "1", "--no_progress"], cwd=REPO, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    manifest = writer.read_manifest(out / "synthetic")
    assert manifest["counts"] == {"train": 6}
    data = grain.sources.ArrayRecordDataSource([str(out / "synthetic" / n) for n in manifest["shards"]["train"]])
    reference = SyntheticUltrasound(6, 32, seed=0, lesion_fraction=0.5)
    for i in range(6):
        record = records.decode(data[i])
        np.testing.assert_array_equal(record["image"], reference[i]["image"])
        assert record["label"] == reference[i]["label"] and record["source"] == reference[i]["source"]
    again = subprocess.run([sys.executable, "-m", "data_prep", "synthetic", "--out_dir", str(out), "--count", "6",
                            "--size", "32", "--workers", "1", "--no_progress"], cwd=REPO, capture_output=True,
                           text=True)
    assert again.returncode == 0 and writer.read_manifest(out / "synthetic")["created"] == manifest["created"]


def test_missing_converter_module_gives_a_clear_error(monkeypatch, capsys):
    import data_prep.__main__ as cli

    monkeypatch.setitem(cli.COMMANDS, "openus46", ("data_prep.no_such_module", None, "x"))
    assert cli.main(["openus46", "--help"]) == 2
    assert capsys.readouterr().err.startswith(
        "python -m data_prep openus46: cannot import data_prep.no_such_module (No module named")
