"""Grain pipeline: mixing, epoch shuffles, host sharding, determinism, exact resume through Orbax, corrupt data."""

import logging
import re

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from array_record.python.array_record_module import ArrayRecordWriter
from ml_collections import ConfigDict
from PIL import Image

from data_prep import writer
from usf_mae_jax.cli import ConfigError
from usf_mae_jax.core import checkpoint
from usf_mae_jax.data import augment, pipeline

SIDE = 8


def load_indexed(task):
    """Task (i, channels) -> an 8x8 image whose every pixel is i (colour: i, i + 1, i + 2)."""
    index, channels = task
    image = np.full((SIDE, SIDE), index, np.uint8)
    if channels == 3:
        image = np.stack([image, image + 1, image + 2], axis=2)
    yield writer.Example(image=image, source=f"img{index}.png", label=index % 2)


def _dataset(root, name, values, channels=1, per_shard=5):
    writer.write_dataset(root, name, [(v, channels) for v in values], load_indexed, records_per_shard=per_shard,
                         progress=False)
    return root / name


def _config(data_dir, **overrides):
    cfg = ConfigDict({"source": "shards", "data_dir": str(data_dir), "weights": "", "augment": "none",
                      "synthetic_count": 16, "synthetic_seed": 0, "num_threads": 2, "prefetch_buffer": 8,
                      "device_prefetch": 2, "worker_processes": 0, "max_corrupt_fraction": 0.01})
    cfg.update(overrides)
    return cfg


def _values(batches):
    """The record id of every image in a list of host batches (pixel [0, 0, 0])."""
    return [int(v) for b in batches for v in np.asarray(b["image"])[:, 0, 0, 0]]


def _take(stream, count):
    iterator = iter(stream)
    return [next(iterator) for _ in range(count)]


def test_mixture_quotas_follow_weights_exactly():
    source = pipeline.MixtureSource([range(1000), range(30), range(7)], np.array([0.6, 0.3, 0.1]), seed=0)
    positions = 3 * source.block
    picks = np.array([source.locate(i)[0] for i in range(positions)])
    counts = np.bincount(picks)
    # floor(position * weight) for the lighter datasets (< 1 off), the rest for the heaviest (< D off).
    assert counts[1:].tolist() == [int(0.3 * positions), int(0.1 * positions)]
    assert counts.sum() == positions and np.abs(counts - positions * np.array([0.6, 0.3, 0.1])).max() < 3
    # Within any prefix each share stays within one block of its weight.
    for start in (0, 333, 5000):  # any window holds each share to within about one example
        window = picks[start:start + 64]
        assert np.abs(np.bincount(window, minlength=3) - 64 * np.array([0.6, 0.3, 0.1])).max() <= 2


def test_each_dataset_epoch_is_a_permutation_and_epochs_differ():
    source = pipeline.MixtureSource([range(10), range(5)], np.array([2 / 3, 1 / 3]), seed=3)
    by_dataset = {0: [], 1: []}
    for position in range(source.block):
        dataset, epoch, index = source.locate(position)
        by_dataset[dataset].append((epoch, index))
    assert len(by_dataset[1]) == source.block // 3 == 1365 and len(by_dataset[0]) == 2731
    # Dataset slots are consumed in order: epoch e of dataset 1 is its slots 5e .. 5e + 4.
    assert [e for e, _ in by_dataset[1]] == [j // 5 for j in range(1365)]
    epochs = [[i for e, i in by_dataset[1] if e == k] for k in range(273)]
    assert all(sorted(epoch) == list(range(5)) for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) > 1  # reshuffled every epoch


def test_weights_parsing():
    np.testing.assert_allclose(pipeline.mixture_weights("", [30, 10]), [0.75, 0.25])
    np.testing.assert_allclose(pipeline.mixture_weights("1,1", [30, 10]), [0.5, 0.5])
    with pytest.raises(ValueError, match="2 entries for 3 datasets"):
        pipeline.mixture_weights("1,2", [1, 2, 3])
    with pytest.raises(ValueError, match="non-negative"):
        pipeline.mixture_weights("1,-1", [1, 2])


def test_host_sharding_two_processes_disjoint_and_complete(tmp_path):
    _dataset(tmp_path, "a", range(24))
    cfg = _config(tmp_path / "a")
    per_process = [set(_values(_take(pipeline.build_host_dataset(cfg, batch_size=4, img_size=SIDE, seed=1,
                                                                 process_index=p, process_count=2), 3)))
                   for p in (0, 1)]
    assert len(per_process[0]) == 12 and len(per_process[1]) == 12  # one full local epoch each, no repeats
    assert per_process[0].isdisjoint(per_process[1])
    assert per_process[0] | per_process[1] == set(range(24))


def test_mixture_of_datasets_from_a_root(tmp_path):
    _dataset(tmp_path, "big", range(0, 40))
    _dataset(tmp_path, "small", range(100, 104))
    cfg = _config(tmp_path, weights="1,1")
    values = _values(_take(pipeline.build_host_dataset(cfg, batch_size=8, img_size=SIDE, seed=0), 8))
    small = [v for v in values if v >= 100]
    assert abs(len(small) - 32) <= 1  # half of 64 despite being 10x smaller: it repeats 8 times
    assert sorted(set(small)) == [100, 101, 102, 103]
    assert pipeline.images_per_epoch(cfg) == 44


def test_same_seed_same_batches_other_seed_different(tmp_path):
    _dataset(tmp_path, "a", range(30))
    cfg = _config(tmp_path / "a", augment="usf_mae")
    first = _take(pipeline.build_host_dataset(cfg, batch_size=5, img_size=16, seed=7), 4)
    again = _take(pipeline.build_host_dataset(cfg, batch_size=5, img_size=16, seed=7), 4)
    other = _take(pipeline.build_host_dataset(cfg, batch_size=5, img_size=16, seed=8), 4)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a["image"], b["image"])
    assert first[0]["image"].shape == (5, 16, 16, 1) and first[0]["image"].dtype == np.uint8
    assert not all(np.array_equal(a["image"], c["image"]) for a, c in zip(first, other))


