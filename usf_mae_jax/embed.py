"""Feature extraction for users: one embedding per record, with its source and label.

    python -m usf_mae_jax.embed --init PATH --data_dir OUT --out features.npz \
        [--img_size 224] [--pool auto|cls|mean] [--batch_size 64] [--benchmark busbra] [--subset roi]

`--init` is anything `config.init` accepts: a pretraining or fine-tune workdir, an interop import directory
or a PyTorch `.pth`/`.pt`/`.safetensors`. `--data_dir` is either

  * a converted benchmark (the `--out_dir` of `python -m data_prep busbra|mmotu|gist514|labelled`, or its
    version folder): every stored record, whatever its split; or
  * shard folders written by data_prep/writer.py (a folder with `manifest.json`, or a root holding several,
    comma-separated allowed): every record of every split listed in each manifest.

The feature is the encoder's cls token after `norm` (`--pool cls`, the reference linear-probe feature) or the
mean patch token after `fc_norm` (`--pool mean`, the reference fine-tune feature; a fine-tuned init's
`fc_norm` is used), or every block's mean patch token averaged over the blocks (`--pool blocks`, the probe
feature that works best on MAE encoders, docs/real_data.md). `auto` takes cls when the init has the final
`norm` (an MAE), mean otherwise. Images are
resized with the evaluation transform (nearest) to `--img_size` (default: the init's).

The output `.npz` holds `embeddings` (N, D) float32, `source`, `id`, `dataset`, `subject`, `split` (str) and
`label` (int; -1 when unlabelled), row-aligned, in a stable order (datasets, then splits, then records).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator

import numpy as np
from absl import app, flags

from usf_mae_jax import cli, host_memory
from usf_mae_jax.cli import CheckpointError, ConfigError, DataError, MissingInputError, run_cli

flags.DEFINE_string("init", None, "Pretrained weights: workdir, interop import dir or .pth/.pt/.safetensors.")
flags.DEFINE_string("data_dir", None,
                    "A converted benchmark dir, or shard folder(s) from data_prep (comma-separated).")
flags.DEFINE_string("out", "features.npz", "Output .npz path.")
flags.DEFINE_integer("img_size", 0, "Input size; 0 = the init's image size.")
flags.DEFINE_enum("pool", "auto", ["auto", "cls", "mean", "blocks"],
                  "Which feature: cls token, mean patch token, or every block's mean patch token averaged.")
flags.DEFINE_integer("batch_size", 64, "Images per forward pass.")
flags.DEFINE_string("benchmark", "", "Benchmark name when --data_dir holds several converted benchmarks.")
flags.DEFINE_string("subset", "", "Benchmark subset (GIST514-DB: roi or raw).")
cli.define_verbose_flag()
FLAGS = flags.FLAGS

log = logging.getLogger(__name__)
META_FIELDS = ("source", "id", "dataset", "subject", "split")


def _benchmark_dirs(data_dir: str, benchmark: str, subset: str) -> list[tuple[str, str]]:
    """(name, version dir) of each converted benchmark under `data_dir`; [] if there is none."""
    from usf_mae_jax.data import benchmarks as reader

    if os.path.isfile(os.path.join(data_dir, "splits.json")):
        with open(os.path.join(data_dir, "splits.json")) as f:
            return [(json.load(f)["benchmark"], data_dir)]
    names = [benchmark] if benchmark else [n for n in reader.BUILDER_NAMES
                                           if os.path.isdir(os.path.join(data_dir, reader.BUILDER_NAMES[n]))]
    found = []
    for name in names:
        try:
            found.append((name, reader.find_version_dir(data_dir, name, subset or None)))
        except FileNotFoundError:
            if benchmark:
                raise
    return found


def iter_benchmark(version_dir: str, name: str) -> Iterator[dict]:
    """Every stored record of a converted benchmark, part by part (each record once)."""
    from usf_mae_jax.data.benchmarks import SplitSource

    with open(os.path.join(version_dir, "splits.json")) as f:
        parts = json.load(f)["parts"]
    for part in sorted(parts):
        source = SplitSource(version_dir, list(parts[part]["ids"]))
        for i in range(len(source)):
            example = source[i]
            yield {**example, "dataset": name, "split": part}


def iter_shards(data_dir: str) -> Iterator[dict]:
    """Every record of every split of the shard folders (data_prep/writer.py layout), decoded."""
    import grain

    from usf_mae_jax.data import folders, records

    for entry in folders.entries(data_dir):
        if not folders.manifest_folders(entry):
            raise MissingInputError(f"{entry}: neither a converted benchmark (splits.json) nor shard folders "
                                    f"({folders.MANIFEST_NAME}); convert it with `python -m data_prep ...` first")
    for folder in folders.dataset_folders(data_dir, "--data_dir"):
        with open(os.path.join(folder, folders.MANIFEST_NAME)) as f:
            manifest = json.load(f)
        for split in sorted(manifest.get("shards", {})):
            paths = [os.path.join(folder, name) for name in manifest["shards"][split]]
            if not paths:
                continue
            source = grain.sources.ArrayRecordDataSource(paths)
            for i in range(len(source)):
                try:
                    record = records.decode(source[i])
                except records.CorruptRecordError as err:
                    raise DataError(f"{folder}: record {i} of split {split} is corrupt: {err}") from err
                frame = record["frame"]
                record_id = record["source"] if frame < 0 else f"{record['source']}#{frame}"
                yield {"image": record["image"], "label": record["label"], "subject": record["subject"],
                       "source": record["source"], "id": record_id, "dataset": record["dataset"], "split": split}


def iter_records(data_dir: str, benchmark: str = "", subset: str = "") -> Iterator[dict]:
    if not data_dir:
        raise ConfigError("--data_dir is required")
    first = data_dir.split(",")[0].strip()
    if not os.path.isdir(first):
        raise MissingInputError(f"--data_dir {first} is not a directory")
    found = _benchmark_dirs(first, benchmark, subset) if "," not in data_dir else []
    if found:
        for name, version_dir in found:
            yield from iter_benchmark(version_dir, name)
    else:
        yield from iter_shards(data_dir)


def build_encoder(init: str, img_size: int, pool: str):
    """(jitted images -> features, ModelConfig, pool used) for the init's encoder."""
    import dataclasses

    import jax
    from flax import nnx

    from usf_mae_jax.interop import weights
    from usf_mae_jax.models import classifier, vit

    params, fields = weights.load_weights(init)
    if fields is None:
        raise CheckpointError(f"init {init}: its model configuration is unknown (a workdir without config.json?)")
    source = vit.ModelConfig(**{k: v for k, v in fields.items()
                                if k in {f.name for f in dataclasses.fields(vit.ModelConfig)}})
    config = dataclasses.replace(source, img_size=img_size or source.img_size)
    if pool == "auto":
        pool = "cls" if "norm" in params else "mean"
    model = classifier.ViTClassifier(config, 1, nnx.Rngs(0), global_pool=pool == "mean")
    classifier.load_encoder_params(model, params, source.img_size)
    if pool == "mean" and "fc_norm" in params:  # a fine-tuned classifier: use its trained fc_norm
        model.fc_norm.scale[...] = np.asarray(params["fc_norm"]["scale"], np.float32)
        model.fc_norm.bias[...] = np.asarray(params["fc_norm"]["bias"], np.float32)
    graphdef, state = nnx.split(model)
    in_chans = config.in_chans
    method = "block_average_features" if pool == "blocks" else "forward_features"
    features = jax.jit(lambda s, images: getattr(nnx.merge(graphdef, s), method)(
        vit.normalize_images(images, in_chans)))
    return (lambda images: np.asarray(features(state, images))), config, pool


