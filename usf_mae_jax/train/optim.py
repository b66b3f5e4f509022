"""Optimizers, per-step learning-rate schedules and weight-decay masks, as optax chains.

Reference behaviour reproduced:
  * `lr = blr * effective_batch / denominator` (facebookresearch/mae main_pretrain.py uses 256; the USF-MAE
    notebook effectively uses 128 at batch 64);
  * the schedule is evaluated per step: linear warmup from 0, then a half-cycle cosine down to `min_lr`
    (mae `util/lr_sched.adjust_learning_rate`, with epochs expressed as fractional steps);
  * AdamW with decoupled weight decay scaled by the lr, as torch.optim.AdamW (optax.adamw computes the same
    update, bias correction and eps placement included);
  * weight-decay masks: `reference` skips 1-D params and biases (timm `param_groups_weight_decay`, used by
    MAE pretraining; the cls and mask tokens are 3-D and so are decayed), `all` decays everything (USF-MAE).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax


def peak_learning_rate(opt_cfg: Any, effective_batch: int) -> float:
    if opt_cfg.get("lr") is not None:
        return float(opt_cfg.lr)
    return float(opt_cfg.blr) * effective_batch / float(opt_cfg.lr_batch_denominator)


def warmup_cosine(peak_lr: float, total_steps: int, warmup_steps: int, min_lr: float = 0.0) -> optax.Schedule:
    """Linear warmup 0 -> peak over `warmup_steps`, then half-cycle cosine peak -> min_lr at `total_steps`."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps {warmup_steps} must lie in [0, total_steps={total_steps}]")
    decay_steps = max(total_steps - warmup_steps, 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak_lr * step / max(warmup_steps, 1)
        progress = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
        cosine = min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
        return jnp.where(step < warmup_steps, warm, cosine)

    return schedule


def _leaf_name(path) -> str:
    last = path[-1]
    return str(getattr(last, "key", getattr(last, "name", last)))


def weight_decay_mask(params: Any, rule: str) -> Any:
    """A tree of booleans: True where weight decay applies."""
    if rule == "all":
        return jax.tree.map(lambda _: True, params)
    if rule == "reference":
        return jax.tree_util.tree_map_with_path(
            lambda path, p: len(p.shape) > 1 and _leaf_name(path) != "bias", params)
    raise ValueError(f"unknown weight-decay mask {rule!r}; choose 'reference' or 'all'")


def make_optimizer(opt_cfg: Any, schedule: Callable, params: Any, grad_accum_steps: int = 1,
                   ) -> optax.GradientTransformation:
    """clip (optional) -> AdamW(schedule, mask) -> MultiSteps accumulation (when grad_accum_steps > 1).

    `params` may be abstract (ShapeDtypeStructs); it only fixes the mask's tree.
    """
    parts = []
    if opt_cfg.clip_grad_norm and opt_cfg.clip_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(opt_cfg.clip_grad_norm))
    parts.append(optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                             weight_decay=opt_cfg.weight_decay,
                             mask=weight_decay_mask(params, opt_cfg.wd_mask)))
    tx = optax.chain(*parts) if len(parts) > 1 else parts[0]
    if grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=grad_accum_steps)
    return tx
