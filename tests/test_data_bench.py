"""The input benchmark (`python -m usf_mae_jax.data.bench`): generated sources of a given size, the stage table,
alternating rounds against the PIL loader, and the machine-parsable last line."""

import argparse
import json
import re

import numpy as np
import pytest

from data_prep import writer
from usf_mae_jax.data import bench


def load_square(index):
    yield writer.Example(image=np.full((20, 20), index, np.uint8), source=f"{index}.png")


def test_size_parsing():
    assert bench.parse_size("640x480") == (640, 480)
    with pytest.raises(argparse.ArgumentTypeError, match="not WIDTHxHEIGHT"):
        bench.parse_size("640")


def test_existing_shards_against_the_pil_loader(tmp_path, capsys):
    writer.write_dataset(tmp_path, "a", list(range(12)), load_square, progress=False, nearest_size=16)
    assert bench.main(["--data_dir", str(tmp_path), "--batch_size", "4", "--img_size", "16", "--rounds", "2",
                       "--batches", "2", "--pil_batches", "1", "--threads", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "note: the pil baseline reads the frames' PNG payloads from the records (no source files)" in lines
    assert sum(bool(re.match(r"\[.*\] round \d: grain \d+ images/s, pil \d+ images/s, ratio [\d.]+x; load ", line))
               for line in lines) == 2
    assert any(re.search(r"ratio grain / pil: [\d.]+x \(median of 2 rounds", line) for line in lines)
    assert re.fullmatch(r"images_per_s=\d+\.\d", lines[-1]) and float(lines[-1].split("=")[1]) > 0


def test_generated_sources_with_stages(tmp_path, capsys):
    args = ["--source_size", "40x30", "--count", "8", "--work_dir", str(tmp_path), "--batch_size", "4",
            "--rounds", "1", "--batches", "2", "--pil_batches", "1", "--threads", "1", "--stages", "--codecs"]
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    sources = sorted((tmp_path / "sources").glob("*/*.png"))
    assert len(sources) == 8 and "speckle_40x30_8" in str(sources[0])
    assert (tmp_path / "shards" / "speckle_40x30_8_v1" / "frames" / "manifest.json").is_file()
    for stage in ("read record", "decode", "rotation", "crop + bilinear resize", "host-to-device (CPU device)"):
        assert re.search(rf"\[40x30\]   {re.escape(stage)} +[\d.]+ +[\d.]+\n", out)
    stored = re.search(r"\[40x30\]   nearest224 raw \(stored variant\) +([\d.]+) KB +[\d.]+ us", out)
    # 224 * 224 bytes each; ArrayRecord grows files in 64-KiB steps, coarse for 8 records.
    assert stored and abs(float(stored[1]) - 50.2) <= 65.6 / 8
    assert re.search(r"\[40x30\]   original 40x30 raw, gather +[\d.]+ KB", out)
    assert "[40x30] ratio grain / pil" in out and out.strip().splitlines()[-1].startswith("images_per_s=")
    assert bench.main(args) == 0  # cached: nothing generated or converted again
    out = capsys.readouterr().out
    assert "writing" not in out and "converting" not in out
    manifest_path = tmp_path / "shards" / "speckle_40x30_8_v1" / "frames" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["record_format_version"] = 1  # as an older data_prep wrote it
    manifest_path.write_text(json.dumps(manifest))
    assert bench.main(args) == 0
    assert "[40x30] converting with python -m data_prep folder" in capsys.readouterr().out
