"""Cross-validation driver: every (fold, seed) fine-tune, linear-probe or segmentation run, then one table.

    python -m usf_mae_jax.trainers.crossval --config=configs/finetune.py:busbra --folds 1,2,3,4,5 \
        [--seeds 0,1,2] --workdir W [--config.init=PATH --config.input.data_dir=OUT ...]
    python -m usf_mae_jax.trainers.crossval --config=configs/segment.py:busbra --folds 1,2,3,4,5 --workdir W ...

Each run goes to `W/fold{K}_seed{S}/` with its own `results.json`, confusion PNG, `splits.json` (the exact
record ids of its train / validation / test splits) and `provenance.json` (the init and the pretraining
manifests it came from). A run whose `results.json` already exists is not repeated, so an interrupted sweep is
resumed by running the same command again. At the end `W/crossval.md` holds the mean ± std of every metric
(MCC included) next to the paper's number, and `W/crossval.json` the per-run values behind it. Segmentation
runs are tabulated by their own metrics (evaluators/segmentation.py: Dice, IoU, HD95 in pixels, ...).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

from absl import app, flags
from ml_collections import config_flags

from usf_mae_jax import cli, host_memory
from usf_mae_jax.cli import ConfigError, run_cli

config_flags.DEFINE_config_file("config", "configs/finetune.py",
                                "Fine-tune config file, optionally :preset,args.", lock_config=True)
flags.DEFINE_string("folds", "",
                    "Comma-separated folds (BUS-BRA 1..5, GIST514-DB 0..4); '' = the config's fold.")
flags.DEFINE_string("seeds", "", "Comma-separated seeds; '' = the config's seed.")
flags.DEFINE_string("workdir", None, "Root of the sweep; each run gets W/fold{K}_seed{S}.")
cli.define_verbose_flag()
FLAGS = flags.FLAGS

log = logging.getLogger(__name__)

CROSSVAL_TASKS = ("finetune", "linear_probe", "segment")
CLASSIFICATION_NOTE = ("\nValues in %; std is the sample std over runs. The paper reports one F1 per benchmark "
                       "without saying macro or weighted (docs/usf_mae_recipe.md); it is shown next to our macro F1.\n")
SEGMENTATION_NOTE = ("\nValues in %, except hd95 in pixels; std is the sample std over runs. Dice, IoU, precision "
                     "and recall are per-image means over the foreground classes, *_global pooled over the test set "
                     "(docs/segmentation.md).\n")


def parse_int_list(text: str, what: str) -> list[int]:
    """'1,2, 3' -> [1, 2, 3]; a clear error for anything that is not a list of integers."""
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ConfigError(f"--{what} must be comma-separated integers, got {text!r}") from None
    if len(set(values)) != len(values):
        raise ConfigError(f"--{what} repeats a value: {text!r}")
    return values


def run_dir(workdir: str, fold: int | None, seed: int) -> str:
    return os.path.join(workdir, f"fold{'default' if fold is None else fold}_seed{seed}")


def sweep(config: Any, workdir: str, folds: list[int | None], seeds: list[int], run_fn=None) -> dict:
    """Runs every (fold, seed) not finished yet, then writes the table; returns {'table', 'runs'}.

    `run_fn(config, workdir)` defaults to a run of the training loop with the config's task; tests pass a
    stand-in.
    """
    from usf_mae_jax.evaluators import metrics, segmentation

    run_fn = run_fn or run_task
    if config.task == "segment":
        keys, raw_keys, paper, note = segmentation.SCALAR_KEYS, segmentation.DISTANCE_KEYS, {}, SEGMENTATION_NOTE
    else:
        keys, raw_keys, paper, note = metrics.SCALAR_KEYS, (), metrics.paper_reference(config.dataset), \
            CLASSIFICATION_NOTE
    runs = []
    for fold in folds:
        for seed in seeds:
            target = run_dir(workdir, fold, seed)
            results_path = os.path.join(target, "results.json")
            if not os.path.isfile(results_path):
                run_config = config.copy_and_resolve_references()
                with run_config.unlocked():
                    run_config.fold, run_config.seed = fold, seed
                log.info("cross-validation: fold %s seed %d -> %s", fold, seed, target)
                run_fn(run_config, target)
            else:
                log.info("cross-validation: fold %s seed %d already done in %s", fold, seed, target)
            with open(results_path) as f:
                runs.append({"fold": fold, "seed": seed, "workdir": target, **json.load(f)})
    title = (f"{config.dataset} {config.task} ({len(folds)} fold(s) x {len(seeds)} seed(s); init: "
             f"{config.init or 'random'})")
    table = metrics.crossval_table(runs, paper=paper, title=title, keys=keys, raw_keys=raw_keys) + note
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "crossval.md"), "w") as f:
        f.write(table)
    per_run = [{k: r[k] for k in ("fold", "seed", "workdir", *keys)} for r in runs]
    with open(os.path.join(workdir, "crossval.json"), "w") as f:
        json.dump({"runs": per_run, "summary": metrics.summarize(runs, keys)}, f, indent=2)
    return {"table": table, "runs": runs}


def run_task(config: Any, workdir: str) -> dict:
    """One run of the training loop with the task `config.task` names."""
    from usf_mae_jax.trainers import loop, registry

    return loop.run(config, workdir, registry.create(config))


def main(argv: list[str]) -> None:
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    def work() -> int:
        from usf_mae_jax.core import steps

        config = FLAGS.config
        steps.prefer_overrides(config, [n[len("config."):] for n in FLAGS if n.startswith("config.")
                                        and FLAGS[n].present])
        if config.task not in CROSSVAL_TASKS:
            raise ConfigError(f"crossval: --config must be a downstream config (task {', '.join(CROSSVAL_TASKS)}), "
                              f"got task {config.task!r}")
        if not FLAGS.workdir:
            raise ConfigError("crossval: --workdir is required")
        folds = parse_int_list(FLAGS.folds, "folds") or [config.fold]
        seeds = parse_int_list(FLAGS.seeds, "seeds") or [config.seed]
        print(sweep(config, FLAGS.workdir, folds, seeds)["table"])
        return 0

    sys.exit(run_cli(work, "crossval", FLAGS.verbose))


if __name__ == "__main__":
    host_memory.reexec_with_huge_page_malloc()
    app.run(main)
