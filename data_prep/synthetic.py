"""`python -m data_prep synthetic`: the synthetic ultrasound set as shards, with its lesion labels.

This gives the shard path an end-to-end test and a benchmark input that need no download: the same images
as `usf_mae_jax.data.synthetic.SyntheticUltrasound` (a pure function of seed and index), with label 0
(benign), 1 (malignant) or -1 (no lesion). `--val_fraction` routes a deterministic share of the images (by
index) to a `val` split for fine-tuning demos; `--cues` sets how strongly malignant lesions differ from
benign ones (`usf_mae_jax.data.synthetic.Cues`, e.g. `all=0,margin=1`; default: today's images). Every
option is checked while the command line is parsed (`data_prep.arguments`), so a bad value is a one-line
error before anything is written.
"""

from __future__ import annotations

import argparse
import os

from data_prep import arguments, writer
from data_prep.folder import report
from usf_mae_jax.cli import ConfigError
from usf_mae_jax.data.synthetic import Cues, SyntheticUltrasound

CONVERTER_VERSION = "synthetic 1.0"
MIN_SIZE = 8  # smaller images cannot hold the simulated probe geometry and lesion


def load(task: tuple):
    """Task (index, count, size, seed, lesion_fraction, split[, cues text]) -> the synthetic image at that index."""
    index, count, size, seed, lesion_fraction, split, *cues = task
    item = SyntheticUltrasound(count, size, seed=seed, lesion_fraction=lesion_fraction,
                               cues=Cues.parse(cues[0]) if cues else None)[index]
    yield writer.Example(image=item["image"], source=item["source"], label=int(item["label"]), split=split)


def make_tasks(count: int, size: int, seed: int, lesion_fraction: float, val_fraction: float,
               cues: str = "") -> list[tuple]:
    val_every = round(1 / val_fraction) if val_fraction > 0 else 0
    return [(i, count, size, seed, lesion_fraction, "val" if val_every and i % val_every == val_every - 1
             else "train", *((cues,) if cues else ())) for i in range(count)]


def cue_text(text: str) -> str:
    """argparse type of --cues: the canonical text of a valid cue setting ('' for the default)."""
    try:
        cues = Cues.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return "" if cues == Cues() else cues.describe()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--count", type=arguments.positive_int, required=True, help="number of images")
    parser.add_argument("--size", type=arguments.positive_int, default=256,
                        help=f"image side in pixels (at least {MIN_SIZE})")
    parser.add_argument("--name", type=arguments.dataset_name, default="synthetic", help="dataset folder name")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lesion_fraction", type=arguments.fraction, default=0.5)
    parser.add_argument("--val_fraction", type=arguments.fraction_below_one, default=0.0,
                        help="share of images in a 'val' split, in [0, 1)")
    parser.add_argument("--cues", type=cue_text, default="",
                        help="lesion cue strengths, e.g. 'all=0,margin=1' (usf_mae_jax.data.synthetic.Cues)")
    parser.add_argument("--workers", type=arguments.positive_int, default=os.cpu_count() or 1)
    parser.add_argument("--records_per_shard", type=arguments.positive_int,
                        default=writer.DEFAULT_RECORDS_PER_SHARD)
    parser.add_argument("--nearest_size", type=arguments.non_negative_int, default=writer.DEFAULT_NEAREST_SIZE,
                        help="also store the nearest resize of each image to this square size, the usf_mae "
                             "recipe's first step (0: none; docs/data_pipeline.md)")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--no_progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    if args.size < MIN_SIZE:
        raise ConfigError(f"--size must be at least {MIN_SIZE} pixels, got {args.size}")
    tasks = make_tasks(args.count, args.size, args.seed, args.lesion_fraction, args.val_fraction, args.cues)
    manifest = writer.write_dataset(
        args.out_dir, args.name, tasks, load, workers=args.workers, records_per_shard=args.records_per_shard,
        overwrite=args.overwrite, max_side=0, nearest_size=args.nearest_size, progress=not args.no_progress,
        manifest_extra={"converter_version": CONVERTER_VERSION, "licence": "none (generated)",
                        "generator": {"count": args.count, "size": args.size, "seed": args.seed,
                                      "lesion_fraction": args.lesion_fraction,
                                      "val_fraction": args.val_fraction,
                                      "cues": Cues.parse(args.cues).describe()}})
    return report(manifest)
