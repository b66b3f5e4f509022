"""One flipped byte inside one record of a real shard written by data_prep: the record is skipped and named
(shard file, record index, source), counted under input.max_corrupt_fraction, fatal past it with one error
listing it, and a resumed run makes the same substitution without crashing."""

import logging
import re
from pathlib import Path

import jax
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader
from test_pipeline import _config as pipeline_config

from data_prep import writer
from usf_mae_jax.data import batching, pipeline, shards

SIDE = 16
RECORDS, PER_SHARD, BAD = 200, 64, 70  # record 70 is record 6 of the second shard


def load_noise(index):
    image = np.random.default_rng(index).integers(0, 256, (20, 24), dtype=np.uint8)
    yield writer.Example(image=image, source=f"img{index}.png")


def _flip(path: str, position: int, offset: int) -> None:
    """Flips one byte of record `position` of the shard, `offset` bytes into the record (negative: from its
    end). Shards are group_size:1 and uncompressed, so the record's bytes appear verbatim in the file."""
    record = ArrayRecordReader(path).read([position])[0]
    data = bytearray(Path(path).read_bytes())
    start = data.find(record)
    assert start > 0 and data.find(record, start + 1) == -1
    data[start + (offset if offset >= 0 else len(record) + offset)] ^= 0xFF
    Path(path).write_bytes(bytes(data))


@pytest.fixture
def flipped(tmp_path):
    """A 200-record dataset whose nearest16 variant (what usf_mae reads at 16 px) has one damaged record."""
    manifest = writer.write_dataset(tmp_path, "flipped", list(range(RECORDS)), load_noise, progress=False,
                                    records_per_shard=PER_SHARD, nearest_size=SIDE)
    shard = str(tmp_path / "flipped" / manifest["variants"][f"nearest{SIDE}"]["shards"]["train"][1])
    return tmp_path / "flipped", shard


def _config(folder, **overrides):
    return pipeline_config(folder, **{"augment": "usf_mae", "prefetch_buffer": 4, **overrides})


def _take(stream, count):
    iterator = iter(stream)
    return [next(iterator)["image"] for _ in range(count)]


def test_a_flipped_byte_is_skipped_and_named(flipped, caplog):
    folder, shard = flipped
    _flip(shard, BAD - PER_SHARD, -10)  # a pixel byte
    with pytest.raises(shards.UnreadableRecordError, match="chunk data hash mismatch") as info:
        shards.RecordReader([shard])[BAD - PER_SHARD]  # no aligned shards: the header comes from the chunk
    assert (info.value.shard, info.value.position, info.value.header["source"]) == (shard, BAD - PER_SHARD,
                                                                                   f"img{BAD}.png")
    with caplog.at_level(logging.INFO, logger="usf_mae_jax.data.pipeline"):
        batches = _take(pipeline.build_host_dataset(_config(folder), batch_size=20, img_size=SIDE, seed=0), 20)
    assert len(batches) == 20 and all(b.shape == (20, SIDE, SIDE, 1) for b in batches)  # 2 epochs, full batches
    where = f"{shard} record {BAD - PER_SHARD} (flipped/img{BAD}.png)"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("corrupt record skipped (1 so far of ")
    assert f"{where}: Corrupted Riegeli/records file: chunk data hash mismatch" in warnings[0]
    again = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert again and set(again) == {f"corrupt record skipped again: {where}"}  # later epochs meet it again


def test_header_damage_falls_back_to_the_aligned_frames(flipped, caplog):
    folder, shard = flipped
    _flip(shard, BAD - PER_SHARD, 0)  # the record's magic: its own header is lost
    with pytest.raises(shards.UnreadableRecordError) as info:
        shards.RecordReader([shard])[BAD - PER_SHARD]
    assert info.value.header == {}
    with caplog.at_level(logging.WARNING, logger="usf_mae_jax.data.pipeline"):
        _take(pipeline.build_host_dataset(_config(folder), batch_size=20, img_size=SIDE, seed=0), 10)
    assert f"{shard} record {BAD - PER_SHARD} (flipped/img{BAD}.png)" in caplog.text


def test_past_the_fraction_one_error_lists_the_records(flipped):
    folder, shard = flipped
    _flip(shard, BAD - PER_SHARD, -10)
    stream = pipeline.build_host_dataset(_config(folder, max_corrupt_fraction=0.0), batch_size=20, img_size=SIDE,
                                         seed=0)
    with pytest.raises(RuntimeError) as info:
        _take(stream, 20)
    message = str(info.value)
    assert re.match(r"1 of the 1\d\d records read are corrupt, more than input\.max_corrupt_fraction=0\.0: "
                    + re.escape(f"{shard} record {BAD - PER_SHARD} (flipped/img{BAD}.png): Corrupted Riegeli/records "
                                "file: chunk data hash mismatch"), message)
    assert message.endswith("Re-convert those datasets (python -m data_prep ... --overwrite) or leave them out.")
    assert "\n" not in message


def test_resume_makes_the_same_substitution(flipped):
    folder, shard = flipped
    _flip(shard, BAD - PER_SHARD, -10)
    mesh = jax.make_mesh((1, 1), ("data", "fsdp"))

    def fresh():
        return pipeline.make_pretrain_iterator(_config(folder), global_batch_size=20, img_size=SIDE, seed=3,
                                               mesh=mesh)

    reference = fresh()
    expected = [np.asarray(next(reference)["image"]) for _ in range(14)]
    interrupted = fresh()
    for _ in range(6):
        next(interrupted)
    state = interrupted.get_state()
    resumed = fresh()
    resumed.set_state(state)
    for step in range(6, 14):
        np.testing.assert_array_equal(np.asarray(next(resumed)["image"]), expected[step])


def test_an_unreadable_shard_is_a_one_line_error_naming_it(flipped):
    folder, shard = flipped
    Path(shard).write_bytes(Path(shard).read_bytes()[:100])
    with pytest.raises(ValueError, match=rf"^{shard}: not a readable ArrayRecord shard: [^\n]+$"):
        pipeline.build_host_dataset(_config(folder), batch_size=20, img_size=SIDE, seed=0)


def test_the_budget_counts_distinct_records():
    """A dataset's ranks cover its records once per epoch: two epochs of a 50-record set are 50 records, and
    a damaged record met in both is one corrupt record; resuming mid-epoch counts from there."""
    budget = batching.CorruptRecordBudget(0.05, [50, 400])
    for rank in range(100):  # two epochs of dataset 0, with record "a" damaged in both
        if rank % 50 == 7:
            budget.record_corrupt(0, rank, "a", "bad")
        else:
            budget.record_ok(0, rank)
    assert budget.seen == 50 and list(budget.records) == ["a"]
    for rank in range(300, 360):  # dataset 1 from a resumed position
        budget.record_ok(1, rank)
    assert budget.seen == 110
    budget.record_corrupt(1, 360, "b", "bad")
    budget.record_corrupt(1, 361, "c", "bad")
    budget.record_corrupt(1, 362, "d", "bad")  # 4 of 113 distinct records: 3.5 %, still within 5 %
    with pytest.raises(RuntimeError, match=r"^6 of the 115 records read are corrupt, more than input\.max_corru"):
        budget.record_corrupt(1, 363, "e", "bad")
        budget.record_corrupt(1, 364, "f", "bad")
