"""The transfer (lift) study: does pretraining with this code make a better encoder than none?

    python -m usf_mae_jax.study.lift --out DIR [--scale small|tiny|gpu] [--folds 5] [--seeds 3] \
        [--arms plain,fov,usaug,normpix] [--budgets 0.05,1.0] [--cues all=0,margin=1,...]
    python -m usf_mae_jax.study.lift --out DIR --pool SHARDS[,SHARDS...] --labelled ROOT --benchmark busi ...

One command, resumable (a finished step is skipped, like trainers/crossval.py), every training run through
the project's own entry points (the configs, `registry.create`, `loop.run`, `crossval.sweep`):

  1. data (`python -m data_prep ...`, idempotent): an unlabelled pool (`data_prep synthetic`, lesions of both
     classes drawn with the study's cues, labels never read by pretraining) and a labelled BUS-BRA-layout
     set from other seeds (`data_prep mock`), both from usf_mae_jax/data/synthetic.py. Or real data:
     `--pool` names `data_prep` shard folders (or roots of them) and `--labelled ROOT --benchmark NAME` a
     converted benchmark (`busbra`, `busi`, `mmotu`, `gist514`, `labelled`); either replaces its synthetic
     counterpart, and the report names the folders, their record counts and the benchmark's folds;
  2. one pretraining per arm (`plain` = the USF-MAE recipe at the scale's size; `fov`, `usaug`, `normpix`
     switch on one ultrasound-aware option each; `a+b` combines them), with the ridge / k-NN probes of every
     fold's train -> test split at step 0 and every `eval_steps` (evaluators/probes.py);
  3. for the plain arm and a random init (`scratch`): full fine-tuning and linear probing over folds x seeds,
     at each label budget (`label_fraction` of the training split, validation and test whole); the option
     arms at the `--ablation_budgets` (the smallest budget unless told);
  4. `lift.md`, `lift.json` and `lift.png` (study/report.py).

The labelled set is built so that it can measure a lift (docs/transfer_study.md): the cue strengths make a
fully supervised model clearly better than chance while a small label budget from scratch is not saturated.
`--scale` picks the sizes (SCALES below); `gpu` is the accelerator-sized version, described in the docs.

Downstream budgets are epochs of the labelled training split (`finetune_epochs`, `linear_epochs`), so a
larger or smaller labelled set gets proportionally more or fewer steps; the smallest label budget gets its
own, longer epoch count, since 5% of a few hundred images is one or two batches an epoch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
from typing import Any

import jax

from usf_mae_jax.cli import ConfigError

log = logging.getLogger(__name__)

OPTIONS = ("fov", "usaug", "normpix")
# The labelled set's and the pool's lesions (docs/transfer_study.md): today's three cues (margin, orientation,
# posterior) at full strength, with lesions 1.5x larger and darker (interior factor squared and more) than the
# generator's default, whose 64 px lesions are barely visible through the speckle.
CONSPICUOUS = "lesion_scale=1.5,lesion_contrast=2.5"  # the ultrasound-aware options an arm can switch on
DATASET, POOL_NAME = "busbra", "pool"


@dataclasses.dataclass(frozen=True)
class Scale:
    """Sizes of one study setting. Model fields follow configs/common.py's model block."""

    img_size: int
    model: dict[str, Any]
    pool_count: int  # unlabelled images
    lesion_fraction: float  # of the pool
    patients: int  # labelled set: about 1.5 images per patient
    pretrain_steps: int
    pretrain_batch: int
    pretrain_lr: float
    probe_evals: int  # probe evaluations after step 0
    finetune_epochs: dict[str, float]  # "low" (budget < 1) and "full" (budget 1)
    finetune_batch: int
    finetune_lr: float
    linear_epochs: int
    linear_batch: int
    cues: str  # the labelled set's and the pool's lesion cues (synthetic.Cues text)