def test_colour_datasets_make_three_channel_batches(tmp_path):
    _dataset(tmp_path, "gray", range(10))
    _dataset(tmp_path, "colour", range(50, 60), channels=3)
    batch = _take(pipeline.build_host_dataset(_config(tmp_path), batch_size=20, img_size=SIDE, seed=0), 1)[0]
    pixels = {tuple(int(c) for c in image[0, 0]) for image in batch["image"]}
    assert batch["image"].shape == (20, SIDE, SIDE, 3)
    assert any(p[0] < 10 for p in pixels) and any(p[0] >= 50 for p in pixels)
    assert all(p == (p[0], p[0], p[0]) for p in pixels if p[0] < 10)  # grayscale replicated
    assert all(p == (p[0], p[0] + 1, p[0] + 2) for p in pixels if p[0] >= 50)  # colour kept
    gray = _take(pipeline.build_host_dataset(_config(tmp_path, channels=1), batch_size=20, img_size=SIDE,
                                             seed=0), 1)[0]
    assert gray["image"].shape == (20, SIDE, SIDE, 1)


def _resumable(tmp_path):
    """(config, fresh): a 23-record dataset and a function making the same pretraining iterator over it."""
    _dataset(tmp_path, "a", range(23))
    cfg = _config(tmp_path / "a", augment="usf_mae")
    mesh = jax.make_mesh((1, 1), ("data", "fsdp"))
    return cfg, lambda: pipeline.make_pretrain_iterator(cfg, global_batch_size=4, img_size=16, seed=5, mesh=mesh)


def test_exact_resume_through_orbax(tmp_path):
    _, fresh = _resumable(tmp_path)
    reference = fresh()
    expected = [np.asarray(next(reference)["image"]) for _ in range(9)]

    interrupted = fresh()
    for _ in range(4):
        next(interrupted)
    manager = ocp.CheckpointManager(tmp_path / "ckpt")
    state = {"w": jnp.arange(3.0)}
    manager.save(4, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data_iter=grain.checkpoint.CheckpointSave(checkpoint.FrozenIteratorState(interrupted.get_state()))))
    manager.wait_until_finished()
    next(interrupted)  # the killed run went a bit further before dying

    assert not np.array_equal(expected[0], expected[4])  # a restart without the state would not match
    resumed = fresh()
    restored = ocp.CheckpointManager(tmp_path / "ckpt").restore(4, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(state), data_iter=grain.checkpoint.CheckpointRestore(resumed)))
    np.testing.assert_array_equal(restored["state"]["w"], np.arange(3.0))
    for step in range(4, 9):
        np.testing.assert_array_equal(np.asarray(next(resumed)["image"]), expected[step])


def test_iterator_states_from_before_batch_elements_resume_at_the_same_batch(tmp_path, caplog):
    """States saved when grain's elements were records (and the key was data_dirs) count records: 12
    records of batches of 4 is batch 3."""
    cfg, fresh = _resumable(tmp_path)
    reference = fresh()
    expected = [np.asarray(next(reference)["image"]) for _ in range(5)]
    old_description = {("data_dirs" if k == "data_dir" else k): v
                       for k, v in pipeline.describe(cfg, 16, 5).items()}
    resumed = fresh()
    with caplog.at_level(logging.WARNING, logger="usf_mae_jax.data.pipeline"):
        resumed.set_state({"grain": {"next_index": 12}, "pipeline": old_description})
    assert "different configuration" not in caplog.text
    np.testing.assert_array_equal(np.asarray(next(resumed)["image"]), expected[3])


