"""Task names -> task classes. `config.task` names one; a new task adds one line here (and its config).

Modules are imported only when their task runs, so a task's dependencies never slow down another's start.
"""

from __future__ import annotations

import importlib
from typing import Any

from usf_mae_jax.cli import ConfigError
from usf_mae_jax.trainers.task import Task

TASKS = {
    "pretrain": "usf_mae_jax.trainers.pretrain:PretrainTask",
    "finetune": "usf_mae_jax.trainers.finetune:FinetuneTask",
    "linear_probe": "usf_mae_jax.trainers.linear_probe:LinearProbeTask",
    "segment": "usf_mae_jax.trainers.segment:SegmentTask",
}


def create(config: Any) -> Task:
    """The task object for `config.task`."""
    name = config.get("task")
    if name not in TASKS:
        raise ConfigError(f"unknown config.task {name!r}; choose one of {', '.join(TASKS)}")
    module, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(module), cls)(config)