SCALES = {
    # The smoke test's size: a mu model on 32 px images, a few steps everywhere.
    "tiny": Scale(img_size=32, model=dict(variant="mu", patch_size=8, depth=1), pool_count=48,
                  lesion_fraction=1.0, patients=20, pretrain_steps=4, pretrain_batch=8, pretrain_lr=1e-3,
                  probe_evals=2, finetune_epochs={"low": 2, "full": 3}, finetune_batch=8, finetune_lr=5e-4,
                  linear_epochs=2, linear_batch=16, cues=""),
    # The CPU setting (docs/transfer_study.md): 2 cores, about half an hour for the plain arm and scratch.
    "small": Scale(img_size=64, model=dict(variant="tiny", patch_size=8, width=128, depth=4, heads=4,
                                           decoder_width=64, decoder_depth=1, decoder_heads=2),
                   pool_count=4000, lesion_fraction=1.0, patients=400, pretrain_steps=1500, pretrain_batch=64,
                   pretrain_lr=1.5e-3, probe_evals=4, finetune_epochs={"low": 120, "full": 12}, finetune_batch=32,
                   finetune_lr=5e-4, linear_epochs=90, linear_batch=256, cues=CONSPICUOUS),
    # The accelerator setting: ViT-B/16 at 224 px on 100k frames (a few GPU hours; see the docs).
    "gpu": Scale(img_size=224, model=dict(variant="base", patch_size=16, dtype="bfloat16"), pool_count=100_000,
                 lesion_fraction=1.0, patients=2000, pretrain_steps=40_000, pretrain_batch=256, pretrain_lr=6e-4,
                 probe_evals=20, finetune_epochs={"low": 500, "full": 100}, finetune_batch=64, finetune_lr=5e-4,
                 linear_epochs=90, linear_batch=256, cues=CONSPICUOUS),
}


def parse_arm(name: str) -> tuple[str, ...]:
    """'plain' -> (); 'fov+normpix' -> ('fov', 'normpix'); anything else is a ConfigError."""
    if name == "plain":
        return ()
    options = tuple(name.split("+"))
    unknown = [o for o in options if o not in OPTIONS]
    if unknown or not options or len(set(options)) != len(options):
        raise ConfigError(f"study arm {name!r} is not 'plain' or a '+'-joined set of {', '.join(OPTIONS)}")
    return options


def budget_name(fraction: float) -> str:
    return f"{round(fraction * 100, 2):g}pct"


# ------------------------------------------------------------------------------------------------- data


def data_prep(*args: str) -> None:
    """`python -m data_prep ARGS` in a child process (the library never imports data_prep, docs/design.md)."""
    command = [sys.executable, "-m", "data_prep", *args]
    log.info("study: %s", " ".join(command[1:]))
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise ConfigError(f"`{' '.join(command[1:])}` failed: {(done.stderr or done.stdout).strip()[-500:]}")


def build_data(out: str, scale: Scale, cues: str, pool: str = "", labelled: str = "",
               benchmark: str = DATASET) -> dict[str, str]:
    """The unlabelled pool (shards) and the labelled set: the synthetic ones (written under `out`) unless `pool`
    (a comma list of data_prep shard folders or roots) or `labelled` (a converted benchmark's root) are given.
    Returns their locations and the benchmark name."""
    if not pool:
        folder = os.path.join(out, "data", "pool")
        data_prep("synthetic", "--out_dir", folder, "--name", POOL_NAME, "--count", str(scale.pool_count), "--size",
                  str(scale.img_size), "--nearest_size", str(scale.img_size), "--seed", "1", "--lesion_fraction",
                  str(scale.lesion_fraction), "--cues", cues, "--no_progress")
        pool = os.path.join(folder, POOL_NAME)
    if not labelled:
        if benchmark != DATASET:
            raise ConfigError(f"--benchmark {benchmark} needs --labelled ROOT (the synthetic set is {DATASET})")
        labelled = os.path.join(out, "data", "labelled")
        data_prep("mock", "--out_dir", labelled, "--patients", str(scale.patients), "--size", str(scale.img_size),
                  "--seed", "2", "--cues", cues)
    return {"pool": pool, "labelled": labelled, "benchmark": benchmark}