def _corrupt_some(folder, bad_positions, keep_header):
    """Rewrites the dataset's single shard with the records at `bad_positions` damaged (a readable record whose
    image does not decode, or garbage bytes)."""
    manifest = writer.read_manifest(folder)
    path = str(folder / manifest["shards"]["train"][0])
    good = grain.sources.ArrayRecordDataSource([path])
    rewritten = [good[i] for i in range(len(good))]
    for i in bad_positions:
        rewritten[i] = rewritten[i][:-20] + b"\x00" * 20 if keep_header else b"garbage"
    out = ArrayRecordWriter(path, writer.ARRAY_RECORD_OPTIONS)
    for record in rewritten:
        out.write(record)
    out.close()


def test_undecodable_records_are_logged_and_replaced(tmp_path, caplog):
    folder = _dataset(tmp_path, "damaged", range(40), per_shard=100)
    _corrupt_some(folder, [3], keep_header=True)
    cfg = _config(folder, max_corrupt_fraction=0.05)
    with caplog.at_level(logging.WARNING, logger="usf_mae_jax.data.pipeline"):
        values = _values(_take(pipeline.build_host_dataset(cfg, batch_size=13, img_size=SIDE, seed=0), 3))
    # The first 39 slots of the epoch: the bad record's slot holds the dataset's next record instead.
    assert 3 not in values and len(values) == 39 and len(set(values)) == 38
    assert "corrupt record skipped" in caplog.text and "train-00000-of-00001.array_record record 3 " in caplog.text
    assert "(damaged/img3.png)" in caplog.text and "does not decode" in caplog.text


def test_too_many_corrupt_records_fail_loudly(tmp_path):
    folder = _dataset(tmp_path, "rotten", range(40), per_shard=100)
    _corrupt_some(folder, range(0, 40, 4), keep_header=False)
    stream = pipeline.build_host_dataset(_config(folder), batch_size=10, img_size=SIDE, seed=0)
    with pytest.raises(RuntimeError, match=r"records read are corrupt, more than input\.max_corrupt_fraction") as info:
        _take(stream, 30)
    # Garbage bytes have no header; the stored nearest variant's record names the source.
    assert re.search(r"train-00000-of-00001\.array_record record (\d+) \(rotten/img\1\.png\): 7-byte record is",
                     str(info.value))


# (width, height, channels) of real frame sizes: all larger than the converter's default 512-px cap.
FIDELITY_FRAMES = [(640, 480, 1), (600, 800, 1), (1000, 800, 1), (1200, 900, 3)]


def load_frame(task):
    """Task i -> noise of FIDELITY_FRAMES[i] (every pixel differs, so any smoothing shows)."""
    width, height, channels = FIDELITY_FRAMES[task]
    shape = (height, width) if channels == 1 else (height, width, channels)
    yield writer.Example(image=np.random.default_rng(task).integers(0, 256, shape, dtype=np.uint8),
                         source=f"frame{task}.png")


def _authors_nearest(task):
    """What the authors' loader has after step 1: PIL's Resize((224, 224), NEAREST) of the original, in RGB."""
    original = next(load_frame(task)).image
    resized = np.asarray(Image.fromarray(original).convert("RGB").resize((224, 224), Image.NEAREST))
    return resized


@pytest.mark.parametrize("preset", ["eval", "usf_mae"])
def test_usf_mae_pixels_are_the_authors_nearest_resize_of_the_original(tmp_path, preset):
    """Converted with the defaults (frames capped at 512 px), the usf_mae and eval presets still start from the
    nearest 224 resize of the ORIGINAL frame: the eval batch equals PIL's resize exactly, and the usf_mae batch
    equals the rest of the recipe applied to it with the record's own generator."""
    writer.write_dataset(tmp_path, "frames", list(range(len(FIDELITY_FRAMES))), load_frame, progress=False)
    cfg = _config(tmp_path / "frames", augment=preset)
    batch = _take(pipeline.build_host_dataset(cfg, batch_size=4, img_size=224, seed=11), 1)[0]["image"]
    assert batch.shape == (4, 224, 224, 3)  # one colour dataset makes every batch RGB
    order = pipeline.MixtureSource([range(4)], np.ones(1), seed=11)
    for slot in range(4):
        _, epoch, index = order.locate(slot)
        expected = _authors_nearest(index)
        if preset == "usf_mae":
            expected = augment.make_augment("usf_mae", 224)(expected, np.random.default_rng([11, 0, epoch, index]))
        np.testing.assert_array_equal(batch[slot], expected)


