"""The contract between the training loop and a task (pretraining, fine-tuning, linear probing, ...).

The loop (`loop.py`) owns everything a run needs whatever it trains: the mesh, the step plan, the sharded
state, compilation, the non-finite guard, logging, checkpoints, resume, preemption, evaluation scheduling,
best-by-metric selection and `results.json` (docs/design.md). A task supplies only what differs:

    prepare(mesh, workdir)       read its data and its init (read-only)
    start(workdir)               write its audit files (after the loop checked the workdir is compatible)
    examples_per_epoch()         the training-set size, which turns epochs into steps
    create_variables()           fresh {"params": ..., "extra": ...} (traceable: run under jit on the mesh)
    initial_weights()            pretrained values to load over the fresh params, by '/'-path (or None)
    make_optimizer(...)          its optax chain
    loss_fn(...)                 the loss, per-step metrics and updated extra state of one batch
    batches(plan, mesh)          its training batches: an iterator with checkpointable state
    evaluate(...), test(...)     validation metrics (for selection), and the final test results
    after_step(...), write_outputs(...)   pictures and extra files

`extra` is non-trained state carried by the step (e.g. BatchNorm running statistics); it is {} for most tasks.
A new task is one module with a `Task` subclass plus its entry in `registry.py`; nothing else changes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import jax
import numpy as np
import optax
from jax.sharding import Mesh

from usf_mae_jax.core.steps import StepPlan


class BatchIterator(Protocol):
    """Global batches for the train step, resumable: `get_state()` describes exactly the batches handed out."""

    def __next__(self) -> dict[str, jax.Array]: ...

    def get_state(self) -> bytes: ...

    def set_state(self, state: bytes) -> None: ...

    def close(self) -> None: ...


Variables = dict[str, Any]  # {"params": pytree, "extra": pytree}


class Task:
    """Base class of every task; the defaults describe a task without evaluation or outputs."""

    name = "task"
    # The validation metric whose maximum selects the state that is tested and kept (None: the final state).
    select_metric: str | None = None
    # Whether the loop evaluates before the first step too (the baseline of an evaluation curve).
    evaluate_at_start = False

    def __init__(self, config: Any):
        self.config = config

    # ------------------------------------------------------------------------------------------- setup

    def prepare(self, mesh: Mesh, workdir: str) -> None:
        """Loads the task's data and init (reading only; `workdir` may be "" for a dry run)."""

    def start(self, workdir: str) -> None:
        """Writes the task's audit files into its workdir (process 0), once the loop accepted the workdir."""

    def examples_per_epoch(self) -> int:
        raise NotImplementedError

    def model_config(self) -> Any:
        """The resolved `vit.ModelConfig` recorded in config.json (so the workdir can serve as an init)."""
        return None

    def describe(self) -> dict[str, Any]:
        """Extra facts for config.json's `resolved_plan` (class counts, layer decay, ...)."""
        return {}

    def create_variables(self) -> Variables:
        raise NotImplementedError

    def initial_weights(self) -> Mapping[str, np.ndarray] | None:
        """Pretrained values by '/'-path, loaded over fresh params when a run starts (not when it resumes)."""
        return None

    def make_optimizer(self, schedule: optax.Schedule, params: Any, plan: StepPlan) -> optax.GradientTransformation:
        raise NotImplementedError

    # -------------------------------------------------------------------------------------------- step

    def loss_fn(self, params: Any, extra: Any, batch: dict[str, jax.Array], key: jax.Array
                ) -> tuple[jax.Array, tuple[dict[str, jax.Array], Any]]:
        """(scalar loss, (per-step metrics, new extra)); traced inside the jitted step."""
        raise NotImplementedError

    def batches(self, plan: StepPlan, mesh: Mesh) -> BatchIterator:
        raise NotImplementedError

    # -------------------------------------------------------------------------------- evaluation, outputs

    def evaluate(self, variables: Variables, step: int) -> dict[str, float]:
        """Validation metrics of the current variables; {} when the task does not evaluate."""
        return {}

    def test(self, variables: Variables) -> dict[str, Any] | None:
        """The final results (written to results.json by the loop), or None for tasks without a test."""
        return None

    def write_outputs(self, workdir: str, results: dict[str, Any]) -> None:
        """Files next to results.json (e.g. a confusion matrix picture), written by process 0."""

    def after_step(self, step: int, variables: Variables, batch: dict[str, jax.Array], writer: Any) -> None:
        """Called after every step with the new variables (e.g. to draw reconstructions every N steps)."""

    def close(self) -> None:
        """Releases host resources (thread pools)."""


TaskFactory = Callable[[Any], Task]
