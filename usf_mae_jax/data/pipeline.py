"""Input pipelines: host-sharded grain datasets turned into global `jax.Array` batches on the mesh.

The training loop sees one interface, `GlobalBatchIterator`:

    it = make_pretrain_iterator(config.input, global_batch_size=..., img_size=..., seed=..., mesh=mesh)
    batch = next(it)        # {'image': uint8 jax.Array (B, H, W, C)}, sharded over the mesh's batch axes
    state = it.get_state()  # JSON bytes describing exactly the batches consumed so far (not the prefetched)
    it.set_state(state)     # continue with bit-identical batches after a restart

What happens on each host, in order (`build_host_dataset`):

1. **Reading.** `input.data_dir` names dataset folders written by `data_prep` (a folder, a comma list of
   folders, or a root holding several); only finished folders (with `manifest.json`) are read. Each
   dataset is read through one `shards.RecordReader` over the shards of the stored variant that the
   augmentation needs: the nearest-resized copy (`<split>.nearest224-*`) for `usf_mae` and `eval` at that
   size, which is exactly the recipe's first step applied to the original frame, else the frames
   (docs/data_pipeline.md). `input.source='synthetic'` uses in-memory synthetic images through the same path.
2. **Order and mixing** (`MixtureSource`). Each dataset is cut per process (`process_index::process_count`,
   disjoint, union = everything), and reshuffled every epoch of *that dataset* with a permutation seeded by
   (seed, dataset, epoch). The datasets are interleaved by `input.weights` (default: proportional to size):
   the stream is cut in blocks in which each dataset gets exactly its share of slots, spread evenly with a
   seeded phase, so every batch has the configured mix, a few huge video sets cannot dominate and small sets
   simply repeat more often. Every position of the infinite stream is a pure function of (seed, position):
   random access, hence exact resume.
3. **Batches** (`batching.BatchMaker`). Batch b holds stream positions [b * B, (b + 1) * B); one call
   reads, decodes and augments its B records straight into the batch array. A record that cannot be read
   or decoded is counted against `input.max_corrupt_fraction`, logged with its shard file, record index and
   source, and its slot is filled by the next record of the same dataset, so batches stay full and a
   resumed run skips the same records.
4. **Threads and processes.** Whole batches are built in parallel by a grain thread pool
   (`input.num_threads`; 0 = half the cores, see `host_threads`) and, with `input.worker_processes > 0`,
   in that many worker processes (`mp_prefetch`, the cores then shared out among them). One task per batch
   keeps the per-image Python work, hence the GIL traffic between threads, small, and makes the worker
   processes' IPC one message per batch (about 15 us of the parent's CPU per image). About 50 us of
   GIL-held work per image should cap one process near 10,000-20,000 images/s; worker processes lift that
   on a big host (docs/data_pipeline.md).
5. **Global arrays.** `GlobalBatchIterator` turns each host batch into a global `jax.Array` with
   `make_array_from_process_local_data` and keeps `input.device_prefetch` batches in flight.

Host batches stay uint8 at the model's size, 1 channel for grayscale data (3 when any dataset is colour, or
as `input.channels` says); float conversion, normalisation and channel replication happen on the device
inside the jitted step (docs/design.md, "Batches").
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import cv2
import grain
import jax
import numpy as np
from jax.sharding import Mesh

from usf_mae_jax.cli import ConfigError, DataError, MissingInputError
from usf_mae_jax.core import sharding
from usf_mae_jax.data import augment, batching, folders, records, shards, synthetic

MANIFEST_NAME = folders.MANIFEST_NAME
NEAREST_PRESETS = ("usf_mae", "usf_mae_us", "eval")  # presets whose first step is Resize((size, size), NEAREST)

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class DatasetInfo:
    """One finished dataset folder: its name, shard paths for the split, record count and channel counts.

    `nearest` maps a square size to the shards of the stored nearest-resized variant at that size (aligned
    with `paths`: record i is the same example); `max_side` is the cap the converter put on the frames.
    """

    name: str
    folder: str
    paths: tuple[str, ...]
    size: int
    channels: dict[str, int]
    max_side: int = 0
    nearest: dict[int, tuple[str, ...]] = field(default_factory=dict)


def _shard_paths(folder: str, names: list[str]) -> tuple[str, ...]:
    paths = tuple(os.path.join(folder, name) for name in names)
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise MissingInputError(f"{folder}: manifest lists shards that are missing: {missing[:3]}")
    return paths


def _dataset_info(folder: str, split: str) -> DatasetInfo:
    with open(os.path.join(folder, MANIFEST_NAME)) as f:
        manifest = json.load(f)
    paths = _shard_paths(folder, manifest.get("shards", {}).get(split, []))
    nearest = {}
    for variant in manifest.get("variants", {}).values():
        if variant.get("resize") == "nearest" and variant.get("shards", {}).get(split):
            nearest[int(variant["size"])] = _shard_paths(folder, variant["shards"][split])
    return DatasetInfo(manifest.get("dataset", os.path.basename(folder)), folder, paths,
                       int(manifest.get("counts", {}).get(split, 0)), dict(manifest.get("channels", {})),
                       int(manifest.get("max_side", 0) or 0), nearest)


def find_datasets(data_dir: str, split: str = "train") -> list[DatasetInfo]:
    """The datasets named by `input.data_dir` (data/folders.py: folders, a comma list, or roots), in order.

    Datasets without records in `split` are left out with a warning.
    """
    datasets = []
    for folder in folders.dataset_folders(data_dir):
        info = _dataset_info(folder, split)
        if info.size == 0:
            log.warning("dataset %s has no %r records; left out", folder, split)
            continue
        datasets.append(info)
    if not datasets:
        raise DataError(f"no dataset under {data_dir} has {split!r} records")
    return datasets


def mixture_weights(weights: str, sizes: list[int]) -> np.ndarray:
    """Normalised mixture weights: '' gives proportional-to-size, else one non-negative number per dataset."""
    if not str(weights).strip():
        raw = np.asarray(sizes, np.float64)
    else:
        raw = np.asarray([float(w) for w in str(weights).split(",")], np.float64)
        if len(raw) != len(sizes):
            raise ConfigError(f"input.weights has {len(raw)} entries for {len(sizes)} datasets")
    if (raw < 0).any() or not np.isfinite(raw).all() or raw.sum() <= 0:
        raise ConfigError(f"input.weights must be non-negative with a positive sum, got {weights!r}")
    return raw / raw.sum()


class InMemorySource:
    """A grain random-access source over an in-memory image array (the `demo` preset's data)."""

    def __init__(self, images: np.ndarray, name: str = "synthetic"):
        self.images, self.name = images, name

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.images[index], "dataset": self.name, "source": f"{self.name}/{index}"}


