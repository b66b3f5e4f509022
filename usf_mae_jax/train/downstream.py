"""What fine-tuning and linear probing share: the benchmark splits in memory, host batches, sharded
prediction, the initialisation (with its provenance) and the audit files written next to `results.json`.

* **Data.** A benchmark split (`data_prep.benchmarks.load_split`) is read once into host memory as uint8
  images at their stored size (benchmarks are 0.3k-2k images, capped at 512 px by the converter). Training
  batches are cut from a per-epoch permutation seeded by (seed, epoch), and each image is augmented with a
  generator seeded by (seed, epoch, record index), so a run is reproducible and independent of the host
  layout. Every process builds the same global index list and materialises only its own rows
  (`jax.make_array_from_process_local_data`).
* **Init.** `resolve_init` reads a pretraining workdir, an interop import directory or a `.pth` through
  `checkpoint.load_init_params`; the architecture comes from the init when it carries one, the image size from
  the config. Its provenance (paths, file hash, the pretraining run's data dirs and their manifests) is
  recorded so that leakage of test images into pretraining can be checked.
* **Audit.** `splits.json` holds the exact record ids of train / validation / test; `provenance.json` the
  init.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from data_prep.writer import file_sha256
from usf_mae_jax.data import augment
from usf_mae_jax.models import vit
from usf_mae_jax.train import checkpoint, sharding
from usf_mae_jax.train.state import build_model_config

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
ARCHITECTURE_FIELDS = ("patch_size", "in_chans", "width", "depth", "heads", "mlp_ratio")


# ------------------------------------------------------------------------------------------------- data


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
    variant: str | None
    version_dir: str
    class_names: list[str]
    channels: int
    splits: dict[str, SplitData]


def load_benchmark(config: Any) -> BenchmarkData:
    """The train / validation / test splits of `config.dataset` from `config.input.data_dir`, in memory."""
    from data_prep import benchmarks  # local: only downstream runs need the TFDS reader
    from data_prep.benchmarks import reader

    data_dir = config.input.data_dir
    if not data_dir:
        raise ValueError("config.input.data_dir is empty: point it at the --out_dir of "
                         f"`python -m data_prep {config.dataset} ...`")
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"config.input.data_dir {data_dir} is not a directory")
    version_dir = reader.find_version_dir(data_dir, config.dataset, config.variant)
    names = benchmarks.class_names(version_dir, config.dataset)
    with open(os.path.join(version_dir, "manifest.json")) as f:
        channels = int(json.load(f).get("options", {}).get("channels", 1))
    splits = {}
    for split in SPLITS:
        source = benchmarks.load_split(version_dir, config.dataset, split, fold=config.fold)
        if len(source) == 0:
            raise ValueError(f"{version_dir}: the {split} split of fold {config.fold} is empty")
        images = [source[i]["image"] for i in range(len(source))]
        splits[split] = SplitData(split, images, np.asarray(source.labels, np.int64), list(source.ids))
    overlap = set(splits["test"].ids) & (set(splits["train"].ids) | set(splits["validation"].ids))
    if overlap:
        raise ValueError(f"{version_dir}: test records also in train/validation, e.g. {sorted(overlap)[:3]}")
    log.info("%s fold %s: %s images; classes %s", config.dataset, config.fold,
             {k: len(v) for k, v in splits.items()}, names)
    return BenchmarkData(config.dataset, config.fold, config.variant, version_dir, names, channels, splits)


def flip_crop(image: np.ndarray, rng: np.random.Generator, size: int, scale_min: float) -> np.ndarray:
    """Fine-tune augmentation: nearest resize, RandomResizedCrop(scale (scale_min, 1), ratio (3/4, 4/3),
    bilinear) back to `size`, horizontal flip with p = 0.5 (augment.py's torchvision-faithful crop)."""
    image = augment.resize_nearest(image, size)
    box = augment.random_resized_crop_box(size, size, (scale_min, 1.0), augment.CROP_RATIO, rng)
    image = augment.resized_crop(image, box, size, "bilinear")
    if rng.random() < 0.5:
        image = augment.hflip(image)
    return np.ascontiguousarray(image)


def make_train_augment(input_cfg: Any, size: int):
    """fn(image, rng) -> uint8 (size, size, C) for `input.augment` (flip_crop or an augment.py preset)."""
    if input_cfg.augment == "flip_crop":
        scale_min = float(input_cfg.crop_scale_min)
        if not 0.0 < scale_min <= 1.0:
            raise ValueError(f"input.crop_scale_min must lie in (0, 1], got {scale_min}")
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


def local_rows(global_batch: int) -> slice:
    """The rows of a global batch that this process materialises."""
    count, index = jax.process_count(), jax.process_index()
    if global_batch % count:
        raise ValueError(f"batch size {global_batch} is not divisible by the {count} processes")
    local = global_batch // count
    return slice(index * local, (index + 1) * local)


class BatchMaker:
    """Builds this process's rows of global uint8 batches and places them on the mesh."""

    def __init__(self, mesh: Mesh, img_size: int, channels: int, num_threads: int = 2):
        self.mesh = mesh
        self.sharding = sharding.batch_sharding(mesh)
        self.img_size, self.channels = img_size, channels
        self._pool = ThreadPoolExecutor(max(1, num_threads))  # OpenCV releases the GIL

    def images(self, data: SplitData, indices: np.ndarray, transform, seed: int, epoch: int) -> np.ndarray:
        """uint8 (len(indices), S, S, C); `transform(image, rng)` with rng seeded by (seed, epoch, index)."""
        def one(i: int) -> np.ndarray:
            rng = np.random.default_rng([seed, epoch, int(i)])
            out = transform(data.images[int(i)], rng)
            return out[:, :, None] if out.ndim == 2 else out
        return np.stack(list(self._pool.map(one, indices)))

    def to_global(self, rows: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return {k: jax.make_array_from_process_local_data(self.sharding, np.asarray(v))
                for k, v in rows.items()}

    def close(self) -> None:
        self._pool.shutdown()


def eval_batch_size(requested: int, mesh: Mesh) -> int:
    """The evaluation batch, rounded up to a multiple of the data-parallel size times the processes."""
    unit = sharding.data_parallel_size(mesh) * jax.process_count()
    return max(unit, -(-int(requested) // unit) * unit)


def predict(apply_fn, data: SplitData, maker: BatchMaker, batch_size: int) -> np.ndarray:
    """Runs `apply_fn(images) -> (B, K)` (jitted, replicated output) over a split with the eval transform.

    The last batch is padded by repeating the first rows; padded rows are dropped. Returns (N, K) float32.
    """
    transform = augment.make_augment("eval", maker.img_size)
    rows = local_rows(batch_size)
    outputs = []
    for start in range(0, len(data), batch_size):
        indices = np.arange(start, min(start + batch_size, len(data)))
        valid = len(indices)
        padded = np.concatenate([indices, np.resize(indices, batch_size - valid)]) if valid < batch_size \
            else indices
        images = maker.images(data, padded[rows], transform, 0, 0)
        result = np.asarray(apply_fn(maker.to_global({"image": images})["image"]), np.float32)
        outputs.append(result[:valid])
    return np.concatenate(outputs)


# ------------------------------------------------------------------------------------------------- init


@dataclasses.dataclass
class InitInfo:
    params: dict | None  # pure dict (MAE or classifier params), None for random init
    source_img_size: int | None
    model_config: vit.ModelConfig  # the classifier's architecture at the config's img_size
    provenance: dict


def _manifests_under(folder: str) -> list[str]:
    """manifest.json files of `folder` and of its dataset sub-folders (the layout data_prep writes)."""
    if os.path.isfile(os.path.join(folder, "manifest.json")):
        return [os.path.join(folder, "manifest.json")]
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, d, "manifest.json") for d in os.listdir(folder)
                  if os.path.isfile(os.path.join(folder, d, "manifest.json")))


def _manifest_summary(path: str) -> dict:
    entry = {"path": os.path.abspath(path), "sha256": file_sha256(path)}
    try:
        with open(path) as f:
            manifest = json.load(f)
        entry.update(dataset=manifest.get("dataset"), counts=manifest.get("counts"),
                     content_sha256=manifest.get("content_sha256"))
    except (OSError, json.JSONDecodeError) as err:
        entry["error"] = f"unreadable manifest: {err}"
    return entry


def init_provenance(path: str | None) -> dict:
    """Where the init came from, with the pretraining data manifests when the init is a pretraining workdir.

    A `.pth` or an import directory records its hash (and the import's conversion report); the pretraining
    data of a released checkpoint is not recorded in the file, so `pretraining_manifests` is empty there.
    """
    if not path:
        return {"init": None, "kind": "random", "pretraining_manifests": []}
    record: dict[str, Any] = {"init": os.path.abspath(path), "pretraining_manifests": []}
    if os.path.isfile(path):
        record.update(kind="torch_file", sha256=file_sha256(path))
        return record
    if os.path.isdir(os.path.join(path, "checkpoints")):
        record["kind"] = "workdir"
        config_path = os.path.join(path, "config.json")
        if os.path.isfile(config_path):
            with open(config_path) as f:
                saved = json.load(f)
            inputs = saved.get("input", {})
            record["pretraining_config"] = {"mode": saved.get("mode"), "preset": saved.get("preset"),
                                            "input_source": inputs.get("source"),
                                            "data_dirs": inputs.get("data_dirs"),
                                            "data_dir": inputs.get("data_dir"), "init": saved.get("init"),
                                            "init_from": saved.get("init_from")}
            dirs = [d.strip() for d in str(inputs.get("data_dirs") or "").split(",") if d.strip()]
            for folder in dirs:
                record["pretraining_manifests"] += [_manifest_summary(m) for m in _manifests_under(folder)]
        record["pretraining_manifests"] += [_manifest_summary(m) for m in _manifests_under(path)]
        nested = os.path.join(path, "provenance.json")  # a fine-tuned workdir carries its init's provenance
        if os.path.isfile(nested):
            with open(nested) as f:
                record["init_provenance"] = json.load(f)
        return record
    record["kind"] = "import_dir"
    report = os.path.join(path, "conversion_report.json")
    if os.path.isfile(report):
        with open(report) as f:
            record["conversion_report"] = json.load(f)
    return record


def layer_decay_for(opt_cfg: Any, model_config: vit.ModelConfig) -> float:
    """The configured layer decay, or the reference's value for the model size (0.65 B, 0.75 L/H)."""
    if opt_cfg.get("layer_decay") is not None:
        return float(opt_cfg.layer_decay)
    return 0.65 if model_config.width <= 768 else 0.75


def resolve_init(config: Any) -> InitInfo:
    """Loads `config.init` (or nothing) and decides the classifier's architecture."""
    model_cfg = config.model
    if not config.init:
        log.warning("config.init is not set: the encoder starts from RANDOM initialisation. Pass "
                    "--config.init=PATH (a pretraining workdir, an interop import dir or a .pth) to "
                    "evaluate a pretrained model.")
        return InitInfo(None, None, build_model_config(model_cfg), init_provenance(None))
    params, fields = checkpoint.load_init_params(config.init)
    if fields is None:
        raise ValueError(f"init {config.init}: its model configuration is unknown (a workdir without "
                         "config.json?); cannot tell the architecture")
    source = vit.ModelConfig(**{k: v for k, v in fields.items()
                                if k in {f.name for f in dataclasses.fields(vit.ModelConfig)}})
    explicit = {k: model_cfg[k] for k in ARCHITECTURE_FIELDS if model_cfg.get(k) is not None}
    conflicts = {k: (v, getattr(source, k)) for k, v in explicit.items() if v != getattr(source, k)}
    if conflicts:
        raise ValueError(f"init {config.init} has another architecture than config.model sets "
                         f"(field: (config, init)): {conflicts}; drop those overrides")
    if model_cfg.variant and vit.SIZES.get(model_cfg.variant, {}).get("width") != source.width:
        log.info("config.model.variant=%s is ignored: the init %s has width %d, depth %d", model_cfg.variant,
                 config.init, source.width, source.depth)
    model_config = dataclasses.replace(source, img_size=int(model_cfg.img_size), dtype=model_cfg.dtype,
                                       attention=model_cfg.attention)
    log.info("init %s: %s; source img_size %d -> %d", config.init,
             {k: getattr(source, k) for k in ARCHITECTURE_FIELDS}, source.img_size, model_config.img_size)
    return InitInfo(params, source.img_size, model_config, init_provenance(config.init))


# ------------------------------------------------------------------------------------------------ audit


def write_json(path: str, payload: Any) -> None:
    if jax.process_index() != 0:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True, default=str)


def write_membership(workdir: str, data: BenchmarkData) -> None:
    """`workdir/splits.json`: the exact record ids (and labels) of each split, for audit and reproduction."""
    write_json(os.path.join(workdir, "splits.json"), {
        "benchmark": data.benchmark, "fold": data.fold, "variant": data.variant,
        "version_dir": os.path.abspath(data.version_dir), "class_names": data.class_names,
        **{name: {"ids": split.ids, "labels": split.labels.tolist()} for name, split in data.splits.items()}})


def write_run_config(workdir: str, config: Any, model_config: vit.ModelConfig, plan: dict) -> None:
    """`workdir/config.json` with the resolved model (so this workdir can itself serve as an init)."""
    payload = json.loads(config.to_json_best_effort())
    payload["resolved_model"] = dataclasses.asdict(model_config)
    payload["resolved_plan"] = plan
    payload["device_count"], payload["process_count"] = jax.device_count(), jax.process_count()
    write_json(os.path.join(workdir, "config.json"), payload)