def describe_data(data: dict[str, str], folds: list) -> dict[str, Any]:
    """What the report says about the data: every pool folder with its records, the benchmark and its folds."""
    from usf_mae_jax.data import benchmarks, folders

    pool = []
    for folder in folders.dataset_folders(data["pool"], "--pool"):
        with open(os.path.join(folder, folders.MANIFEST_NAME)) as f:
            manifest = json.load(f)
        pool.append({"folder": os.path.abspath(folder), "dataset": manifest.get("dataset"),
                     "records": manifest.get("counts", {}).get("train", manifest.get("total"))})
    version_dir = benchmarks.find_version_dir(data["labelled"], data["benchmark"])
    return {"pool": pool, "pool_records": sum(p["records"] or 0 for p in pool),
            "benchmark": data["benchmark"], "labelled": os.path.abspath(version_dir),
            "class_names": benchmarks.class_names(version_dir, data["benchmark"]), "folds": folds}


def benchmark_folds(data: dict[str, str], count: int) -> list:
    """The first `count` folds of the labelled benchmark, in its own numbering (BUS-BRA 1..5, MMOTU-2D 0, ...)."""
    from usf_mae_jax.data import benchmarks

    version_dir = benchmarks.find_version_dir(data["labelled"], data["benchmark"])
    with open(os.path.join(version_dir, "splits.json")) as f:
        names = sorted(json.load(f)["folds"], key=lambda name: (len(name), name))
    if count > len(names):
        raise ConfigError(f"--folds {count}: {data['benchmark']} under {data['labelled']} has {len(names)} folds "
                          f"({', '.join(names)})")
    return [int(name) if name.isdigit() else name for name in names[:count]]


# --------------------------------------------------------------------------------------------- configs


def _set_model(model_block: Any, scale: Scale) -> None:
    model_block.update(img_size=scale.img_size, **{"dtype": "float32", **scale.model})


