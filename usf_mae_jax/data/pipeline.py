"""Input pipelines: host-sharded grain datasets turned into global `jax.Array` batches on the mesh.

The training loop sees one interface, `GlobalBatchIterator`:

    it = make_pretrain_iterator(config.input, global_batch_size=..., img_size=..., seed=..., mesh=mesh)
    batch = next(it)        # {'image': uint8 jax.Array (B, H, W, C)}, sharded over the mesh's batch axes
    state = it.get_state()  # JSON bytes describing exactly the batches consumed so far (not the prefetched)
    it.set_state(state)     # continue with bit-identical batches after a restart

Host batches stay uint8 at the model's size; float conversion and normalisation happen on the device inside
the jitted step (DESIGN.md, "Batches"). Each process reads a disjoint slice of the data
(`jax.process_index()::jax.process_count()`) and contributes its rows to the global array.
"""

from __future__ import annotations

import collections
import json
from typing import Any

import grain
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from usf_mae_jax.data import synthetic

BATCH_AXES = ("data", "fsdp")


class InMemorySource:
    """A grain random-access source over an in-memory image array (the `demo` preset's data)."""

    def __init__(self, images: np.ndarray):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {"image": self.images[index]}


def local_batch_size(global_batch_size: int) -> int:
    """The rows this process contributes; the global batch must split evenly over processes."""
    count = jax.process_count()
    if global_batch_size % count:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by the {count} processes")
    return global_batch_size // count


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


class GlobalBatchIterator:
    """Wraps a grain iterator of host batches; yields global arrays, prefetching `prefetch` batches ahead.

    The prefetched batches are already on their way to the devices (device_put is asynchronous), which hides
    the host-to-device copy behind the previous step. `get_state` accounts for them: it returns the grain
    state from *before* the oldest batch not yet handed out, so a restore replays nothing and skips nothing.
    """

    def __init__(self, dataset: grain.IterDataset, mesh: Mesh, prefetch: int = 2):
        self._iterator = iter(dataset)
        self._sharding = batch_sharding(mesh)
        self._prefetch = max(1, prefetch)
        self._queue: collections.deque = collections.deque()

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
        return json.dumps(state).encode()

    def set_state(self, state: bytes | str) -> None:
        self._queue.clear()
        self._iterator.set_state(json.loads(state))


class FrozenIteratorState:
    """A snapshot of an iterator's state for `grain.checkpoint.CheckpointSave`.

    Orbax may write asynchronously while training goes on; saving a snapshot taken at the step boundary keeps
    the saved data position in step with the saved train state.
    """

    def __init__(self, state: bytes):
        self._state = state

    def get_state(self) -> bytes:
        return self._state


def _synthetic_dataset(input_cfg: Any, img_size: int, seed: int) -> grain.MapDataset:
    images, _ = synthetic.SyntheticUltrasound(input_cfg.synthetic_count, img_size, seed=input_cfg.synthetic_seed,
                                              lesion_fraction=0.5).materialize()
    return grain.MapDataset.source(InMemorySource(images))


def make_pretrain_iterator(input_cfg: Any, *, global_batch_size: int, img_size: int, seed: int,
                           mesh: Mesh) -> GlobalBatchIterator:
    """Builds the pretraining input: shuffled every epoch, sharded per process, batched, global arrays."""
    per_process = local_batch_size(global_batch_size)
    if input_cfg.source == "synthetic":
        dataset = _synthetic_dataset(input_cfg, img_size, seed)
    else:
        raise ValueError(f"unknown input source {input_cfg.source!r}")
    dataset = dataset[jax.process_index()::jax.process_count()]
    if len(dataset) < per_process:
        raise ValueError(f"this process holds {len(dataset)} images, fewer than one batch of {per_process}")
    dataset = dataset.shuffle(seed=seed).repeat(None).batch(per_process, drop_remainder=True)
    iter_ds = dataset.to_iter_dataset(grain.ReadOptions(num_threads=input_cfg.num_threads,
                                                        prefetch_buffer_size=input_cfg.prefetch_buffer))
    return GlobalBatchIterator(iter_ds, mesh, prefetch=input_cfg.device_prefetch)


def images_per_epoch(input_cfg: Any) -> int:
    """Dataset size used to turn epochs into steps."""
    if input_cfg.source == "synthetic":
        return int(input_cfg.synthetic_count)
    raise ValueError(f"unknown input source {input_cfg.source!r}")
