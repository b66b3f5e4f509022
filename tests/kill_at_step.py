"""Runs `launch.py` and kills the process with SIGKILL right after training step K, as `kill -9` would.

    python tests/kill_at_step.py K --config=... --workdir=...

The kill comes from inside, after the task's step hook, so it lands at a known step (possibly while an
asynchronous checkpoint is being written), independent of how fast the machine is.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from usf_mae_jax.trainers import registry  # noqa: E402

KILL_AT = int(sys.argv.pop(1))
_create = registry.create


def create_and_arm(config):
    task = _create(config)
    after_step = task.after_step

    def after_step_then_kill(step, *args):
        after_step(step, *args)
        if step == KILL_AT:
            os.kill(os.getpid(), signal.SIGKILL)

    task.after_step = after_step_then_kill
    return task


registry.create = create_and_arm
sys.argv[0] = os.path.join(ROOT, "launch.py")
runpy.run_path(sys.argv[0], run_name="__main__")
