"""Unit-suffixed durations and the step plan of a run, resolved once, validated before anything compiles.

A config states durations with their unit (big_vision's convention, docs/design.md "Config"):

    total_steps | total_epochs                        how long to train (exactly one)
    warmup_steps | warmup_epochs | warmup_fraction    linear lr warmup (exactly one; fraction of the total)
    eval_steps | eval_epochs                          periodic evaluation (at most one; neither = no eval)
    log_steps, ckpt_steps                             in steps
    ckpt_minutes                                      a checkpoint at least this often (0: off)

Checkpoints come every `ckpt_steps`, but at least once per tenth of the run: a short run (a 150-step
fine-tune with the presets' ckpt_steps 200) would otherwise have none until it ends, and a kill would
restart it from step 0. `ckpt_minutes` adds a wall-clock bound, for runs whose steps are slow.

`plan(config, examples_per_epoch, ...)` turns them into a `StepPlan` of integer step counts, together with
the batch split and the peak learning rate `lr = blr * effective_batch / lr_batch_denominator` (an absolute
`optimizer.lr` wins). Every bad value is a one-line `ConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from usf_mae_jax.cli import ConfigError

UNITS = ("steps", "epochs", "fraction")


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """Integer step counts of a run. `*_steps` count batches; `*_updates` count optimizer updates."""

    examples_per_epoch: int
    batch_size: int
    grad_accum_steps: int
    steps_per_epoch: int
    total_steps: int
    total_updates: int
    warmup_updates: int
    log_every: int
    ckpt_every: int
    eval_every: int  # 0: no periodic evaluation
    peak_lr: float
    ckpt_minutes: float = 0.0  # a checkpoint at least this often, in minutes of wall time (0: off)

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.grad_accum_steps

    @property
    def epochs(self) -> float:
        return self.total_steps / self.steps_per_epoch

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "effective_batch": self.effective_batch, "epochs": self.epochs}


def _get(config: Any, field: str) -> Any:
    return config.get(field) if hasattr(config, "get") else getattr(config, field, None)


def resolve(config: Any, name: str, steps_per_epoch: int, total_steps: int | None = None,
            required: bool = True, units: tuple[str, ...] = UNITS) -> int | None:
    """`{name}_steps`, `{name}_epochs` or `{name}_fraction` (one of them) as a step count.

    Returns None when none is set and `required` is False. Negative values, fractions outside [0, 1] and two
    settings of the same duration are ConfigErrors.
    """
    given = [f"{name}_{unit}" for unit in units if _get(config, f"{name}_{unit}") is not None]
    choices = " / ".join(f"{name}_{unit}" for unit in units)
    if len(given) > 1:
        raise ConfigError(f"set only one of {choices}; got {', '.join(f'{g}={_get(config, g)}' for g in given)}")
    if not given:
        if required:
            raise ConfigError(f"set one of {choices}")
        return None
    field = given[0]
    value = _get(config, field)
    if value < 0:
        raise ConfigError(f"{field} must not be negative, got {value}")
    if field.endswith("_steps"):
        if int(value) != value:
            raise ConfigError(f"{field} must be a whole number of steps, got {value}")
        return int(value)
    if field.endswith("_epochs"):
        return int(round(value * steps_per_epoch))
    if value > 1:
        raise ConfigError(f"{field} is a fraction of the run and must lie in [0, 1], got {value}")
    if total_steps is None:
        raise ConfigError(f"{field} needs the total number of steps")
    return int(round(value * total_steps))


def prefer_overrides(config: Any, overridden: set[str] | list[str]) -> None:
    """A duration given on the command line replaces the preset's other units of the same duration.

    `overridden` names the config fields set on the command line (e.g. {"total_steps"}); for each duration
    with exactly one unit among them, the other units are cleared, so `--config.total_steps=500` works on a
    preset that counts in epochs. Two units of one duration on the command line stay a conflict (`resolve`).
    """
    overridden = set(overridden)
    for name in ("total", "warmup", "eval"):
        given = [unit for unit in UNITS if f"{name}_{unit}" in overridden]
        if len(given) != 1:
            continue
        with config.unlocked() if hasattr(config, "unlocked") else _nothing():
            for unit in UNITS:
                field = f"{name}_{unit}"
                if unit != given[0] and field in config:
                    config[field] = None


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def positive(config: Any, field: str) -> int:
    """An integer config field that must be >= 1, e.g. `batch_size` or `log_steps`."""
    value = _get(config, field)
    if value is None or int(value) != value or value < 1:
        raise ConfigError(f"{field} must be a positive integer, got {value!r}")
    return int(value)


def peak_learning_rate(opt_cfg: Any, effective_batch: int) -> float:
    """The absolute `optimizer.lr` when set, else `blr * effective_batch / lr_batch_denominator`."""
    if opt_cfg.get("lr") is not None:
        lr = float(opt_cfg.lr)
    else:
        if float(opt_cfg.lr_batch_denominator) <= 0:
            raise ConfigError(f"optimizer.lr_batch_denominator must be positive, got {opt_cfg.lr_batch_denominator}")
        lr = float(opt_cfg.blr) * effective_batch / float(opt_cfg.lr_batch_denominator)
    if lr < 0:
        raise ConfigError(f"the learning rate must not be negative, got {lr}")
    return lr


def _minutes(config: Any) -> float:
    minutes = _get(config, "ckpt_minutes")
    if minutes is None:
        return 0.0
    if isinstance(minutes, bool) or not isinstance(minutes, int | float) or minutes < 0:
        raise ConfigError(f"ckpt_minutes must be a non-negative number of minutes (0: off), got {minutes!r}")
    return float(minutes)


def plan(config: Any, examples_per_epoch: int, data_parallel: int = 1, process_count: int = 1) -> StepPlan:
    """The step plan of `config` for a training set of `examples_per_epoch` examples (module docstring).

    `data_parallel` is how many ways the mesh splits a batch; the global batch must divide evenly over it
    and over the processes.
    """
    batch = positive(config, "batch_size")
    accum = positive(config, "grad_accum_steps") if _get(config, "grad_accum_steps") is not None else 1
    if batch % data_parallel:
        raise ConfigError(f"global batch size {batch} is not divisible by the data-parallel size {data_parallel}")
    if batch % process_count:
        raise ConfigError(f"global batch size {batch} is not divisible by the {process_count} processes")
    if examples_per_epoch < 1:
        raise ConfigError("the training set is empty: there is nothing to train on")
    steps_per_epoch = max(examples_per_epoch // batch, 1)
    total = resolve(config, "total", steps_per_epoch, units=("steps", "epochs"))
    if total < 1:
        raise ConfigError(f"the run has {total} steps; total_steps / total_epochs must give at least one step")
    total -= total % accum
    if total < 1:
        raise ConfigError(f"the run is shorter than one optimizer update of grad_accum_steps={accum} batches")
    updates = total // accum
    warmup = resolve(config, "warmup", max(steps_per_epoch // accum, 1), updates)
    if warmup > updates:
        raise ConfigError(f"the warmup ({warmup} updates) is longer than the run ({updates} updates)")
    eval_every = resolve(config, "eval", steps_per_epoch, total, required=False, units=("steps", "epochs")) or 0
    return StepPlan(
        examples_per_epoch=int(examples_per_epoch), batch_size=batch, grad_accum_steps=accum,
        steps_per_epoch=steps_per_epoch, total_steps=total, total_updates=updates, warmup_updates=warmup,
        log_every=positive(config, "log_steps"), ckpt_every=min(positive(config, "ckpt_steps"), -(-total // 10)),
        eval_every=max(eval_every, 0),
        peak_lr=peak_learning_rate(config.optimizer, batch * accum), ckpt_minutes=_minutes(config))
