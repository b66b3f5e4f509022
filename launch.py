"""Entry point of every training run: `python launch.py --config=CONFIG[:PRESET,args] --workdir=DIR`.

Kept thin on purpose (flax examples, big_vision): parse the config, initialise the distributed runtime when
the environment is multi-process, log the topology once, and hand the config to the one training loop with
the task that `config.task` names (usf_mae_jax/trainers/registry.py).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from usf_mae_jax import cli, host_memory

CONFIG_FILES = ("configs/pretrain.py", "configs/finetune.py", "configs/segment.py")


def usage() -> str:
    """The --help text: the command, every config with its presets and preset arguments, and how to look."""
    lines = [__doc__.split("\n\n")[0], "",
             "Configs and presets (CONFIG:PRESET,key=value,...; fields: --config.FIELD=VALUE):"]
    for path in CONFIG_FILES:
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        lines.append(f"  {path}  (preset arguments: {module.ARGUMENTS})")
        lines += [f"      :{name:<10} {text}" for name, text in module.PRESETS.items()]
    lines += ["", "Print every field of a config with its resolved value (and exit):",
              "  python launch.py --config=configs/pretrain.py:usf_mae --print_config",
              "Examples:",
              "  python launch.py --config=configs/pretrain.py:demo --workdir=runs/demo",
              "  python launch.py --config=configs/finetune.py:busbra,fold=1 --workdir=runs/busbra_f1 "
              "--config.input.data_dir=BENCH --config.init=runs/demo", ""]
    return "\n".join(lines)


__doc__ = usage()  # absl prints the main module's docstring with --help

config_flags.DEFINE_config_file("config", "configs/pretrain.py", "Config file, optionally :preset,args.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, logs and images go (default: runs/<task>_<preset>).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for explicit multi-process runs.")
flags.DEFINE_integer("num_processes", None, "Number of processes, for explicit multi-process runs.")
flags.DEFINE_integer("process_id", None, "This process's index, for explicit multi-process runs.")
flags.DEFINE_bool("print_sharding", False, "Print the sharding of every parameter and exit.")
flags.DEFINE_bool("print_config", False, "Print the resolved config as JSON and exit.")
cli.define_verbose_flag()
FLAGS = flags.FLAGS


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with config mistakes reported as one clear line instead of a traceback."""
    try:
        return FLAGS(argv)
    except (AttributeError, KeyError, ValueError, TypeError) as err:
        if cli.verbose_requested(argv):
            raise
        bad = [a for a in argv[1:] if a.startswith("--config.")]
        where = " ".join(bad) if bad else "the --config argument"
        sys.exit(f"launch.py: bad config ({cli.one_line(str(err))}) in {where}; overrides must name existing "
                 "fields (see --print_config), e.g. --config.batch_size=32")
    except flags.Error as err:
        sys.exit(f"launch.py: {cli.one_line(str(err))}")


def overridden_fields(prefix: str = "config.") -> list[str]:
    """The config fields given on the command line (`--config.x.y=...` -> "x.y")."""
    return [name[len(prefix):] for name in FLAGS if name.startswith(prefix) and FLAGS[name].present]


def run() -> int:
    from usf_mae_jax.core import steps

    config = FLAGS.config
    steps.prefer_overrides(config, overridden_fields())
    if FLAGS.print_config:
        print(json.dumps(json.loads(config.to_json_best_effort()), indent=2, sort_keys=True))
        return 0
    from usf_mae_jax import distributed

    how = distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    import jax

    from usf_mae_jax import accelerators
    from usf_mae_jax.trainers import loop, registry

    cache = accelerators.enable_compilation_cache()  # docs/accelerators.md
    workdir = FLAGS.workdir or os.path.join("runs", f"{config.task}_{config.get('preset', 'custom')}")
    if jax.process_index() == 0:
        logging.info("distributed: %s; %s", how, distributed.describe())
        logging.info("%s; compilation cache: %s; step compile options: %s", host_memory.status(), cache,
                     accelerators.compiler_options(jax.devices()[0].platform, jax.device_count()))
    task = registry.create(config)
    if FLAGS.print_sharding:
        print("\n".join(loop.sharding_report(config, task)))
        return 0
    summary = loop.run(config, workdir, task)
    logging.info("%s %s at step %d; workdir %s", config.task, summary["status"], summary["final_step"], workdir)
    return 0


def main(argv: list[str]) -> None:
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    sys.exit(cli.run_cli(run, "launch.py", FLAGS.verbose))


if __name__ == "__main__":
    host_memory.reexec_with_huge_page_malloc()  # XLA:CPU scratch memory without per-step page faults
    app.run(main, flags_parser=parse_flags)
