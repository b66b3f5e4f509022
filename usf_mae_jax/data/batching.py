"""One host batch per call: read, decode and augment B records straight into the batch array.

`BatchMaker(batch_index)` is the only per-batch function of the pipeline (pipeline.py, steps 3 and 4).
Doing a whole batch per call, rather than one record per grain element followed by grain's batching, is
the measured choice (docs/data_pipeline.md): it removes grain's per-element futures and buffers and the
final `np.stack`, which were about half of the Python work per image, so threads spend their time in
OpenCV (which releases the GIL) instead of queueing for the GIL, on an idle host and even more on a busy one.

Records are a pure function of the batch index: slot k of batch b is stream position b * B + k of the
`MixtureSource`, and its augmentation draws from a generator seeded by (seed, dataset, epoch, record), so
the same record in the same epoch gets the same crop on any host layout and after any restart.

Corrupt records. A record that cannot be read (`shards.UnreadableRecordError`, e.g. a flipped byte caught
by ArrayRecord's chunk hash) or decoded (`records.CorruptRecordError`) is counted by `CorruptRecordBudget`,
logged with its shard file, record index and source, and its slot is filled by the dataset's next record
in stream order (with the slot's own augmentation draw), so batches stay full and a resumed run makes the
same substitutions. Once more than `max_corrupt_fraction` of the distinct records read are corrupt (after
at least `MIN_RECORDS_FOR_CORRUPT_CHECK`), the batch raises one `RuntimeError` listing them.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np

from usf_mae_jax.data import augment, records, shards

MIN_RECORDS_FOR_CORRUPT_CHECK = 100  # do not fail a run on 1 bad record among the first 10
_LOGGED_CORRUPT_IN_FULL = 20
_LISTED_IN_ERROR = 20
_REPLACEMENT_ATTEMPTS = 16  # consecutive corrupt records of one dataset before giving up on the slot

log = logging.getLogger("usf_mae_jax.data.pipeline")


class CorruptRecordBudget:
    """Counts the distinct records read and the distinct corrupt ones (per process); raises once the corrupt
    share passes the limit.

    Distinct, not reads: a damaged record is met again every epoch of its dataset, and counting each meeting
    would let a short window (the end of one epoch and the start of the next, say right after a resume)
    look twice as damaged as the dataset is. A dataset's slots are read in rank order and its ranks cover
    its records once per epoch, so the distinct records read are min(highest - lowest rank + 1, its size).
    """

    def __init__(self, max_fraction: float, dataset_sizes: list[int]):
        self.max_fraction = float(max_fraction)
        self.sizes = list(dataset_sizes)
        self._min_seen = min(MIN_RECORDS_FOR_CORRUPT_CHECK, sum(self.sizes))  # a small set is judged whole
        self._lowest: dict[int, int] = {}
        self._highest: dict[int, int] = {}
        self.seen = 0  # distinct records read, over all datasets
        self.records: dict[str, str] = {}  # description -> reason, each corrupt record once, in order
        self._lock = threading.Lock()

    def _coverage(self, dataset: int) -> int:
        if dataset not in self._highest:
            return 0
        return min(self._highest[dataset] - self._lowest[dataset] + 1, self.sizes[dataset])

    def _read(self, dataset: int, rank: int) -> None:
        before = self._coverage(dataset)
        if dataset not in self._highest:
            self._lowest[dataset] = self._highest[dataset] = rank
        elif rank > self._highest[dataset]:
            self._highest[dataset] = rank
        elif rank < self._lowest[dataset]:
            self._lowest[dataset] = rank
        self.seen += self._coverage(dataset) - before

    def record_ok(self, dataset: int, rank: int) -> None:
        with self._lock:
            self._read(dataset, rank)
            if self.records:
                self._check()

    def record_corrupt(self, dataset: int, rank: int, where: str, reason: str) -> None:
        with self._lock:
            self._read(dataset, rank)
            if where not in self.records:
                self.records[where] = reason
                if len(self.records) <= _LOGGED_CORRUPT_IN_FULL or len(self.records) % 100 == 0:
                    log.warning("corrupt record skipped (%d so far of %d read): %s: %s", len(self.records),
                                self.seen, where, reason)
            else:
                log.info("corrupt record skipped again: %s", where)
            self._check()

    def _check(self) -> None:
        seen, corrupt = self.seen, len(self.records)
        if seen < self._min_seen or corrupt <= self.max_fraction * seen:
            return
        listed = list(self.records.items())[:_LISTED_IN_ERROR]
        more = f"; and {corrupt - len(listed)} more" if corrupt > len(listed) else ""
        raise RuntimeError(
            f"{corrupt} of the {seen} records read are corrupt, more than input.max_corrupt_fraction="
            f"{self.max_fraction}: " + "; ".join(f"{w}: {r}" for w, r in listed) + more
            + ". Re-convert those datasets (python -m data_prep ... --overwrite) or leave them out.")


def _where(reader: Any, index: int, header: dict[str, Any], dataset_name: str) -> str:
    """'<shard file> record <i> (<dataset>/<source>[#frame])' for a log line or an error."""
    if isinstance(reader, shards.RecordReader):
        shard, position = reader.locate(index)
        place = f"{reader.paths[shard]} record {position}"
        header = header or reader.aligned_header(index)
    else:
        place = f"{dataset_name} record {index}"
    if not header.get("source"):
        return f"{place} (source unknown: header unreadable)"
    frame = header.get("frame", -1)
    source = header["source"] + (f"#{frame}" if isinstance(frame, int) and frame >= 0 else "")
    return f"{place} ({header.get('dataset', dataset_name)}/{source})"


class BatchMaker:
    """Batch index -> {'image': uint8 (B, size, size, channels)[, 'label': int32 (B,)]} (module docstring)."""

    def __init__(self, mixture: Any, *, batch_size: int, preset: str, size: int, channels: int, seed: int,
                 max_corrupt_fraction: float, with_labels: bool = False):
        self.mixture, self.batch_size, self.preset, self.size = mixture, int(batch_size), preset, int(size)
        self.channels, self.seed, self.with_labels = int(channels), int(seed), with_labels
        self.budget = CorruptRecordBudget(max_corrupt_fraction, mixture.local_sizes)
        self._augment = augment.make_augment(preset, self.size)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["budget"] = self.budget.max_fraction  # each worker process keeps its own count
        del state["_augment"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.budget = CorruptRecordBudget(state["budget"], self.mixture.local_sizes)
        self._augment = augment.make_augment(self.preset, self.size)

    def _example(self, dataset: int, rank: int) -> dict[str, Any]:
        """The decoded record of a dataset's rank-th slot, or of the next readable one (counted as corrupt)."""
        source = self.mixture.sources[dataset]
        for attempt in range(_REPLACEMENT_ATTEMPTS):
            _, index = self.mixture.record(dataset, rank + attempt)
            try:
                raw = source[index]
                example = raw if isinstance(raw, dict) else records.decode(raw)  # in-memory sources: decoded
            except (shards.UnreadableRecordError, records.CorruptRecordError) as e:
                where = _where(source, index, e.header, self.mixture.names[dataset])
                self.budget.record_corrupt(dataset, rank + attempt, where, getattr(e, "reason", str(e)))
                continue
            self.budget.record_ok(dataset, rank + attempt)
            return example
        raise RuntimeError(f"dataset {self.mixture.names[dataset]}: {_REPLACEMENT_ATTEMPTS} consecutive records "
                           "are corrupt; re-convert it (python -m data_prep ... --overwrite) or leave it out")

    def __call__(self, batch_index: int) -> dict[str, np.ndarray]:
        count, start = self.batch_size, int(batch_index) * self.batch_size
        images = np.empty((count, self.size, self.size, self.channels), np.uint8)
        labels = np.empty(count, np.int32) if self.with_labels else None
        for k in range(count):
            dataset, rank = self.mixture.slot(start + k)
            epoch, index = self.mixture.record(dataset, rank)
            example = self._example(dataset, rank)
            image = augment.set_channels(example["image"], self.channels)
            images[k] = self._augment(image, np.random.default_rng([self.seed, dataset, epoch, index]))
            if labels is not None:
                labels[k] = example.get("label", -1)
        return {"image": images} if labels is None else {"image": images, "label": labels}