# ------------------------------------------------------------------------------------------ order, mixing


def _block_size(num_datasets: int) -> int:
    """Blocks must exceed D^2 so the heaviest dataset's per-block quota never goes negative (see `_quotas`)."""
    return max(4096, 2 * num_datasets * num_datasets)


class MixtureSource:
    """Infinite random-access stream over several datasets: position -> (dataset, epoch, record index).

    Slot assignment: in block b (of `block` positions) dataset d gets C_d(b + 1) - C_d(b) slots, where
    C_d(b) = floor(b * block * w_d) for every dataset but the heaviest, which takes the rest; over any prefix
    each dataset's share is within D of its weight. Inside a block the slots of each dataset are spread
    evenly, with a phase drawn from (seed, block), so any window is within about one example per dataset
    of its share. A dataset's j-th slot (its *rank* j) reads its local record perm_e[j mod n] of epoch
    e = j // n, with perm_e a permutation seeded by (seed, dataset, e).
    """

    def __init__(self, sources: list[Any], weights: np.ndarray, seed: int, shard_index: int = 0,
                 shard_count: int = 1, names: list[str] | None = None):
        self.sources, self.seed = list(sources), int(seed)
        self.weights = np.asarray(weights, np.float64)
        self.shard_index, self.shard_count = shard_index, shard_count
        self.names = names or [f"dataset{d}" for d in range(len(self.sources))]
        self.local_sizes = [len(range(shard_index, len(s), shard_count)) for s in self.sources]
        for name, size, weight in zip(self.names, self.local_sizes, self.weights):
            if weight > 0 and size == 0:
                raise DataError(f"dataset {name} has fewer records than the {shard_count} processes")
        self.block = _block_size(len(self.sources))
        self._heaviest = int(np.argmax(self.weights))
        self._make_caches()

    def _make_caches(self) -> None:
        self._block_layout = functools.lru_cache(maxsize=8)(self._compute_block_layout)
        self._permutation = functools.lru_cache(maxsize=4 * len(self.sources) + 4)(self._compute_permutation)

    def __getstate__(self) -> dict:  # worker processes receive the source without its caches
        state = dict(self.__dict__)
        del state["_block_layout"], state["_permutation"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._make_caches()

    def __len__(self) -> int:
        return sys.maxsize  # infinite: epochs are per dataset, the train loop counts steps

    def cumulative_slots(self, block_index: int) -> np.ndarray:
        """C_d(b): slots of each dataset in blocks [0, b)."""
        positions = block_index * self.block
        counts = np.floor(positions * self.weights + 1e-9).astype(np.int64)
        counts[self._heaviest] = 0
        counts[self._heaviest] = positions - counts.sum()
        return counts

    def _compute_block_layout(self, block_index: int) -> tuple[np.ndarray, np.ndarray]:
        start, end = self.cumulative_slots(block_index), self.cumulative_slots(block_index + 1)
        quotas = end - start
        # Dataset d's k-th slot sits at time (k + phase_d) / quota_d: evenly spread, with a seeded phase, so
        # every window of the stream (a batch) holds each dataset's share to within one example.
        phases = np.random.default_rng([self.seed, 0x6D6978, block_index]).random(len(self.sources))
        slots = np.repeat(np.arange(len(self.sources)), quotas)
        times = np.concatenate([(np.arange(q) + phases[d]) / max(q, 1) for d, q in enumerate(quotas)])
        slots = slots[np.argsort(times, kind="stable")]
        ranks = np.empty(len(slots), np.int64)
        for d in range(len(self.sources)):
            where = np.flatnonzero(slots == d)
            ranks[where] = start[d] + np.arange(len(where))
        return slots, ranks

    def _compute_permutation(self, dataset: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, dataset, epoch]).permutation(self.local_sizes[dataset])

    def slot(self, position: int) -> tuple[int, int]:
        """Stream position -> (dataset, rank of the slot among that dataset's slots)."""
        slots, ranks = self._block_layout(position // self.block)
        return int(slots[position % self.block]), int(ranks[position % self.block])

    def record(self, dataset: int, rank: int) -> tuple[int, int]:
        """A dataset's rank-th slot -> (epoch of that dataset, global record index in the dataset)."""
        epoch, k = divmod(rank, self.local_sizes[dataset])
        local = int(self._permutation(dataset, epoch)[k])
        return epoch, self.shard_index + local * self.shard_count

    def locate(self, position: int) -> tuple[int, int, int]:
        """Stream position -> (dataset, epoch of that dataset, global record index in the dataset)."""
        dataset, rank = self.slot(position)
        return (dataset, *self.record(dataset, rank))


# -------------------------------------------------------------------------------------------- assembly


set_channels = augment.set_channels  # the channel rule, also used by embed.py


def local_batch_size(global_batch_size: int) -> int:
    """The rows this process contributes; the global batch must split evenly over processes."""
    count = jax.process_count()
    if global_batch_size % count:
        raise ConfigError(f"global batch size {global_batch_size} is not divisible by the {count} processes")
    return global_batch_size // count


def host_threads(input_cfg: Any) -> int:
    """`input.num_threads` (per process building batches); 0 picks half the cores this process may run on,
    or, with worker processes, the cores shared out among them.

    Half, in-process: about half of the per-image work holds the GIL, which the threads share with the
    training loop, and a thread that finds no free core stalls the others while it holds the GIL; on the
    2-core VM one thread was never slower than two and up to a third faster when the other core was busy
    (docs/data_pipeline.md). Worker processes have a GIL each.
    """
    threads = int(input_cfg.num_threads)
    if threads > 0:
        return threads
    cores, workers = len(os.sched_getaffinity(0)), int(input_cfg.worker_processes)
    return max(1, cores // workers if workers > 0 else cores // 2)


@functools.lru_cache(maxsize=4)
def _synthetic_images(count: int, size: int, seed: int) -> np.ndarray:
    images, _ = synthetic.SyntheticUltrasound(count, size, seed=seed, lesion_fraction=0.5).materialize()
    return images


def _shard_readers(datasets: list[DatasetInfo], preset: str, img_size: int) -> list[shards.RecordReader]:
    """One reader per dataset, over the stored variant the preset needs (module docstring, step 1)."""
    readers = []
    for info in datasets:
        nearest = info.nearest.get(img_size) if preset in NEAREST_PRESETS else None
        # Frames stored uncapped (max_side 0) are the originals: resizing them is the recipe's own first step.
        if preset in NEAREST_PRESETS and nearest is None and info.max_side > 0:
            log.warning("%s: no stored nearest%d variant (converted before it existed, or with another "
                        "--nearest_size); %s resizes the stored frames instead, which were capped at "
                        "max_side=%d: frames larger than that reach the model smoother than in the authors' "
                        "recipe. Re-convert with --overwrite for the exact pixels (docs/data_pipeline.md).",
                        info.folder, img_size, preset, info.max_side)
        # The other stored variant holds the same records: it names the source of a damaged one.
        paths, aligned = (nearest, info.paths) if nearest else (info.paths, next(iter(info.nearest.values()), ()))
        reader = shards.RecordReader(paths, aligned=aligned)
        if len(reader) != info.size:
            raise DataError(f"{info.folder}: manifest counts {info.size} train records, the shards "
                             f"{[os.path.basename(p) for p in paths[:3]]}... hold {len(reader)}")
        readers.append(reader)
    return readers


def _check_unchanged_frames_fit(datasets: list[DatasetInfo], readers: list[shards.RecordReader],
                                img_size: int) -> None:
    """`augment='none'` feeds frames as stored: a dataset whose first frame is not img_size x img_size is a
    one-line ConfigError saying what to set, raised before the step compiles (a record of another size met
    later stops the run with the same advice, from `augment.identity`)."""
    for info, reader in zip(datasets, readers):
        try:
            header = records.decode_header(reader[0])
        except (shards.UnreadableRecordError, records.CorruptRecordError):
            continue  # a damaged first record is the corrupt-record budget's business (batching.py)
        if (header["height"], header["width"]) != (img_size, img_size):
            raise ConfigError(augment.identity_size_advice(img_size, header["height"], header["width"],
                                                           f"{info.folder} holds"))


def _sources(input_cfg: Any, img_size: int) -> tuple[list[Any], list[str], list[int], int]:
    """(sources, names, sizes, channels of the data) for the configured input."""
    if input_cfg.source == "synthetic":
        images = _synthetic_images(int(input_cfg.synthetic_count), img_size, int(input_cfg.synthetic_seed))
        return [InMemorySource(images)], ["synthetic"], [len(images)], 1
    if input_cfg.source == "shards":
        datasets = find_datasets(input_cfg.data_dir)
        readers = _shard_readers(datasets, str(input_cfg.augment), img_size)
        if str(input_cfg.augment) == "none":
            _check_unchanged_frames_fit(datasets, readers, img_size)
        colour = any(d.channels.get("3", 0) > 0 for d in datasets)
        return readers, [d.name for d in datasets], [d.size for d in datasets], 3 if colour else 1
    raise ConfigError(f"unknown input source {input_cfg.source!r}; choose synthetic or shards")


def build_host_dataset(input_cfg: Any, *, batch_size: int, img_size: int, seed: int, process_index: int = 0,
                       process_count: int = 1, with_labels: bool = False) -> grain.IterDataset:
    """This process's stream of uint8 batches {'image': (batch_size, img_size, img_size, C)} (module doc)."""
    # One OpenCV thread per grain thread or worker: OpenCV's own pool would oversubscribe the cores that grain
    # already keeps busy (measured on 2 cores: usf_mae augmentation 0.44 -> 0.36 ms of CPU per image).
    cv2.setNumThreads(1)
    if str(input_cfg.augment) not in augment.PRESETS:
        raise ConfigError(f"unknown augmentation preset {input_cfg.augment!r}; choose one of {augment.PRESETS}")
    sources, names, sizes, data_channels = _sources(input_cfg, img_size)
    channels = int(input_cfg.get("channels", 0)) or data_channels
    if channels not in (1, 3):
        raise ConfigError(f"input.channels must be 0 (auto), 1 or 3, got {channels}")
    weights = mixture_weights(input_cfg.weights, sizes) if input_cfg.source == "shards" else np.ones(1)
    mixture = MixtureSource(sources, weights, seed, process_index, process_count, names)
    maker = batching.BatchMaker(mixture, batch_size=batch_size, preset=str(input_cfg.augment), size=img_size,
                                channels=channels, seed=seed,
                                max_corrupt_fraction=float(input_cfg.max_corrupt_fraction), with_labels=with_labels)
    threads = host_threads(input_cfg)
    buffer = int(input_cfg.prefetch_buffer) or 2 * threads
    stream = grain.MapDataset.range(sys.maxsize // batch_size).map(maker)
    stream = stream.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=buffer))
    workers = int(input_cfg.worker_processes)
    if workers > 0:
        stream = stream.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2))
    return stream


