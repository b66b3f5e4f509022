"""Every one of the 46 datasets, converted from a mock of its documented layout (tests/openus46_mocks.py).

For each dataset: exactly the image files (or the sampled frames of its videos / cines / volumes) become
records, no mask, sidecar or duplicate-folder file does, the subject ids come out of the paths, and the
frame and slice indices follow the sampling rule worked out by hand in the mock.
"""

from __future__ import annotations

import glob
import json
import os

import pytest
from array_record.python.array_record_module import ArrayRecordReader
from openus46_mocks import build

from data_prep.openus46.convert import ConvertOptions, convert_dataset
from data_prep.openus46.registry import KEYS, REGISTRY
from data_prep.walk import walk
from usf_mae_jax.data import records


def read_records(out_dir: str, key: str) -> list[dict]:
    """Every record of OUT/<key>/ decoded (image included), in shard order (the frames, not the stored
    nearest-resized variant, which holds the same records)."""
    decoded = []
    shards = glob.glob(os.path.join(out_dir, key, "*.array_record"))
    for shard in sorted(s for s in shards if ".nearest" not in os.path.basename(s)):
        reader = ArrayRecordReader(shard)
        decoded += [records.decode(r) for r in reader.read_all()]
        reader.close()
    return decoded


def convert(tmp_path, key, **overrides):
    raw, out = str(tmp_path / "raw"), str(tmp_path / "out")
    mock = build(key, raw)
    options = ConvertOptions(raw_dir=raw, out_dir=out, progress=False, include_holdouts=True, **overrides)
    row = convert_dataset(REGISTRY[key], options, dedup=None)
    return mock, row, read_records(out, key), raw, out


@pytest.mark.parametrize("key", KEYS)
def test_exactly_the_images_become_records(tmp_path, key):
    mock, row, decoded, raw, out = convert(tmp_path, key)
    assert row["status"] == "converted", row
    written = {(r["source"], r["frame"]): r["subject"] for r in decoded}
    assert set(written) == set(mock.expected), f"{key}: records differ from the mock's images"
    assert written == mock.expected, f"{key}: subject ids differ"
    assert all(r["dataset"] == key for r in decoded)
    assert row["images"] == len(mock.expected)
    assert row["skipped"] == {}
    sources = {r["source"] for r in decoded}
    for forbidden in mock.forbidden:
        assert os.path.exists(os.path.join(raw, key, forbidden)), f"mock lost {forbidden}"
        assert forbidden not in sources, f"{key}: {forbidden} must not become a record"
    for (source, frame), shape in mock.shapes.items():
        record = next(r for r in decoded if (r["source"], r["frame"]) == (source, frame))
        assert (record["height"], record["width"]) == shape, f"{key}: {source}#{frame}"
    assert_every_file_accounted(os.path.join(raw, key), os.path.join(out, key), decoded)


def assert_every_file_accounted(root: str, folder: str, decoded: list[dict]) -> None:
    """inputs = converted + skipped + not_converted, and every entry under the raw folder is one of them."""
    with open(os.path.join(folder, "manifest.json")) as handle:
        manifest = json.load(handle)
    counts = manifest["accounting"]
    assert counts["inputs"] == counts["converted"] + counts["skipped"] + counts["not_converted"]
    assert manifest["inputs"] == counts["inputs"]
    left_out = [p for paths in manifest["not_converted"].values() for p in paths]
    assert counts["not_converted"] == len(left_out) == len(set(left_out))
    converted = {r["source"] for r in decoded}
    skipped = {os.path.relpath(s["input"], root) for s in manifest["skipped"]} | {
        d["source"] for d in manifest["dropped"]}
    assert counts["converted"] == len(converted) and counts["skipped"] == len(skipped - converted)
    tree = walk(root)
    on_disk = set(tree.files) | {p for paths in tree.left_out.values() for p in paths}
    assert converted | skipped | set(left_out) == on_disk


def test_frames_sampled_counts_only_sequence_frames(tmp_path):
    _, row, decoded, _, _ = convert(tmp_path, "pocus")
    assert row["frames_sampled"] == 8  # 4 + 4 video frames; the still is not a sampled frame
    assert sum(1 for r in decoded if r["frame"] == -1) == 1


def test_optional_videos_only_with_include_optional(tmp_path):
    _, row, decoded, _, _ = convert(tmp_path, "luss_phantom", include_optional=True)
    # the 4-frame WebM clip at 2 Hz with its 10 fps -> stride 5 -> frame 0 only; plus the 2 stills.
    assert sorted((r["source"], r["frame"]) for r in decoded if r["frame"] >= 0) == [
        ("VideoClips/clip1.webm", 0)]
    assert row["images"] == 3


def test_max_frames_override_caps_every_sequence(tmp_path):
    _, _, decoded, _, _ = convert(tmp_path, "blues", max_frames=2)
    assert sorted(r["frame"] for r in decoded) == [0, 10]


def test_holdout_benchmark_is_not_converted_by_default(tmp_path):
    raw, out = str(tmp_path / "raw"), str(tmp_path / "out")
    build("bus_bra", raw)
    row = convert_dataset(REGISTRY["bus_bra"], ConvertOptions(raw_dir=raw, out_dir=out, progress=False), None)
    assert row["status"] == "held out"
    assert not os.path.exists(os.path.join(out, "bus_bra"))


def test_segthy_mri_archive_is_never_unpacked(tmp_path):
    _, _, _, raw, _ = convert(tmp_path, "segthy")
    assert os.path.exists(os.path.join(raw, "segthy", "MRI_data.zip"))
    assert not os.path.exists(os.path.join(raw, "segthy", "MRI_data"))


def test_rar_archives_are_reported_in_the_manifest(tmp_path):
    import json

    _, _, _, _, out = convert(tmp_path, "fast_u_net")
    with open(os.path.join(out, "fast_u_net", "manifest.json")) as handle:
        manifest = json.load(handle)
    assert len(manifest["archive_notes"]) == 1
    assert "AC_image1.rar" in manifest["archive_notes"][0] and "unrar x" in manifest["archive_notes"][0]
    assert manifest["licence"] == "no licence file"


def test_manifest_lists_excluded_matches_with_reasons(tmp_path):
    import json

    _, row, _, _, out = convert(tmp_path, "bp")
    with open(os.path.join(out, "bp", "manifest.json")) as handle:
        manifest = json.load(handle)
    assert manifest["excluded"] == {"train/12_1_mask.tif": "excluded file name (*_mask.tif)",
                                    "train/3_7_mask.tif": "excluded file name (*_mask.tif)"}
    assert row["excluded"] == 2
