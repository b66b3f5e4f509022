"""`python -m data_prep`: bad input gives one line and a non-zero status, and never a finished empty dataset.

Each case runs the real command (a subprocess) or `main(argv)` with a fault injected (tests/faults.py), and
checks the exit status, the single stderr line and the file it names, and that no manifest was written.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from faults import fill_disk_on_shard_write, fill_disk_on_text_write, huge_png_header, one_error_line
from PIL import Image

from data_prep import writer
from data_prep.__main__ import main

REPO = Path(__file__).resolve().parents[1]


def data_prep(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_prep", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def _image_tree(root: Path, count: int = 3) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(np.full((6, 8), 40 * i + 30, np.uint8)).save(root / f"{i}.png")  # grey: not mask-like
    return root


def test_missing_src_is_one_line(tmp_path):
    result = data_prep("folder", "--src", str(tmp_path / "nope"), "--out_dir", str(tmp_path / "out"),
                       "--name", "x")
    assert result.returncode == 2
    assert one_error_line(result.stderr) == f"python -m data_prep folder: --src {tmp_path / 'nope'}: no such folder"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option, value, message", [
    ("--name", "a/b", "argument --name: dataset name 'a/b' must be a plain folder name"),
    ("--records_per_shard", "0", "argument --records_per_shard: must be a positive integer, got 0"),
    ("--workers", "-1", "argument --workers: must be a positive integer, got -1"),
    ("--max_side", "-5", "argument --max_side: must be 0 or a positive integer, got -5"),
    ("--split", "Train", "argument --split: split 'Train' is not a lowercase name like 'train'"),
])
def test_bad_option_values_are_one_line(tmp_path, option, value, message):
    src = _image_tree(tmp_path / "src")
    result = data_prep("folder", "--src", str(src), "--out_dir", str(tmp_path / "out"), "--name", "x",
                       option, value)
    assert result.returncode == 2
    assert one_error_line(result.stderr).startswith(f"python -m data_prep folder: {message}")
    assert not (tmp_path / "out").exists()


def test_synthetic_option_checks(tmp_path):
    for option, value, message in (("--count", "0", "must be a positive integer, got 0"),
                                   ("--val_fraction", "1.5", "must be in [0, 1), got 1.5"),
                                   ("--size", "2", "--size must be at least 8 pixels, got 2")):
        result = data_prep("synthetic", "--out_dir", str(tmp_path / "out"), "--count", "4", option, value)
        assert result.returncode == 2 and message in one_error_line(result.stderr), result.stderr
    assert not (tmp_path / "out").exists()


def test_usage_errors_are_one_line(tmp_path):
    result = data_prep("folder", "--out_dir", str(tmp_path))
    assert result.returncode == 2
    assert one_error_line(result.stderr) == ("python -m data_prep folder: the following arguments are required: "
                                             "--src, --name (see python -m data_prep folder --help)")
    result = data_prep("foldr")
    assert result.returncode == 2 and "invalid choice: 'foldr'" in one_error_line(result.stderr)


def test_empty_src_fails_every_time_and_seals_nothing(tmp_path):
    src, out = tmp_path / "empty", tmp_path / "out"
    src.mkdir()
    (src / "notes.txt").write_text("no images here")
    for _ in range(2):  # the rerun must fail the same way, never say "already converted"
        result = data_prep("folder", "--src", str(src), "--out_dir", str(out), "--name", "e", "--no_progress")
        assert result.returncode == 2
        assert one_error_line(result.stderr) == (f"python -m data_prep folder: --src {src}: no image file to "
                                                 f"convert (1 not_an_image_extension)")
    assert not out.exists()


def test_nothing_readable_fails_naming_the_file(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    (src / "broken.png").write_bytes(b"")
    result = data_prep("folder", "--src", str(src), "--out_dir", str(out), "--name", "b", "--no_progress")
    assert result.returncode == 2
    line = one_error_line(result.stderr)
    assert line.startswith("python -m data_prep folder: b: no record written: all 1 inputs were skipped")
    assert f"{src / 'broken.png'}: empty file" in line
    assert writer.read_manifest(out / "b") is None and list((out / "b").iterdir()) == []


def test_verbose_shows_the_traceback(tmp_path):
    result = data_prep("--verbose", "folder", "--src", str(tmp_path / "nope"), "--out_dir", str(tmp_path),
                       "--name", "x")
    assert result.returncode != 0 and "Traceback" in result.stderr and "MissingInputError" in result.stderr
    result = data_prep("folder", "--src", str(tmp_path / "nope"), "--out_dir", str(tmp_path), "--name", "x",
                       "--verbose")
    assert "Traceback" in result.stderr


def test_full_disk_while_writing_shards(tmp_path, monkeypatch, capsys):
    src, out = _image_tree(tmp_path / "src"), tmp_path / "out"
    fill_disk_on_shard_write(monkeypatch)
    status = main(["folder", "--src", str(src), "--out_dir", str(out), "--name", "d", "--workers", "1",
                   "--no_progress"])
    assert status == 1
    line = one_error_line(capsys.readouterr().err)
    assert line == (f"python -m data_prep folder: No space left on device (the disk is full: free space or choose "
                    f"another output folder): {out / 'd' / '.train-00000.array_record.tmp'}")
    assert writer.read_manifest(out / "d") is None and list((out / "d").iterdir()) == []


def test_full_disk_while_writing_the_manifest(tmp_path, monkeypatch, capsys):
    src, out = _image_tree(tmp_path / "src"), tmp_path / "out"
    fill_disk_on_text_write(monkeypatch)
    status = main(["folder", "--src", str(src), "--out_dir", str(out), "--name", "d", "--workers", "1",
                   "--records_per_shard", "1", "--no_progress"])
    assert status == 1
    assert one_error_line(capsys.readouterr().err).endswith(f": {out / 'd' / '.manifest.json.tmp'}")
    # The three shards were complete and renamed; without a manifest they are removed, not left to be read.
    assert list((out / "d").iterdir()) == []


def test_pixel_cap_is_enforced_before_decoding(tmp_path):
    src, out = _image_tree(tmp_path / "src", count=1), tmp_path / "out"
    huge_png_header(src / "huge.png", 15_000, 15_000)  # 225 MP: PIL alone would only warn and decode it
    result = data_prep("folder", "--src", str(src), "--out_dir", str(out), "--name", "h", "--no_progress")
    assert result.returncode == 0, result.stderr
    manifest = writer.read_manifest(out / "h")
    assert manifest["total"] == 1
    assert manifest["skipped"] == [{"input": str(src / "huge.png"), "reason": (
        f"ValueError: {src / 'huge.png'}: image too large (15000x15000 = 225 megapixels, above the 200-megapixel cap); "
        "not decoded")}]
    assert f"skipped {src / 'huge.png'}: " in result.stdout and "DecompressionBombWarning" not in result.stderr


# ---------------------------------------------------------------- benchmarks and OpenUS-46


def test_benchmark_layout_error_is_one_line(tmp_path):
    result = data_prep("busbra", "--raw_dir", str(tmp_path / "nope"), "--out_dir", str(tmp_path / "out"))
    assert result.returncode == 2
    line = one_error_line(result.stderr)
    assert line.startswith(f"python -m data_prep busbra: {tmp_path / 'nope'} is not a directory. Expected layout:")
    assert not (tmp_path / "out").exists()


def test_benchmark_without_any_image_is_one_line(tmp_path):
    from data_prep.benchmarks import mock

    base = Path(mock.write_busbra_tree(str(tmp_path / "raw"), patients=10, size=16))
    for image in (base / "Images").iterdir():
        image.unlink()
    result = data_prep("busbra", "--raw_dir", str(base), "--out_dir", str(tmp_path / "out"))
    assert result.returncode == 2
    assert one_error_line(result.stderr).startswith(
        f"python -m data_prep busbra: {base}: no image to convert (")
    assert "first: Images/bus_0001-" in result.stderr and "missing from Images/" in result.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("manifest.json"))


def test_labelled_without_decodable_image_leaves_nothing(tmp_path, capsys):
    src, out = tmp_path / "views", tmp_path / "out"
    for cls in ("a", "b"):
        (src / cls).mkdir(parents=True)
        (src / cls / "0.png").write_bytes(b"not a png")
    assert main(["labelled", "--src", str(src), "--out_dir", str(out)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # TFDS logs its progress before
    assert last.startswith(f"python -m data_prep labelled: {src}: no image of part 'train' could be decoded "
                           f"(2 files skipped, first: a/0.png: cannot decode image {src / 'a' / '0.png'})")
    assert not (out / "labelled").exists() or not any((out / "labelled").rglob("*.json"))
    (src / "a" / "0.png").unlink()
    (src / "b" / "0.png").unlink()
    assert main(["labelled", "--src", str(src), "--out_dir", str(out)]) == 2
    assert one_error_line(capsys.readouterr().err).startswith(
        f"python -m data_prep labelled: {src} lists no images. Expected layout:; either  SRC/<class name>/")


def test_a_mask_of_another_size_is_a_summary_line_not_an_error(tmp_path, capsys):
    from data_prep.benchmarks import mock

    base = mock.write_mmotu_tree(str(tmp_path / "raw"), count=12, size=32, seed=0)
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(Path(base) / "annotations" / "3_binary.PNG")
    command = ["mmotu", "--raw_dir", base, "--out_dir", str(tmp_path / "out")]
    assert main(command) == 0
    printed = capsys.readouterr().out
    assert "mmotu: converted, 12 records" in printed
    assert ("  masks dropped: 1, their images kept without a mask (in classification, not in segmentation): "
            "annotations/3_binary.PNG (size 16x16 differs from the image's 32x32 (height x width))") in printed
    assert main([*command, "--resize_mismatched_masks"]) == 2  # the folder was made without it
    assert "pass --overwrite to convert it again" in one_error_line(capsys.readouterr().err)
    assert main([*command, "--resize_mismatched_masks", "--overwrite"]) == 0
    assert ("  masks resized to their images (nearest neighbour): 1: annotations/3_binary.PNG 16x16 -> 32x32"
            in capsys.readouterr().out)


def test_full_disk_in_a_benchmark_leaves_no_readable_output(tmp_path, monkeypatch, capsys):
    from data_prep.benchmarks import builder, mock

    base = mock.write_busbra_tree(str(tmp_path / "raw"), patients=10, size=16)
    real_dump = builder.json.dump

    def manifest_on_a_full_disk(payload, handle, **kwargs):
        if "accounting" in payload:  # splits.json is written, the manifest hits the full disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_dump(payload, handle, **kwargs)

    monkeypatch.setattr(builder.json, "dump", manifest_on_a_full_disk)
    version = builder.CONVERTER_VERSION
    assert main(["busbra", "--raw_dir", base, "--out_dir", str(tmp_path / "out")]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == ("python -m data_prep busbra: No space left on device (the disk is full: free space or choose "
                    f"another output folder): {tmp_path / 'out' / 'busbra' / version / 'manifest.json.tmp'}")
    # splits.json and the TFDS files were complete: the folder is removed so no reader takes it as converted.
    assert not (tmp_path / "out" / "busbra" / version).exists()


def test_openus46_nothing_to_convert(tmp_path):
    raw = tmp_path / "raw"
    (raw / "unrelated").mkdir(parents=True)
    result = data_prep("openus46", "--raw_dir", str(raw), "--out_dir", str(tmp_path / "out"), "--datasets",
                       "hc18,upbd")
    assert result.returncode == 2
    assert one_error_line(result.stderr) == (
        f"python -m data_prep openus46: --raw_dir {raw} holds none of the requested datasets (expected "
        "RAW/<key>/ folders such as hc18, upbd; see --list)")
    result = data_prep("openus46", "--raw_dir", str(raw / "nope"), "--out_dir", str(tmp_path / "out"))
    assert one_error_line(result.stderr) == f"python -m data_prep openus46: --raw_dir {raw / 'nope'}: no such folder"
    result = data_prep("openus46", "--raw_dir", str(raw), "--out_dir", str(tmp_path / "out"), "--datasets",
                       "bus_bra")
    assert "only held-out benchmarks" in one_error_line(result.stderr)
    assert not (tmp_path / "out").exists()