def describe(input_cfg: Any, img_size: int, seed: int, *, batch_size: int | None = None) -> dict[str, Any]:
    """What determines the stream; stored with the iterator state to flag a resume onto different data."""
    description = {"source": str(input_cfg.source), "data_dir": str(input_cfg.get("data_dir", "")),
                   "weights": str(input_cfg.get("weights", "")), "augment": str(input_cfg.augment),
                   "img_size": int(img_size), "seed": int(seed), "process_count": jax.process_count(),
                   "worker_processes": int(input_cfg.worker_processes)}
    if batch_size is not None:
        description["batch_size"] = int(batch_size)
    return description


class GlobalBatchIterator:
    """Wraps a grain iterator of host batches; yields global arrays, prefetching `prefetch` batches ahead.

    The prefetched batches are already on their way to the devices (device_put is asynchronous), which hides
    the host-to-device copy behind the previous step. `get_state` accounts for them: it returns the grain
    state from *before* the oldest batch not yet handed out, so a restore replays nothing and skips nothing.
    """

    def __init__(self, dataset: grain.IterDataset, mesh: Mesh, prefetch: int = 2,
                 description: dict[str, Any] | None = None):
        self._iterator = iter(dataset)
        self._sharding = sharding.batch_sharding(mesh)
        self._prefetch = max(1, prefetch)
        self._queue: collections.deque = collections.deque()
        self._description = description or {}

    def _to_global(self, host_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return {k: jax.make_array_from_process_local_data(self._sharding, np.asarray(v))
                for k, v in host_batch.items()}

    def _fill(self) -> None:
        while len(self._queue) < self._prefetch:
            state = self._iterator.get_state()
            self._queue.append((state, self._to_global(next(self._iterator))))

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, jax.Array]:
        self._fill()
        _, batch = self._queue.popleft()
        return batch

    def get_state(self) -> bytes:
        state = self._queue[0][0] if self._queue else self._iterator.get_state()
        return json.dumps({"grain": state, "pipeline": self._description}).encode()

    def set_state(self, state: bytes | str | dict) -> None:
        if not isinstance(state, dict):
            state = json.loads(state)
        saved = state.get("pipeline")
        grain_state = state.get("grain", state)
        batch = self._description.get("batch_size")
        if saved is not None and "data_dirs" in saved and batch and "next_index" in grain_state:
            # Written before batches were grain's elements (and data_dirs became data_dir): it counted records.
            grain_state = {**grain_state, "next_index": grain_state["next_index"] // batch}
            saved = {("data_dir" if k == "data_dirs" else k): v for k, v in saved.items()}
            saved.setdefault("batch_size", batch)
        if saved is not None and self._description and saved != self._description:
            log.warning("resuming the input pipeline with a different configuration: saved %s, now %s; the "
                        "data order will not continue the interrupted run exactly", saved, self._description)
        self._queue.clear()
        self._iterator.set_state(grain_state)

    def start_prefetch(self) -> None:
        """Called by grain's checkpoint handler after a restore; batches are fetched on demand instead."""

    def close(self) -> None:
        self._queue.clear()
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()


def make_pretrain_iterator(input_cfg: Any, *, global_batch_size: int, img_size: int, seed: int,
                           mesh: Mesh) -> GlobalBatchIterator:
    """Builds the pretraining input: shuffled every epoch, sharded per process, batched, global arrays."""
    batch_size = local_batch_size(global_batch_size)
    stream = build_host_dataset(input_cfg, batch_size=batch_size, img_size=img_size, seed=seed,
                                process_index=jax.process_index(), process_count=jax.process_count())
    return GlobalBatchIterator(stream, mesh, prefetch=input_cfg.device_prefetch,
                               description=describe(input_cfg, img_size, seed, batch_size=batch_size))


def images_per_epoch(input_cfg: Any) -> int:
    """Dataset size used to turn epochs into steps: all train records of all datasets (from the manifests)."""
    if input_cfg.source == "synthetic":
        return int(input_cfg.synthetic_count)
    if input_cfg.source == "shards":
        return sum(d.size for d in find_datasets(input_cfg.data_dir))
    raise ConfigError(f"unknown input source {input_cfg.source!r}; choose synthetic or shards")
