"""Entry point: `python launch.py --config=configs/pretrain.py:demo --workdir=runs/demo`.

Kept thin on purpose (flax examples, big_vision): parse the config, initialise the distributed runtime when
the environment is multi-process, log the topology once, and hand over to the library by `config.mode`.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from usf_mae_jax import host_memory

config_flags.DEFINE_config_file("config", "configs/pretrain.py", "Config file, optionally :preset,args.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, logs and images go (default: runs/<mode>_<preset>).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for explicit multi-process runs.")
flags.DEFINE_integer("num_processes", None, "Number of processes, for explicit multi-process runs.")
flags.DEFINE_integer("process_id", None, "This process's index, for explicit multi-process runs.")
flags.DEFINE_bool("print_sharding", False, "Print the sharding of every parameter and exit.")
FLAGS = flags.FLAGS


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with config mistakes reported as one clear line instead of a traceback."""
    try:
        return FLAGS(argv)
    except (AttributeError, KeyError, ValueError, TypeError) as err:
        bad = [a for a in argv[1:] if a.startswith("--config.")]
        sys.exit(f"launch.py: bad config override ({err}) in {' '.join(bad) or 'the --config argument'}. "
                 f"Overrides must name existing fields, e.g. --config.batch_size=32.")
    except flags.Error as err:
        sys.exit(f"launch.py: {err}")


def main(argv: list[str]) -> None:
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from usf_mae_jax import distributed

    how = distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    import jax

    config = FLAGS.config
    workdir = FLAGS.workdir or os.path.join("runs", f"{config.mode}_{config.get('preset', 'custom')}")
    if jax.process_index() == 0:
        logging.info("distributed: %s; %s", how, distributed.describe())
        logging.info("%s", host_memory.status())
    if config.mode == "pretrain":
        from usf_mae_jax.train import pretrain

        if FLAGS.print_sharding:
            print("\n".join(pretrain.sharding_report(config)))
            return
        try:
            summary = pretrain.train(config, workdir)
        except (ValueError, FileNotFoundError) as err:  # configuration problems, raised before any compile
            sys.exit(f"launch.py: {err}")
        logging.info("pretraining %s at step %d; workdir %s", summary["status"], summary["final_step"], workdir)
    elif config.mode == "finetune":
        from usf_mae_jax.train import finetune

        try:
            finetune.run(config, workdir)
        except (ValueError, FileNotFoundError) as err:
            sys.exit(f"launch.py: {err}")
    else:
        sys.exit(f"launch.py: unknown config.mode {config.mode!r}")


if __name__ == "__main__":
    host_memory.reexec_with_huge_page_malloc()  # XLA:CPU scratch memory without per-step page faults
    app.run(main, flags_parser=parse_flags)