def pretrain_config(base: Any, scale: Scale, arm: str, data: dict[str, str], folds: list[int],
                    seed: int = 0) -> Any:
    """The pretraining config of an arm: `base` (configs/pretrain.py) at the scale's size, with its options."""
    options = parse_arm(arm)
    config = base.copy_and_resolve_references()
    with config.unlocked():
        config.seed = seed
        _set_model(config.model, scale)
        config.model.norm_pix_loss = "normpix" in options
        config.model.fov_masking = "fov" in options
        config.input.update(source="shards", data_dir=data["pool"], augment="usf_mae_us" if "usaug" in options
                            else "usf_mae", num_threads=1)
        for field in ("total_epochs", "warmup_epochs", "warmup_steps", "eval_epochs"):
            config[field] = None
        config.total_steps = scale.pretrain_steps
        config.warmup_fraction = 0.1
        config.eval_steps = max(1, scale.pretrain_steps // scale.probe_evals)
        config.batch_size = scale.pretrain_batch
        config.optimizer.lr = scale.pretrain_lr
        config.log_steps = max(1, min(50, scale.pretrain_steps // 10))
        config.ckpt_steps = scale.pretrain_steps
        config.vis_steps = scale.pretrain_steps
        config.evals.update(sets=",".join(f"{data['benchmark']}:{k}" for k in folds), data_dir=data["labelled"],
                            fit_split="train", score_split="test", pool="mean")
    return config


def downstream_config(base: Any, scale: Scale, data: dict[str, str], init: str | None, mode: str,
                      budget: float) -> Any:
    """A fine-tune (`mode` full) or linear-probe config (configs/finetune.py) of one sweep."""
    config = base.copy_and_resolve_references()
    linear = mode == "linear"
    with config.unlocked():
        config.task = "linear_probe" if linear else "finetune"
        _set_model(config.model, scale)
        # Mean-pooled patch tokens for both (the probes' feature too): the MAE's cls token gets no training signal
        # of its own, so the reference's cls linear probe measures little here (docs/transfer_study.md).
        config.model.global_pool = True
        config.model.drop_path = 0.0 if linear else 0.1
        config.input.data_dir = data["labelled"]
        config.input.num_threads = 1
        config.init = init
        config.label_fraction = float(budget)
        for field in ("total_epochs", "warmup_epochs", "eval_epochs", "total_steps", "warmup_steps", "eval_steps"):
            config[field] = None
        if linear:
            config.update(total_epochs=float(scale.linear_epochs), warmup_epochs=scale.linear_epochs / 9,
                          eval_epochs=max(1.0, scale.linear_epochs / 9))
            config.batch_size = scale.linear_batch
        else:
            epochs = float(scale.finetune_epochs["full" if budget >= 1 else "low"])
            config.update(total_epochs=epochs, warmup_fraction=0.1, eval_epochs=max(1.0, epochs / 5))
            config.batch_size = scale.finetune_batch
            config.optimizer.lr = scale.finetune_lr
        config.eval_batch_size = 128
        config.log_steps, config.ckpt_steps = 10, 10_000
    return config


# ---------------------------------------------------------------------------------------------- stages


def pretrain(config: Any, workdir: str) -> float:
    """Runs (or resumes) one pretraining; returns its wall seconds (0 when it had already finished)."""
    from usf_mae_jax.trainers import loop, registry

    if os.path.isfile(os.path.join(workdir, "history.json")):
        log.info("study: pretraining in %s already finished", workdir)
        return 0.0
    started = time.perf_counter()
    loop.run(config, workdir, registry.create(config))
    return time.perf_counter() - started


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def scale_with(scale: Scale, overrides: str) -> Scale:
    """`scale` with 'field=value,...' replaced (numbers only), e.g. 'pretrain_steps=1000,patients=300'."""
    fields = dataclasses.asdict(scale)
    changes = {}
    for item in filter(None, (t.strip() for t in overrides.split(","))):
        name, _, value = item.partition("=")
        if name not in fields or not isinstance(fields[name], int | float) or isinstance(fields[name], bool):
            numeric = [k for k, v in fields.items() if isinstance(v, int | float)]
            raise ConfigError(f"--scale_override {item!r}: the field must be one of {', '.join(numeric)}")
        try:
            changes[name] = type(fields[name])(value)
        except ValueError:
            raise ConfigError(f"--scale_override {item!r}: {value!r} is not a number") from None
    return dataclasses.replace(scale, **changes)


def run_study(out: str, scale_name: str, pretrain_base: Any, finetune_base: Any, num_folds: int,
              seeds: list[int], arms: list[str], budgets: list[float], cues: str | None = None,
              scale_override: str = "", ablation_budgets: list[float] | None = None, pretrain_seed: int = 0,
              pool: str = "", labelled: str = "") -> dict:
    """Every stage of the study (module docstring), skipping finished ones; returns the report's payload.

    The benchmark is `finetune_base.dataset` (the preset of configs/finetune.py); the first `num_folds` of its
    folds are used. `pool` / `labelled` replace the synthetic data (`build_data`).
    """
    from usf_mae_jax.study import report
    from usf_mae_jax.trainers import crossval

    if scale_name not in SCALES:
        raise ConfigError(f"--scale must be one of {', '.join(SCALES)}, got {scale_name!r}")
    if not arms or arms[0] != "plain":
        raise ConfigError("--arms must start with 'plain', the recipe every option is measured against")
    for arm in arms:
        parse_arm(arm)
    if not budgets or any(not 0 < b <= 1 for b in budgets):
        raise ConfigError(f"--budgets must be fractions in (0, 1], got {budgets}")
    ablation_budgets = ablation_budgets or [min(budgets)]
    if not set(ablation_budgets) <= set(budgets):
        raise ConfigError(f"--ablation_budgets {ablation_budgets} must be among --budgets {budgets}")
    scale = scale_with(SCALES[scale_name], scale_override)
    cues = scale.cues if cues is None else cues
    if not jax.config.jax_compilation_cache_dir:  # the many same-shaped downstream runs compile once
        jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.abspath(out), "jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    started, load_start = time.perf_counter(), load_average()
    timing: dict[str, float] = {}
    data = build_data(out, scale, cues, pool, labelled, str(finetune_base.dataset))
    folds = benchmark_folds(data, num_folds)
    timing["data_s"] = time.perf_counter() - started
    runs = []
    inits = {"scratch": None}
    for arm in arms:
        workdir = os.path.join(out, "pretrain", arm)
        config = pretrain_config(pretrain_base, scale, arm, data, folds, pretrain_seed)
        timing[f"pretrain_{arm}_s"] = pretrain(config, workdir)
        inits[arm] = workdir
    for init_name, init in inits.items():
        stage = time.perf_counter()
        for mode in ("full", "linear"):
            for budget in budgets if init_name in ("scratch", "plain") else ablation_budgets:
                config = downstream_config(finetune_base, scale, data, init, mode, budget)
                target = os.path.join(out, "runs", init_name, f"{mode}_{budget_name(budget)}")
                for run in crossval.sweep(config, target, folds, seeds)["runs"]:
                    runs.append({"init": init_name, "mode": mode, "budget": budget, "fold": run["fold"],
                                 "seed": run["seed"], **{k: run[k] for k in ("f1_macro", "accuracy", "auc")}})
        timing[f"downstream_{init_name}_s"] = time.perf_counter() - stage
    timing["wall_s"] = time.perf_counter() - started
    settings = {"scale": scale_name, **dataclasses.asdict(scale), "cues": cues, "folds": folds, "seeds": seeds,
                "data": describe_data(data, folds), "synthetic_pool": not pool, "synthetic_labelled": not labelled,
                "arms": arms, "budgets": budgets, "ablation_budgets": ablation_budgets, "pretrain_seed": pretrain_seed,
                "load_average_start": load_start, "load_average_end": load_average(), "cpu_count": os.cpu_count()}
    probes_by_arm = {arm: report.read_probe_curve(os.path.join(out, "pretrain", arm)) for arm in arms}
    return report.write(out, settings, timing, runs, probes_by_arm)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from usf_mae_jax import cli
    from usf_mae_jax.trainers.crossval import parse_int_list

    parser = argparse.ArgumentParser(prog="python -m usf_mae_jax.study.lift", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="study folder (data, workdirs, lift.md/json/png)")
    parser.add_argument("--scale", default="small", help=f"one of {', '.join(SCALES)}")
    parser.add_argument("--folds", type=int, default=5, help="the first N of the benchmark's folds")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated downstream seeds")
    parser.add_argument("--arms", default="plain", help="comma-separated: plain first, then options or a+b")
    parser.add_argument("--budgets", default="0.05,1.0", help="comma-separated label fractions")
    parser.add_argument("--ablation_budgets", default="",
                        help="label fractions the option arms run at (default: the smallest of --budgets)")
    parser.add_argument("--cues", default=None, help="lesion cue strengths (default: the scale's)")
    parser.add_argument("--pretrain_seed", type=int, default=0,
                        help="seed of every pretraining (model init, masks, data order); downstream seeds: --seeds")
    parser.add_argument("--scale_override", default="", help="numeric Scale fields, e.g. pretrain_steps=1000")
    parser.add_argument("--pool", default="", help="real unlabelled data: data_prep shard folders or roots, "
                        "comma-separated (default: a synthetic pool)")
    parser.add_argument("--labelled", default="", help="real labelled data: the --out_dir of `python -m data_prep "
                        "BENCHMARK` (default: a synthetic BUS-BRA-layout set)")
    parser.add_argument("--benchmark", default=DATASET, help="the labelled set's configs/finetune.py preset "
                        "argument: busbra | busi | busi,classes=binary | mmotu | gist514 | labelled")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)

    def work() -> int:
        if args.folds < 1:
            raise ConfigError(f"--folds must be at least 1, got {args.folds}")
        try:
            budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
            ablation_budgets = [float(b) for b in args.ablation_budgets.split(",") if b.strip()] or None
        except ValueError:
            raise ConfigError("--budgets and --ablation_budgets must be comma-separated fractions") from None
        pretrain_base, finetune_base = load_config("configs/pretrain.py", "demo"), load_config(
            "configs/finetune.py", args.benchmark)
        payload = run_study(args.out, args.scale, pretrain_base, finetune_base, args.folds,
                            parse_int_list(args.seeds, "seeds"), [a.strip() for a in args.arms.split(",")],
                            budgets, args.cues, args.scale_override, ablation_budgets, args.pretrain_seed,
                            pool=args.pool, labelled=args.labelled)
        print(payload["markdown"])
        return 0

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return cli.run_cli(work, "python -m usf_mae_jax.study.lift", args.verbose)


def load_config(path: str, arg: str) -> Any:
    """`get_config(arg)` of a config file given by path, as launch.py and crossval read them (the library
    never imports `configs`); run from the repository root, whose `configs` package the file imports."""
    import importlib.util

    if not os.path.isfile(path):
        raise ConfigError(f"{path} not found: run the study from the repository root")
    spec = importlib.util.spec_from_file_location(f"_study_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


if __name__ == "__main__":
    sys.exit(main())