def test_mae_reads_the_frames_and_old_shards_fall_back_with_a_warning(tmp_path, caplog):
    writer.write_dataset(tmp_path, "old", list(range(4)), load_frame, progress=False, nearest_size=0)
    info = pipeline.find_datasets(str(tmp_path / "old"))[0]
    assert info.nearest == {} and info.max_side == 512
    mae = _take(pipeline.build_host_dataset(_config(tmp_path / "old", augment="mae"), batch_size=4, img_size=32,
                                            seed=0), 1)[0]["image"]
    assert mae.shape == (4, 32, 32, 3)
    with caplog.at_level(logging.WARNING, logger="usf_mae_jax.data.pipeline"):
        batch = _take(pipeline.build_host_dataset(_config(tmp_path / "old", augment="eval"), batch_size=4,
                                                  img_size=224, seed=0), 1)[0]["image"]
    assert "no stored nearest224 variant" in caplog.text and "max_side=512" in caplog.text
    index = pipeline.MixtureSource([range(4)], np.ones(1), seed=0).locate(0)[2]
    assert not np.array_equal(batch[0], _authors_nearest(index))  # resized from the capped frame: not exact


def test_missing_or_unfinished_data_dir_are_clear_errors(tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / ".train-00000.array_record.tmp").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no finished dataset"):
        pipeline.find_datasets(str(tmp_path / "half"))
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        pipeline.find_datasets(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match=r"input\.data_dir is empty"):
        pipeline.find_datasets(" , ")


def test_synthetic_source_keeps_working():
    cfg = _config("", source="synthetic", synthetic_count=12)
    batches = _take(pipeline.build_host_dataset(cfg, batch_size=4, img_size=16, seed=0), 3)
    assert batches[0]["image"].shape == (4, 16, 16, 1)
    assert pipeline.images_per_epoch(cfg) == 12


def test_worker_processes_match_threads(tmp_path):
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags (docs/jax_stack.md 2b)
    _dataset(tmp_path, "a", range(20))
    threads = _take(pipeline.build_host_dataset(_config(tmp_path / "a"), batch_size=4, img_size=SIDE, seed=2), 4)
    stream = pipeline.build_host_dataset(_config(tmp_path / "a", worker_processes=1), batch_size=4,
                                         img_size=SIDE, seed=2)
    iterator = iter(stream)
    processes = [next(iterator) for _ in range(4)]
    iterator.close()
    assert _values(processes) == _values(threads)


def test_thread_defaults(monkeypatch):
    monkeypatch.setattr(pipeline.os, "sched_getaffinity", lambda pid: set(range(8)))
    assert pipeline.host_threads(_config("", num_threads=0)) == 4  # in-process: half, the GIL is shared
    assert pipeline.host_threads(_config("", num_threads=0, worker_processes=3)) == 2
    assert pipeline.host_threads(_config("", num_threads=0, worker_processes=16)) == 1
    assert pipeline.host_threads(_config("", num_threads=5, worker_processes=3)) == 5


def load_sized(task):
    """Task (i, side) -> a side x side image whose every pixel is i."""
    index, side = task
    yield writer.Example(image=np.full((side, side), index, np.uint8), source=f"img{index}.png")


def test_none_on_frames_of_another_size_says_what_to_set(tmp_path):
    writer.write_dataset(tmp_path, "big", [(i, 12) for i in range(4)], load_sized, progress=False)
    with pytest.raises(ConfigError, match=r"but \S+/big holds 12x12 frames: set --config.input.augment=eval "
                                          r"\(nearest resize to 8\) or --config.model.img_size=12"):
        pipeline.build_host_dataset(_config(tmp_path / "big"), batch_size=2, img_size=SIDE, seed=0)
    eval_batch = _take(pipeline.build_host_dataset(_config(tmp_path / "big", augment="eval"), batch_size=2,
                                                   img_size=SIDE, seed=0), 1)[0]["image"]
    assert eval_batch.shape == (2, SIDE, SIDE, 1)


def test_none_meeting_a_frame_of_another_size_later_stops_with_the_same_advice(tmp_path):
    # The first record fits, so the up-front check passes; the odd one is met while batching.
    writer.write_dataset(tmp_path, "mixed", [(0, SIDE), (1, 12)], load_sized, progress=False)
    with pytest.raises(ConfigError, match=r"got 12x12 frames: set --config.input.augment=eval"):
        _take(pipeline.build_host_dataset(_config(tmp_path / "mixed"), batch_size=2, img_size=SIDE, seed=0), 1)