def embed(init: str, data_dir: str, out: str, img_size: int = 0, pool: str = "auto", batch_size: int = 64,
          benchmark: str = "", subset: str = "") -> dict:
    """Writes the `.npz` described in the module docstring; returns {'count', 'dim', 'pool', 'img_size'}."""
    from usf_mae_jax.core import files
    from usf_mae_jax.data import augment, pipeline

    if batch_size < 1:
        raise ConfigError(f"--batch_size must be positive, got {batch_size}")
    encode, config, pool = build_encoder(init, img_size, pool)
    resize = augment.make_augment("eval", config.img_size)
    chunks, meta, labels, pending = [], {k: [] for k in META_FIELDS}, [], []

    def flush() -> None:
        batch = np.stack(pending)
        padded = np.concatenate([batch, np.repeat(batch[:1], batch_size - len(batch), 0)]) \
            if len(batch) < batch_size else batch  # one compiled shape for every batch
        chunks.append(encode(padded)[:len(batch)])
        pending.clear()

    for record in iter_records(data_dir, benchmark, subset):
        image = pipeline.set_channels(record["image"], config.in_chans if config.in_chans in (1, 3) else 3)
        pending.append(resize(image, None))
        for key in META_FIELDS:
            meta[key].append(str(record[key]))
        labels.append(int(record["label"]))
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    if not labels:
        raise DataError(f"no records found under {data_dir}")
    embeddings = np.concatenate(chunks).astype(np.float32)
    files.write_npz(out, embeddings=embeddings, label=np.asarray(labels, np.int64),
             **{k: np.asarray(v) for k, v in meta.items()})
    log.info("wrote %d embeddings of dim %d (%s pool, %d px) to %s", len(labels), embeddings.shape[1], pool,
             config.img_size, out)
    return {"count": len(labels), "dim": int(embeddings.shape[1]), "pool": pool, "img_size": config.img_size}


def main(argv: list[str]) -> None:
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def work() -> int:
        if not FLAGS.init:
            raise ConfigError("--init is required (a workdir, an interop import dir or a .pth)")
        summary = embed(FLAGS.init, FLAGS.data_dir, FLAGS.out, FLAGS.img_size, FLAGS.pool, FLAGS.batch_size,
                        FLAGS.benchmark, FLAGS.subset)
        print(json.dumps({"out": FLAGS.out, **summary}))
        return 0

    sys.exit(run_cli(work, "embed", FLAGS.verbose))


if __name__ == "__main__":
    host_memory.reexec_with_huge_page_malloc()
    app.run(main)
