"""Feature extraction for users: one embedding per record, with its source and label.

    python -m usf_mae_jax.embed --init PATH --data_dir OUT --out features.npz \
        [--img_size 224] [--pool auto|cls|mean] [--batch_size 64] [--benchmark busbra] [--variant roi]

`--init` is anything `config.init` accepts: a pretraining or fine-tune workdir, an interop import directory
or a PyTorch `.pth`/`.pt`/`.safetensors`. `--data_dir` is either

  * a converted benchmark (the `--out_dir` of `python -m data_prep busbra|mmotu|gist514|labelled`, or its
    version folder): every stored record, whatever its split; or
  * shard folders written by data_prep/writer.py (a folder with `manifest.json`, or a root holding several,
    comma-separated allowed): every record of every split listed in each manifest.

The feature is the encoder's cls token after `norm` (`--pool cls`, the reference linear-probe feature) or the
mean patch token after `fc_norm` (`--pool mean`, the reference fine-tune feature; a fine-tuned init's
`fc_norm` is used). `auto` takes cls when the init has the final `norm` (an MAE), mean otherwise. Images are
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

from usf_mae_jax import host_memory

flags.DEFINE_string("init", None, "Pretrained weights: workdir, interop import dir or .pth/.pt/.safetensors.")
flags.DEFINE_string("data_dir", None,
                    "A converted benchmark dir, or shard folder(s) from data_prep (comma-separated).")
flags.DEFINE_string("out", "features.npz", "Output .npz path.")
flags.DEFINE_integer("img_size", 0, "Input size; 0 = the init's image size.")
flags.DEFINE_enum("pool", "auto", ["auto", "cls", "mean"], "Which feature: cls token or mean patch token.")
flags.DEFINE_integer("batch_size", 64, "Images per forward pass.")
flags.DEFINE_string("benchmark", "", "Benchmark name when --data_dir holds several converted benchmarks.")
flags.DEFINE_string("variant", "", "Benchmark variant (GIST514-DB: roi or raw).")
FLAGS = flags.FLAGS

log = logging.getLogger(__name__)
META_FIELDS = ("source", "id", "dataset", "subject", "split")


def _benchmark_dirs(data_dir: str, benchmark: str, variant: str) -> list[tuple[str, str]]:
    """(name, version dir) of each converted benchmark under `data_dir`; [] if there is none."""
    from data_prep.benchmarks import reader

    if os.path.isfile(os.path.join(data_dir, "splits.json")):
        with open(os.path.join(data_dir, "splits.json")) as f:
            return [(json.load(f)["benchmark"], data_dir)]
    names = [benchmark] if benchmark else [n for n in reader.BUILDER_NAMES
                                           if os.path.isdir(os.path.join(data_dir, reader.BUILDER_NAMES[n]))]
    found = []
    for name in names:
        try:
            found.append((name, reader.find_version_dir(data_dir, name, variant or None)))
        except FileNotFoundError:
            if benchmark:
                raise
    return found


def iter_benchmark(version_dir: str, name: str) -> Iterator[dict]:
    """Every stored record of a converted benchmark, part by part (each record once)."""
    from data_prep.benchmarks.reader import SplitSource

    with open(os.path.join(version_dir, "splits.json")) as f:
        parts = json.load(f)["parts"]
    for part in sorted(parts):
        source = SplitSource(version_dir, list(parts[part]["ids"]))
        for i in range(len(source)):
            example = source[i]
            yield {**example, "dataset": name, "split": part}


def iter_shards(data_dirs: str) -> Iterator[dict]:
    """Every record of every split of the shard folders (data_prep/writer.py layout), decoded."""
    import grain

    from usf_mae_jax.data import pipeline, records

    for entry in [d.strip() for d in data_dirs.split(",") if d.strip()]:
        folders = [entry] if os.path.isfile(os.path.join(entry, pipeline.MANIFEST_NAME)) else sorted(
            os.path.join(entry, d) for d in os.listdir(entry)
            if os.path.isfile(os.path.join(entry, d, pipeline.MANIFEST_NAME)))
        if not folders:
            raise FileNotFoundError(f"{entry}: neither a converted benchmark (splits.json) nor shard "
                                    f"folders ({pipeline.MANIFEST_NAME}); convert it with "
                                    "`python -m data_prep ...` first")
        for folder in folders:
            with open(os.path.join(folder, pipeline.MANIFEST_NAME)) as f:
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
                        raise ValueError(f"{folder}: record {i} of split {split} is corrupt: {err}") from err
                    frame = record["frame"]
                    record_id = record["source"] if frame < 0 else f"{record['source']}#{frame}"
                    yield {"image": record["image"], "label": record["label"], "subject": record["subject"],
                           "source": record["source"], "id": record_id, "dataset": record["dataset"],
                           "split": split}


def iter_records(data_dir: str, benchmark: str = "", variant: str = "") -> Iterator[dict]:
    if not data_dir:
        raise ValueError("--data_dir is required")
    first = data_dir.split(",")[0].strip()
    if not os.path.isdir(first):
        raise FileNotFoundError(f"--data_dir {first} is not a directory")
    found = _benchmark_dirs(first, benchmark, variant) if "," not in data_dir else []
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

    from usf_mae_jax.models import classifier, vit
    from usf_mae_jax.train import checkpoint

    params, fields = checkpoint.load_init_params(init)
    if fields is None:
        raise ValueError(f"init {init}: its model configuration is unknown (a workdir without config.json?)")
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
    features = jax.jit(lambda s, images: nnx.merge(graphdef, s).forward_features(
        vit.normalize_images(images, in_chans)))
    return (lambda images: np.asarray(features(state, images))), config, pool


def embed(init: str, data_dir: str, out: str, img_size: int = 0, pool: str = "auto", batch_size: int = 64,
          benchmark: str = "", variant: str = "") -> dict:
    """Writes the `.npz` described in the module docstring; returns {'count', 'dim', 'pool', 'img_size'}."""
    from usf_mae_jax.data import augment, pipeline

    if batch_size < 1:
        raise ValueError(f"--batch_size must be positive, got {batch_size}")
    encode, config, pool = build_encoder(init, img_size, pool)
    resize = augment.make_augment("eval", config.img_size)
    chunks, meta, labels, pending = [], {k: [] for k in META_FIELDS}, [], []

    def flush() -> None:
        batch = np.stack(pending)
        padded = np.concatenate([batch, np.repeat(batch[:1], batch_size - len(batch), 0)]) \
            if len(batch) < batch_size else batch  # one compiled shape for every batch
        chunks.append(encode(padded)[:len(batch)])
        pending.clear()

    for record in iter_records(data_dir, benchmark, variant):
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
        raise ValueError(f"no records found under {data_dir}")
    embeddings = np.concatenate(chunks).astype(np.float32)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    np.savez(out, embeddings=embeddings, label=np.asarray(labels, np.int64),
             **{k: np.asarray(v) for k, v in meta.items()})
    log.info("wrote %d embeddings of dim %d (%s pool, %d px) to %s", len(labels), embeddings.shape[1], pool,
             config.img_size, out)
    return {"count": len(labels), "dim": int(embeddings.shape[1]), "pool": pool, "img_size": config.img_size}


def main(argv: list[str]) -> None:
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not FLAGS.init:
        sys.exit("embed: --init is required (a workdir, an interop import dir or a .pth)")
    try:
        summary = embed(FLAGS.init, FLAGS.data_dir, FLAGS.out, FLAGS.img_size, FLAGS.pool, FLAGS.batch_size,
                        FLAGS.benchmark, FLAGS.variant)
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"embed: {err}")
    print(json.dumps({"out": FLAGS.out, **summary}))


if __name__ == "__main__":
    host_memory.reexec_with_huge_page_malloc()
    app.run(main)
