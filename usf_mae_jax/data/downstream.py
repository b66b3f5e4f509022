"""Downstream data in host memory: benchmark splits, their training batches, and batched inference over them.

* **Splits.** A converted benchmark split (`data.benchmarks.load_split`) is read once into host memory as
  uint8 images at their stored size; benchmarks hold 0.3k–2k images, so this is cheap and makes every epoch
  a pure function of (seed, epoch).
* **Training batches** (`EpochBatches`). Step s of epoch e = s // steps_per_epoch takes row
  s % steps_per_epoch of a per-epoch index table seeded by (seed, epoch) (a permutation, or draws weighted
  by class for balanced sampling); each example is augmented with a generator seeded by
  (seed, epoch, record index). Every batch is therefore a pure function of the step: the iterator's state is
  one number, a resumed run sees exactly the batches of an uninterrupted one, and every process builds the
  same global index table and materialises only its own rows. The next batches are prepared by a thread
  pool while the device runs (OpenCV releases the GIL).
* **Inference** (`map_split`). A function of a global batch (features, probabilities, ...) over a whole
  split with the evaluation transform, the last batch padded to the compiled shape.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from usf_mae_jax.cli import ConfigError, DataError, MissingInputError
from usf_mae_jax.core import sharding
from usf_mae_jax.data import augment, benchmarks

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")


@dataclasses.dataclass
class SplitData:
    """One split held in host memory: uint8 images (H, W, C) at their stored size, labels and record ids."""

    name: str
    images: list[np.ndarray]
    labels: np.ndarray
    ids: list[str]

    def __len__(self) -> int:
        return len(self.ids)


@dataclasses.dataclass
class BenchmarkData:
    benchmark: str
    fold: int | str | None
    subset: str | None
    version_dir: str
    class_names: list[str]
    channels: int
    splits: dict[str, SplitData]

    def membership(self) -> dict[str, Any]:
        """The exact record ids and labels of each split (`splits.json`), for audit and reproduction."""
        return {"benchmark": self.benchmark, "fold": self.fold, "subset": self.subset,
                "version_dir": os.path.abspath(self.version_dir), "class_names": self.class_names,
                **{name: {"ids": s.ids, "labels": s.labels.tolist()} for name, s in self.splits.items()}}

    def split_name(self, split: str) -> str:
        """e.g. 'busbra/folddefault/test' or 'gist514/raw/fold0/test', recorded in results.json."""
        fold = "default" if self.fold is None else self.fold
        subset = f"/{self.subset}" if self.subset else ""
        return f"{self.benchmark}{subset}/fold{fold}/{split}"


def load_benchmark(data_dir: str, benchmark: str, fold: int | None = None, subset: str | None = None
                   ) -> BenchmarkData:
    """The train / validation / test splits of a converted benchmark, read into host memory."""
    if not data_dir:
        raise ConfigError("input.data_dir is empty: point it at the --out_dir of "
                          f"`python -m data_prep {benchmark} ...`")
    if not os.path.isdir(data_dir):
        raise MissingInputError(f"input.data_dir {data_dir} is not a directory")
    version_dir = benchmarks.find_version_dir(data_dir, benchmark, subset)
    names = benchmarks.class_names(version_dir, benchmark)
    with open(os.path.join(version_dir, "manifest.json")) as f:
        channels = int(json.load(f).get("options", {}).get("channels", 1))
    splits = {}
    for split in SPLITS:
        source = benchmarks.load_split(version_dir, benchmark, split, fold=fold)
        if len(source) == 0:
            raise DataError(f"{version_dir}: the {split} split of fold {fold} is empty")
        images = [source[i]["image"] for i in range(len(source))]
        splits[split] = SplitData(split, images, np.asarray(source.labels, np.int64), list(source.ids))
    overlap = set(splits["test"].ids) & (set(splits["train"].ids) | set(splits["validation"].ids))
    if overlap:
        raise DataError(f"{version_dir}: test records also in train/validation, e.g. {sorted(overlap)[:3]}")
    log.info("%s fold %s: %s images; classes %s", benchmark, fold, {k: len(v) for k, v in splits.items()}, names)
    return BenchmarkData(benchmark, fold, subset, version_dir, names, channels, splits)


def label_subset(split: SplitData, fraction: float, seed: int) -> SplitData:
    """A class-stratified share of a split's labelled examples (a small label budget).

    Each class keeps `max(1, round(fraction * n_class))` examples, drawn without replacement by a generator
    seeded with `seed`, in their original order; `fraction` 1 returns the split unchanged.
    """
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"label_fraction must lie in (0, 1], got {fraction}")
    if fraction == 1.0:
        return split
    rng = np.random.default_rng([seed, 0x1AB])
    keep = []
    for label in np.unique(split.labels):
        members = np.flatnonzero(split.labels == label)
        keep.append(rng.choice(members, size=max(1, round(fraction * len(members))), replace=False))
    chosen = np.sort(np.concatenate(keep))
    return SplitData(split.name, [split.images[i] for i in chosen], split.labels[chosen],
                     [split.ids[i] for i in chosen])


# -------------------------------------------------------------------------------------------- sampling


def flip_crop(image: np.ndarray, rng: np.random.Generator, size: int, scale_min: float) -> np.ndarray:
    """Fine-tune augmentation: nearest resize, RandomResizedCrop(scale (scale_min, 1), ratio (3/4, 4/3),
    bilinear) back to `size`, horizontal flip with p = 0.5 (augment.py's torchvision-faithful crop)."""
    image = augment.resize_nearest(image, size)
    box = augment.random_resized_crop_box(size, size, (scale_min, 1.0), augment.CROP_RATIO, rng)
    image = augment.resized_crop(image, box, size, "bilinear")
    if rng.random() < 0.5:
        image = augment.hflip(image)
    return np.ascontiguousarray(image)


def make_train_augment(input_cfg: Any, size: int) -> Callable[[np.ndarray, np.random.Generator], np.ndarray]:
    """fn(image, rng) -> uint8 (size, size, C) for `input.augment` (flip_crop or an augment.py preset)."""
    if input_cfg.augment == "flip_crop":
        scale_min = float(input_cfg.crop_scale_min)
        if not 0.0 < scale_min <= 1.0:
            raise ConfigError(f"input.crop_scale_min must lie in (0, 1], got {scale_min}")
        return lambda image, rng: flip_crop(image, rng, size, scale_min)
    return augment.make_augment(input_cfg.augment, size)


def class_probabilities(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Sampling probability of each example for class-balanced sampling: proportional to 1 / n_class."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = 1.0 / np.maximum(counts[labels], 1.0)
    return weights / weights.sum()


def class_loss_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-class cross-entropy weights N / (C * n_c) (sklearn's 'balanced'); absent classes get weight 0."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    return np.where(counts > 0, len(labels) / (num_classes * np.maximum(counts, 1.0)), 0.0).astype(np.float32)


def epoch_indices(num_examples: int, steps: int, batch_size: int, seed: int, epoch: int,
                  probabilities: np.ndarray | None = None) -> np.ndarray:
    """(steps, batch_size) example indices of one epoch, a pure function of (seed, epoch).

    Uniform: concatenated permutations (a set smaller than a batch repeats). With `probabilities`: drawn with
    replacement (PyTorch's WeightedRandomSampler).
    """
    rng = np.random.default_rng([seed, epoch, 0x5EED])
    needed = steps * batch_size
    if probabilities is not None:
        flat = rng.choice(num_examples, size=needed, replace=True, p=probabilities)
    else:
        rounds = -(-needed // num_examples)
        flat = np.concatenate([rng.permutation(num_examples) for _ in range(rounds)])[:needed]
    return flat.reshape(steps, batch_size)


def augmented_images(images: list[np.ndarray], indices: np.ndarray, transform, seed: int, epoch: int,
                     pool: ThreadPoolExecutor) -> np.ndarray:
    """uint8 (len(indices), S, S, C): `transform(image, rng)` with rng seeded by (seed, epoch, index)."""
    def one(i: int) -> np.ndarray:
        out = transform(images[int(i)], np.random.default_rng([seed, epoch, int(i)]))
        return out[:, :, None] if out.ndim == 2 else out
    return np.stack(list(pool.map(one, indices)))


class EpochBatches:
    """Global training batches as a pure function of the step (module docstring); state = the next step.

    `make_rows(indices, epoch) -> {name: np.ndarray}` builds this process's rows for the given example
    indices (e.g. augmented images and labels, or cached feature rows).
    """

    def __init__(self, num_examples: int, batch_size: int, steps_per_epoch: int, seed: int,
                 make_rows: Callable[[np.ndarray, int], dict[str, np.ndarray]], mesh: Mesh,
                 probabilities: np.ndarray | None = None, prefetch: int = 2):
        self.num_examples, self.batch_size, self.steps_per_epoch = num_examples, batch_size, steps_per_epoch
        self.seed, self.make_rows, self.probabilities = int(seed), make_rows, probabilities
        self._sharding = sharding.batch_sharding(mesh)
        self._rows = sharding.local_rows(batch_size)
        self._next = 0
        self._prefetch = max(1, prefetch)
        self._pool = ThreadPoolExecutor(1)
        self._queue: collections.deque = collections.deque()
        self._table = functools.lru_cache(maxsize=2)(self._epoch_table)

    def _epoch_table(self, epoch: int) -> np.ndarray:
        return epoch_indices(self.num_examples, self.steps_per_epoch, self.batch_size, self.seed, epoch,
                             self.probabilities)

    def host_rows(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of the batch of `step`."""
        epoch, within = divmod(step, self.steps_per_epoch)
        return self.make_rows(self._table(epoch)[within][self._rows], epoch)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, jax.Array]:
        while len(self._queue) < self._prefetch:
            step = self._next + len(self._queue)
            self._queue.append(self._pool.submit(self.host_rows, step))
        rows = self._queue.popleft().result()
        self._next += 1
        return sharding.to_global(rows, self._sharding)

    def get_state(self) -> bytes:
        return json.dumps({"next_step": self._next}).encode()

    def set_state(self, state: bytes | str) -> None:
        for future in self._queue:
            future.cancel()
        self._queue.clear()
        self._next = int(json.loads(state)["next_step"])

    def close(self) -> None:
        self._queue.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)


# ------------------------------------------------------------------------------------------- inference


def eval_batch_size(requested: int, mesh: Mesh) -> int:
    """The evaluation batch, rounded up to a multiple of the data-parallel size times the processes."""
    unit = sharding.data_parallel_size(mesh) * jax.process_count()
    return max(unit, -(-int(requested) // unit) * unit)


def map_split(apply_fn: Callable[[jax.Array], jax.Array], split: SplitData, size: int, mesh: Mesh, batch_size: int,
              pool: ThreadPoolExecutor) -> np.ndarray:
    """`apply_fn(global uint8 images) -> (B, ...)` (jitted, replicated output) over a split with the eval
    transform (nearest resize to `size`). The last batch is padded by repeating rows; padded rows are dropped.
    """
    transform = augment.make_augment("eval", size)
    rows = sharding.local_rows(batch_size)
    batch_sharded = sharding.batch_sharding(mesh)
    outputs = []
    for start in range(0, len(split), batch_size):
        indices = np.arange(start, min(start + batch_size, len(split)))
        valid = len(indices)
        padded = np.concatenate([indices, np.resize(indices, batch_size - valid)]) if valid < batch_size \
            else indices
        images = augmented_images(split.images, padded[rows], transform, 0, 0, pool)
        result = apply_fn(sharding.to_global({"image": images}, batch_sharded)["image"])
        outputs.append(np.asarray(result, np.float32)[:valid])
    return np.concatenate(outputs)
