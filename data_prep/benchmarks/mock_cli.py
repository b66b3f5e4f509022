"""`python -m data_prep mock`: a synthetic BUS-BRA-layout benchmark with cue-controlled lesions, converted.

    python -m data_prep mock --out_dir OUT [--patients 400] [--size 64] [--seed 0] [--cues all=0,margin=1]

Writes the raw tree with `mock.write_busbra_tree` under `OUT/raw` (images from usf_mae_jax.data.synthetic,
patient-level stratified folds, the real CSV columns) and converts it with the BUS-BRA converter into `OUT`, so
that `input.data_dir=OUT` with dataset `busbra` reads it like the real benchmark. The settings are recorded in
`OUT/raw/mock.json`: running the same command again only finishes what is missing (the converter is
idempotent), and other settings for the same `OUT` are an error rather than a silent mix. The transfer study
(usf_mae_jax/study/lift.py, docs/transfer_study.md) builds its labelled set with this command.
"""

from __future__ import annotations

import argparse
import json
import os

from data_prep import arguments
from data_prep.benchmarks import mock
from data_prep.benchmarks.convert import convert
from data_prep.synthetic import cue_text
from usf_mae_jax.cli import ConfigError
from usf_mae_jax.data.synthetic import Cues

SETTINGS_FILE = "mock.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out_dir", required=True, help="converted benchmark root (the raw tree goes to OUT/raw)")
    parser.add_argument("--patients", type=arguments.positive_int, default=400,
                        help="patients; each has one or two images (about 1.5 on average)")
    parser.add_argument("--size", type=arguments.positive_int, default=64, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--malignant_fraction", type=arguments.fraction, default=0.4)
    parser.add_argument("--cues", type=cue_text, default="",
                        help="lesion cue strengths, e.g. 'all=0,margin=1' (usf_mae_jax.data.synthetic.Cues)")


def run(args: argparse.Namespace) -> int:
    if args.patients < 2 * mock.NUM_FOLDS:
        raise ConfigError(f"--patients must be at least {2 * mock.NUM_FOLDS} for 5 stratified folds")
    raw = os.path.join(args.out_dir, "raw")
    settings = {"patients": args.patients, "size": args.size, "seed": args.seed,
                "malignant_fraction": args.malignant_fraction, "cues": Cues.parse(args.cues).describe()}
    path = os.path.join(raw, SETTINGS_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            existing = json.load(f)
        if existing != settings:
            raise ConfigError(f"{args.out_dir} already holds a mock benchmark with other settings ({existing}); "
                              "choose another --out_dir")
    else:
        os.makedirs(raw, exist_ok=True)
        mock.write_busbra_tree(raw, patients=args.patients, size=args.size, seed=args.seed,
                               malignant_fraction=args.malignant_fraction, cues=Cues.parse(args.cues))
        with open(path, "w") as f:
            json.dump(settings, f, indent=2)
    manifest = convert("busbra", raw, args.out_dir)
    print(f"mock busbra in {args.out_dir}: {manifest['status']}, {manifest['records']} records, "
          f"cues {settings['cues']}")
    return 0
