"""The real-data table: every row of one task on the same data, splits, label budgets, image size and epochs.

    python -m usf_mae_jax.study.table --config configs/finetune.py:busi,recipe=small_data --data_dir BUSI_OUT \
        --init PRETRAIN_WORKDIR --out OUT/busi3 [--folds 1,2] [--seeds 0,1] [--budgets 0.05,1.0] \
        [--epochs 100] [--low_epochs 300] [--img_size 64] [--rows ...]
    python -m usf_mae_jax.study.table --report OUT/busi3 OUT/busi_seg ... > table.md

One invocation fills one task's rows; `--report` joins finished tasks into one markdown table. The task is the
downstream config (`configs/finetune.py` for classification, `configs/segment.py` for segmentation) with its
preset argument, so the table and a user's own runs share their recipe. Rows (ROWS):

  * `vit_scratch`, `vit_pretrained`: the config's task (fine-tuning or segmentation) from a random init and
    from `--init`, with the init's architecture in both (trainers/crossval.py sweeps; a finished run is kept);
  * `linear_probe` (classification): configs/finetune.py's `mode=linear` on the frozen pretrained encoder;
  * `ridge_probe` (classification): the closed-form ridge probe of evaluators/probes.py on the pretrained
    encoder's features, the feature (`--probe_pool auto`: every block's mean patch token averaged, `blocks`, or
    the final feature, `mean`) and the L2 strength (RIDGE_GRID) chosen together on the validation split;
  * `pixels_logreg`, `small_cnn`, `small_unet`, `otsu`: study/baselines.py, the models a user would pick
    instead, with the same `label_fraction`, seed, image size, epochs and batch size as the ViT rows.

Every row runs over folds x seeds x label budgets (`label_fraction` of the training split, drawn by the same
seeded, class-stratified rule; validation and test whole). The smallest budgets get `--low_epochs` (an epoch of
5% of a few hundred images is one batch). `OUT/table.json` holds every run, `OUT/table.md` the mean ± std
(sample std over folds x seeds) of the headline metrics. The command is resumable: run it again and only the
missing runs are trained.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from typing import Any

import numpy as np

from usf_mae_jax.cli import ConfigError

log = logging.getLogger(__name__)

ROWS = {"classification": ("vit_scratch", "vit_pretrained", "linear_probe", "ridge_probe", "pixels_logreg",
                           "small_cnn"),
        "segmentation": ("vit_scratch", "vit_pretrained", "small_unet", "otsu")}
HEADLINES = {"classification": ("f1_macro", "accuracy", "auc"), "segmentation": ("dice", "iou", "hd95")}
ARCHITECTURE = ("patch_size", "width", "depth", "heads", "mlp_ratio", "in_chans")
RIDGE_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # l2 per training example (evaluators/probes.py's scaling)
PROBE_POOLS = ("blocks", "mean")  # the ridge probe's candidate features with probe_pool="auto" (embed.py's pools)


@dataclasses.dataclass(frozen=True)
class Settings:
    """What every row of one task shares."""

    config: str  # "configs/finetune.py:busi,classes=binary"
    data_dir: str
    init: str
    folds: tuple
    seeds: tuple[int, ...]
    budgets: tuple[float, ...]
    epochs: float
    low_epochs: float
    img_size: int
    batch_size: int
    probe_pool: str = "auto"
    torch_threads: int = 1  # the torch baselines' CPU threads (study/baselines.py: 1 on a shared CPU)

    def epochs_for(self, budget: float) -> float:
        return self.epochs if budget >= 1.0 else self.low_epochs


def budget_name(budget: float) -> str:
    return f"{round(budget * 100, 2):g}pct"


def load_task_config(spec: str) -> Any:
    """`get_config(arg)` of 'path.py[:arg]' (the study's loader: the library never imports `configs`)."""
    from usf_mae_jax.study import lift

    path, _, arg = spec.partition(":")
    return lift.load_config(path, arg)


def kind_of(config: Any) -> str:
    if config.task == "segment":
        return "segmentation"
    if config.task == "finetune":
        return "classification"
    raise ConfigError(f"--config must be a fine-tuning (configs/finetune.py, mode=full) or segmentation config, got "
                      f"task {config.task!r}")


def init_architecture(init: str) -> dict[str, Any]:
    """The model fields of the pretrained encoder, which the scratch row copies so both rows share a model."""
    from usf_mae_jax.interop import weights

    _, fields = weights.load_weights(init)
    if not fields:
        raise ConfigError(f"--init {init} records no model configuration")
    return {k: fields[k] for k in ARCHITECTURE if k in fields}


def vit_config(base: Any, settings: Settings, budget: float, init: str | None, architecture: dict) -> Any:
    """The task config of one ViT row at one budget: the preset's recipe at the table's size and length."""
    config = base.copy_and_resolve_references()
    with config.unlocked():
        config.input.data_dir = settings.data_dir
        config.init = init
        config.label_fraction = float(budget)
        config.batch_size = settings.batch_size
        config.model.img_size = settings.img_size
        if init is None:
            config.model.update(architecture)
        # The recipe's warmup as a share of its length, so that it scales with the table's epochs.
        if base.get("warmup_epochs") is not None and base.get("total_epochs"):
            config.warmup_fraction = float(base.warmup_epochs) / float(base.total_epochs)
        for field in ("total_steps", "total_epochs", "warmup_epochs", "warmup_steps"):
            config[field] = None
        config.total_epochs = float(settings.epochs_for(budget))
        config.input.num_threads = 1
    return config


# ---------------------------------------------------------------------------------------------------- rows


def run_vit(base: Any, settings: Settings, row: str, budget: float, out: str, architecture: dict) -> list[dict]:
    """The crossval sweep of one ViT row (fine-tune, segmentation or linear probe) at one budget."""
    from usf_mae_jax.trainers import crossval

    init = None if row == "vit_scratch" else settings.init
    config = vit_config(base, settings, budget, init, architecture)
    if row == "linear_probe":
        config = linear_probe_config(config, settings)
    target = os.path.join(out, "runs", row, budget_name(budget))
    return [{"row": row, "budget": budget, "fold": r["fold"], "seed": r["seed"], **_scalars(r)}
            for r in crossval.sweep(config, target, list(settings.folds), list(settings.seeds))["runs"]]


def linear_probe_config(config: Any, settings: Settings) -> Any:
    """The fine-tune config turned into the reference linear probe (configs/finetune.py, mode=linear)."""
    linear = load_task_config(settings.config + (",mode=linear" if ":" in settings.config else ":mode=linear"))
    with linear.unlocked():
        for field in ("input", "init", "label_fraction", "fold", "subset", "dataset", "seed"):
            linear[field] = config[field]
        linear.model.img_size = config.model.img_size
        linear.model.global_pool = True  # the probes' feature: the MAE's cls token gets no training signal
    return linear


def run_ridge(settings: Settings, budget: float, out: str) -> list[dict]:
    """The ridge probe of the pretrained encoder per fold and seed (written to `out`, resumable)."""
    from usf_mae_jax.core import files

    runs = []
    for fold in settings.folds:
        for seed in settings.seeds:
            path = os.path.join(out, "runs", "ridge_probe", budget_name(budget), f"fold{fold}_seed{seed}.json")
            if not os.path.isfile(path):
                files.write_json(path, ridge_probe(settings, fold, seed, budget))
            runs.append({"row": "ridge_probe", "budget": budget, "fold": fold, "seed": seed,
                         **_scalars(files.read_json(path))})
    return runs


def ridge_probe(settings: Settings, fold: Any, seed: int, budget: float) -> dict[str, Any]:
    """The ridge probe of the pretrained encoder: its feature (`probe_pool`, or with `auto` the best of PROBE_POOLS)
    and L2 strength chosen by validation macro-F1 together; scored on test once."""
    from usf_mae_jax import embed
    from usf_mae_jax.data import augment, downstream
    from usf_mae_jax.evaluators import metrics, probes

    config = load_task_config(settings.config)
    data = downstream.load_benchmark(settings.data_dir, config.dataset, fold, config.get("subset"))
    splits = {"train": downstream.label_subset(data.splits["train"], budget, seed),
              "validation": data.splits["validation"], "test": data.splits["test"]}
    num_classes = len(data.class_names)
    candidates = []
    for pool in PROBE_POOLS if settings.probe_pool == "auto" else (settings.probe_pool,):
        encode, model_config, _ = embed.build_encoder(settings.init, settings.img_size, pool)
        resize = augment.make_augment("eval", model_config.img_size)

        def features(split: downstream.SplitData, encode=encode, resize=resize, channels=model_config.in_chans):
            images = np.stack([resize(augment.set_channels(image, channels), None) for image in split.images])
            return np.concatenate([encode(images[i:i + 128]) for i in range(0, len(images), 128)])

        x = {name: features(split) for name, split in splits.items()}
        for l2 in RIDGE_GRID:
            predicted = probes.ridge_predict(x["train"], splits["train"].labels, x["validation"], num_classes, l2)
            score = probes.scores(splits["validation"].labels, predicted)["f1_macro"]
            candidates.append((score, l2, pool, x))
    score, l2, pool, x = max(candidates, key=lambda c: (c[0], c[1]))  # ties: the stronger regularisation
    predicted = probes.ridge_predict(x["train"], splits["train"].labels, x["test"], num_classes, l2)
    results = metrics.classification_results(splits["test"].labels, np.eye(num_classes)[predicted],
                                             data.class_names, data.split_name("test"))
    return {**{k: results[k] for k in metrics.RESULT_KEYS}, "l2": l2, "pool": pool, "validation_f1_macro": score,
            "n_train": len(splits["train"])}


def run_baseline(settings: Settings, model: str, budget: float, out: str) -> list[dict]:
    """One baseline of study/baselines.py per fold and seed, with the ViT rows' settings (resumable)."""
    from usf_mae_jax.study import baselines

    if model in ("small_cnn", "small_unet") and settings.torch_threads > 0:
        baselines.import_torch(model).set_num_threads(settings.torch_threads)
    config = load_task_config(settings.config)
    runs = []
    for fold in settings.folds:
        for seed in settings.seeds:
            options = {} if model == "otsu" else {
                "img_size": settings.img_size, "label_fraction": float(budget), "seed": seed}
            if model in ("small_cnn", "small_unet"):
                options.update(epochs=int(settings.epochs_for(budget)), batch_size=settings.batch_size)
            run_settings = {"model": model, "benchmark": config.dataset, "fold": fold,
                            "subset": config.get("subset"), **options}
            target = os.path.join(out, "runs", model, budget_name(budget), f"fold{fold}_seed{seed}")
            results = baselines.run_to(target, model, run_settings, lambda f=fold: baselines.load_data(
                model, settings.data_dir, config.dataset, f, config.get("subset")))
            runs.append({"row": model, "budget": budget, "fold": fold, "seed": seed, **_scalars(results)})
    return runs


def _scalars(results: dict) -> dict[str, float | None]:
    keys = {key for keys in HEADLINES.values() for key in keys}
    return {k: results.get(k) for k in keys if k in results}


# -------------------------------------------------------------------------------------------------- report


def summarize(runs: list[dict], kind: str, rows: list[str], budgets: list[float]) -> dict[str, dict]:
    """{row: {budget name: {metric: (mean, std, n)}}} over folds x seeds (sample std)."""
    from usf_mae_jax.study import report

    return {row: {budget_name(b): {m: report.mean_std([r.get(m) for r in runs if r["row"] == row and r["budget"] == b])
                                   for m in HEADLINES[kind]} for b in budgets} for row in rows}


def task_markdown(title: str, kind: str, summary: dict, budgets: list[float]) -> list[str]:
    from usf_mae_jax.study import report

    metrics = HEADLINES[kind]
    header = "| row | " + " | ".join(f"{m} @ {b:.0%}" for b in budgets for m in metrics) + " |"
    lines = [f"### {title}", "", header, "|---" * (1 + len(metrics) * len(budgets)) + "|"]
    for row, cells in summary.items():
        values = [report.fmt(cells[budget_name(b)][m]) for b in budgets for m in metrics]
        lines.append(f"| {row} | " + " | ".join(values) + " |")
    return lines


def write(out: str, settings: Settings, kind: str, rows: list[str], runs: list[dict], seconds: float) -> dict:
    from usf_mae_jax.core import files

    summary = summarize(runs, kind, rows, list(settings.budgets))
    payload = {"settings": dataclasses.asdict(settings), "kind": kind, "rows": rows, "runs": runs,
               "summary": summary, "seconds": seconds}
    files.write_json(os.path.join(out, "table.json"), payload)
    title = f"{settings.config} ({len(settings.folds)} folds x {len(settings.seeds)} seeds, {settings.img_size} px)"
    files.write_text(os.path.join(out, "table.md"),
                     "\n".join(task_markdown(title, kind, summary, list(settings.budgets))) + "\n")
    return payload


def merged_markdown(folders: list[str]) -> str:
    """One markdown document of several finished task folders (their table.json)."""
    from usf_mae_jax.core import files

    lines = []
    for folder in folders:
        path = os.path.join(folder, "table.json")
        if not os.path.isfile(path):
            raise ConfigError(f"{folder} holds no table.json: run its task first")
        payload = files.read_json(path)
        settings = payload["settings"]
        title = (f"{settings['config']} ({len(settings['folds'])} folds x {len(settings['seeds'])} seeds, "
                 f"{settings['img_size']} px, {settings['epochs']:g} / {settings['low_epochs']:g} epochs)")
        lines += [*task_markdown(title, payload["kind"], payload["summary"], settings["budgets"]), ""]
    return "\n".join(lines)


def run_table(settings: Settings, out: str, rows: list[str] | None = None) -> dict:
    """Every row of the task (module docstring), skipping finished runs; returns the report's payload."""
    base = load_task_config(settings.config)
    kind = kind_of(base)
    rows = list(rows or ROWS[kind])
    unknown = [r for r in rows if r not in ROWS[kind]]
    if unknown:
        raise ConfigError(f"--rows {unknown} are not {kind} rows; choose among {', '.join(ROWS[kind])}")
    if not settings.budgets or any(not 0 < b <= 1 for b in settings.budgets):
        raise ConfigError(f"--budgets must be fractions in (0, 1], got {list(settings.budgets)}")
    architecture = init_architecture(settings.init)
    started, runs = time.perf_counter(), []
    for budget in settings.budgets:
        for row in rows:
            if row in ("vit_scratch", "vit_pretrained", "linear_probe"):
                runs += run_vit(base, settings, row, budget, out, architecture)
            elif row == "ridge_probe":
                runs += run_ridge(settings, budget, out)
            else:
                runs += run_baseline(settings, row, budget, out)
    return write(out, settings, kind, rows, runs, time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    from usf_mae_jax import cli
    from usf_mae_jax.trainers.crossval import parse_int_list

    parser = argparse.ArgumentParser(prog="python -m usf_mae_jax.study.table", description=__doc__.split("\n")[0])
    parser.add_argument("--report", nargs="+", default=None, help="print one table of finished task folders")
    parser.add_argument("--config", help="the task: configs/finetune.py:PRESET or configs/segment.py:PRESET")
    parser.add_argument("--data_dir", help="the converted benchmark (the converter's --out_dir)")
    parser.add_argument("--init", help="the pretrained encoder (a pretraining workdir, import dir or .pth)")
    parser.add_argument("--out", help="the task's folder (runs, table.json, table.md)")
    parser.add_argument("--folds", default="1,2", help="comma-separated folds of the benchmark")
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds")
    parser.add_argument("--budgets", default="0.05,1.0", help="comma-separated label fractions")
    parser.add_argument("--epochs", type=float, default=100.0, help="epochs at the full label budget")
    parser.add_argument("--low_epochs", type=float, default=300.0, help="epochs below the full label budget")
    parser.add_argument("--img_size", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--rows", default="", help="comma-separated rows (default: all of the task's kind)")
    parser.add_argument("--probe_pool", default="auto", choices=("auto", "blocks", "mean", "cls"),
                        help="the ridge probe's feature (usf_mae_jax/embed.py's pools); auto: the better of "
                             "blocks and mean on validation, chosen with the L2 strength")
    parser.add_argument("--torch_threads", type=int, default=1,
                        help="CPU threads of the torch baselines (0: torch's default; 1 suits a shared CPU)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)

    def work() -> int:
        if args.report:
            print(merged_markdown(args.report))
            return 0
        missing = [f"--{name}" for name in ("config", "data_dir", "init", "out") if not getattr(args, name)]
        if missing:
            raise ConfigError(f"{', '.join(missing)} required (or --report FOLDERS)")
        try:
            budgets = tuple(float(b) for b in args.budgets.split(",") if b.strip())
        except ValueError:
            raise ConfigError(f"--budgets must be comma-separated fractions, got {args.budgets!r}") from None
        settings = Settings(args.config, args.data_dir, args.init, tuple(parse_int_list(args.folds, "folds")),
                            tuple(parse_int_list(args.seeds, "seeds")), budgets, args.epochs, args.low_epochs,
                            args.img_size, args.batch_size, args.probe_pool, args.torch_threads)
        run_table(settings, args.out, [r.strip() for r in args.rows.split(",") if r.strip()])
        print(merged_markdown([args.out]))
        return 0

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return cli.run_cli(work, "python -m usf_mae_jax.study.table", args.verbose)


if __name__ == "__main__":
    sys.exit(main())
