"""Shard writer: atomic shards, manifest contents, idempotence, skipped inputs, dedup and worker invariance."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import grain
import numpy as np
import pytest
from PIL import Image

from data_prep import writer
from usf_mae_jax.data import records

REPO = Path(__file__).resolve().parents[1]


def _gray(index: int, size: int = 12) -> np.ndarray:
    return np.full((size, size + 1), index % 256, np.uint8)


def load_numbered(task):
    """Task i -> one grayscale image filled with i; 3 raises SkipFile, 5 crashes, 6 yields a bad image."""
    if task == 3:
        raise writer.SkipFile("looks like a mask")
    if task == 5:
        raise RuntimeError("decoder exploded")
    if task == 6:
        yield writer.Example(image=np.zeros((4, 4), np.float32), source="six.png")
        return
    yield writer.Example(image=_gray(task), source=f"img/{task}.png", subject=f"s{task % 2}", label=task % 3,
                         split="val" if task == 9 else "train")


def load_big(task):
    yield writer.Example(image=np.zeros((300, 1000, 3), np.uint8) + np.array([1, 2, 3], np.uint8),
                         source=f"{task}.png")


def _read_all(folder: Path, manifest: dict, split: str) -> list[dict]:
    paths = [str(folder / name) for name in manifest["shards"][split]]
    source = grain.sources.ArrayRecordDataSource(paths)
    return [records.decode(source[i]) for i in range(len(source))]


def test_manifest_contents_and_skips(tmp_path):
    manifest = writer.write_dataset(tmp_path, "toy", list(range(10)), load_numbered, records_per_shard=3,
                                    progress=False, manifest_extra={"licence": "CC-BY 4.0"})
    folder = tmp_path / "toy"
    assert json.loads((folder / "manifest.json").read_text()) == manifest
    assert manifest["counts"] == {"train": 6, "val": 1} and manifest["total"] == 7
    assert manifest["shards"] == {"train": ["train-00000-of-00002.array_record",
                                            "train-00001-of-00002.array_record"],
                                  "val": ["val-00000-of-00001.array_record"]}
    nearest = manifest["variants"]["nearest224"]
    assert nearest == {"resize": "nearest", "size": 224, "codec": "raw", "shards": {
        "train": ["train.nearest224-00000-of-00002.array_record", "train.nearest224-00001-of-00002.array_record"],
        "val": ["val.nearest224-00000-of-00001.array_record"]}}
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["manifest.json", *manifest["shards"]["train"], *manifest["shards"]["val"], *nearest["shards"]["train"],
         *nearest["shards"]["val"]])
    reasons = {entry["input"]: entry["reason"] for entry in manifest["skipped"]}
    assert reasons["3"] == "looks like a mask"
    assert reasons["5"] == "RuntimeError: decoder exploded"
    assert "uint8" in reasons["6"] and manifest["skipped"][2]["example"] == "six.png#-1"
    assert manifest["licence"] == "CC-BY 4.0" and manifest["inputs"] == 10
    assert manifest["record_format_version"] == records.FORMAT_VERSION
    assert manifest["converter_version"].startswith("data_prep.writer")
    assert manifest["created"].endswith("+00:00") and manifest["channels"] == {"1": 7}
    assert manifest["labels"] == {"train": {"0": 1, "1": 3, "2": 2}, "val": {"0": 1}}
    assert set(manifest["source_hashes"]) == {f"img/{i}.png" for i in (0, 1, 2, 4, 7, 8, 9)}
    assert all(v.startswith("records:sha256:") for v in manifest["source_hashes"].values())
    decoded = _read_all(folder, manifest, "train")
    assert [r["source"] for r in decoded] == [f"img/{i}.png" for i in (0, 1, 2, 4, 7, 8)]
    assert decoded[3]["image"].shape == (12, 13, 1) and int(decoded[3]["image"][0, 0, 0]) == 4
    assert (decoded[3]["dataset"], decoded[3]["subject"], decoded[3]["label"]) == ("toy", "s0", 1)


def test_idempotent_unless_overwrite(tmp_path):
    first = writer.write_dataset(tmp_path, "toy", [0, 1, 2], load_numbered, progress=False)
    shard = tmp_path / "toy" / first["shards"]["train"][0]
    mtime = shard.stat().st_mtime_ns
    again = writer.write_dataset(tmp_path, "toy", [0, 1, 2, 4], load_numbered, progress=False)
    assert again == first and shard.stat().st_mtime_ns == mtime
    redone = writer.write_dataset(tmp_path, "toy", [0, 1, 2, 4], load_numbered, progress=False, overwrite=True)
    assert redone["total"] == 4 and redone["content_sha256"] != first["content_sha256"]


def test_worker_processes_give_identical_shards(tmp_path):
    serial = writer.write_dataset(tmp_path / "a", "toy", list(range(10)), load_numbered, progress=False,
                                  records_per_shard=4)
    parallel = writer.write_dataset(tmp_path / "b", "toy", list(range(10)), load_numbered, progress=False,
                                    records_per_shard=4, workers=2)
    assert parallel["content_sha256"] == serial["content_sha256"]
    assert parallel["skipped"] == serial["skipped"] and parallel["counts"] == serial["counts"]


def test_dedup_drops_with_reason(tmp_path):
    seen = set()

    def dedup(example):
        key = int(example.image[0, 0, 0]) % 2
        if key in seen:
            return f"duplicate of parity {key}"
        seen.add(key)
        return None

    manifest = writer.write_dataset(tmp_path, "toy", [0, 1, 2, 4], load_numbered, progress=False, dedup=dedup)
    assert manifest["total"] == 2
    assert manifest["dropped"] == [{"source": "img/2.png", "frame": -1, "reason": "duplicate of parity 0"},
                                   {"source": "img/4.png", "frame": -1, "reason": "duplicate of parity 0"}]


def pixel_parity(image):
    return int(image[0, 0, 0]) % 2


def test_fingerprints_are_computed_in_the_workers(tmp_path):
    """With `fingerprint`, the dedup callable sees the worker's fingerprint and no image (nothing shipped back);
    the nearest variant drops in step with the frames, so both shard sets stay aligned."""
    seen, images = set(), []

    def dedup(example):
        images.append(example.image)
        if example.fingerprint in seen:
            return f"same parity {example.fingerprint}"
        seen.add(example.fingerprint)
        return None

    manifest = writer.write_dataset(tmp_path, "toy", [0, 1, 2, 4, 7], load_numbered, progress=False, workers=2,
                                    dedup=dedup, fingerprint=pixel_parity)
    assert manifest["total"] == 2 and images == [None] * 5
    assert [d["reason"] for d in manifest["dropped"]] == ["same parity 0", "same parity 0", "same parity 1"]
    folder = tmp_path / "toy"
    nearest = grain.sources.ArrayRecordDataSource(
        [str(folder / n) for n in manifest["variants"]["nearest224"]["shards"]["train"]])
    assert [records.decode(nearest[i])["source"] for i in range(len(nearest))] == ["img/0.png", "img/1.png"]


def test_longest_side_cap_and_colour(tmp_path):
    manifest = writer.write_dataset(tmp_path, "big", [0], load_big, progress=False, max_side=128, nearest_size=0)
    image = _read_all(tmp_path / "big", manifest, "train")[0]["image"]
    assert image.shape == (38, 128, 3) and image[5, 5].tolist() == [1, 2, 3]
    assert manifest["channels"] == {"3": 1} and manifest["max_side"] == 128 and manifest["variants"] == {}
    assert sorted(p.name for p in (tmp_path / "big").iterdir()) == ["manifest.json", manifest["shards"]["train"][0]]


def load_speckle(task):
    """Task (seed, height, width, channels) -> a noise frame of that size: every pixel differs."""
    seed, height, width, channels = task
    shape = (height, width) if channels == 1 else (height, width, channels)
    yield writer.Example(image=np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8),
                         source=f"{height}x{width}x{channels}.png", label=seed)


def test_nearest_variant_is_the_pil_nearest_resize_of_the_original(tmp_path):
    """The usf_mae recipe's first step, Image.resize((224, 224), NEAREST) of the ORIGINAL frame, stored as is:
    the 512-px cap (an area downscale) applies to the stored frames only."""
    tasks = [(0, 480, 640, 1), (1, 800, 600, 1), (2, 800, 1000, 1), (3, 900, 1200, 3), (4, 150, 200, 1)]
    manifest = writer.write_dataset(tmp_path, "sizes", tasks, load_speckle, progress=False, workers=2)
    folder = tmp_path / "sizes"
    frames = _read_all(folder, manifest, "train")
    nearest_paths = [str(folder / n) for n in manifest["variants"]["nearest224"]["shards"]["train"]]
    source = grain.sources.ArrayRecordDataSource(nearest_paths)
    for task, frame, record in zip(tasks, frames, (source[i] for i in range(len(source)))):
        original = next(load_speckle(task)).image
        expected = np.asarray(Image.fromarray(original).resize((224, 224), Image.NEAREST))
        stored = records.decode(record)
        assert records.decode_header(record)["codec"] == "raw"
        np.testing.assert_array_equal(stored["image"], expected.reshape(224, 224, task[3]))
        assert (stored["source"], stored["label"]) == (frame["source"], frame["label"])  # aligned, record for record
        assert max(frame["image"].shape[:2]) == min(512, max(task[1:3]))  # the frames stay capped


def test_file_tasks_are_hashed(tmp_path):
    raw = tmp_path / "raw.bin"
    raw.write_bytes(b"hello")

    manifest = writer.write_dataset(tmp_path / "out", "files", [(str(raw), "raw.bin")], load_pair,
                                    progress=False)
    # sha256(b"hello")
    assert manifest["source_hashes"] == {
        "raw.bin": "file:sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"}


def load_pair(task):
    yield writer.Example(image=np.ones((5, 5), np.uint8), source=task[1])


def test_bad_arguments_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="plain folder name"):
        writer.write_dataset(tmp_path, "../escape", [], load_numbered, progress=False)
    with pytest.raises(ValueError, match="own keys"):
        writer.write_dataset(tmp_path, "x", [], load_numbered, progress=False, manifest_extra={"counts": 1})


KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from data_prep import writer

    def load(task):
        if task == 7 and os.environ.get("KILL_AT_7"):
            os.kill(os.getpid(), signal.SIGKILL)
        yield writer.Example(image=np.full((8, 8), task, np.uint8), source=f"{task}.png")

    writer.write_dataset(sys.argv[1], "toy", list(range(10)), load, records_per_shard=2, progress=False)
""")


def test_interrupted_write_leaves_no_complete_looking_shard(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(KILLED_RUN)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "KILL_AT_7": "1"}
    killed = subprocess.run([sys.executable, str(script), str(out)], env=env, capture_output=True)
    assert killed.returncode == -9
    names = sorted(p.name for p in (out / "toy").iterdir())
    # Three shards of two records were complete when the process died; none carries a final name.
    assert names == [f".train-{i:05d}.array_record.tmp" for i in range(4)] + [
        f".train.nearest224-{i:05d}.array_record.tmp" for i in range(4)]
    assert writer.read_manifest(out / "toy") is None
    env.pop("KILL_AT_7")
    subprocess.run([sys.executable, str(script), str(out)], env=env, check=True, capture_output=True)
    manifest = writer.read_manifest(out / "toy")
    assert manifest["total"] == 10
    assert sorted(p.name for p in (out / "toy").iterdir()) == sorted(
        ["manifest.json", *[f"train-{i:05d}-of-00005.array_record" for i in range(5)],
         *[f"train.nearest224-{i:05d}-of-00005.array_record" for i in range(5)]])
