"""Optimizers as optax chains: the per-step schedule, weight-decay masks, layer-wise lr decay, AdamW and LARS.

Reference behaviour reproduced (docs/usf_mae_recipe.md, docs/mae_fidelity.md):
  * the schedule is evaluated per step: linear warmup from 0, then a half-cycle cosine down to `min_lr`
    (facebookresearch/mae `util/lr_sched.py`, epochs expressed as fractional steps);
  * AdamW with decoupled weight decay scaled by the lr, as torch.optim.AdamW (optax.adamw computes the same
    update, bias correction and eps placement included);
  * weight-decay masks, one function with three rules:
      `reference` (MAE pretraining): no decay on 1-D params and biases; the cls and mask tokens are 3-D and
                  so are decayed (timm `param_groups_weight_decay`);
      `all`       (USF-MAE pretraining): every parameter is decayed;
      `finetune`  (MAE fine-tuning): `reference` plus no decay on `pos_embed` and `cls_token` (the
                  reference model's `no_weight_decay()` list);
  * layer-wise lr decay of the MAE fine-tune (`util/lr_decay.py`): layer id 0 for `cls_token`, `pos_embed`
    and `patch_embed`, k + 1 for `blocks_{k}`, depth + 1 for everything else (norms, heads); the scale
    `decay ** (depth + 1 - layer_id)` multiplies a parameter's whole update, i.e. its lr and its decoupled
    weight decay together, as the reference's per-group `lr_scale` does;
  * LARS of the MAE linear probe (`util/lars.py`): momentum 0.9, trust coefficient 0.001, weight decay and
    the trust ratio only on parameters with more than one dimension. optax applies the lr before the
    momentum trace while the reference applies it after; the two agree whenever the lr is constant.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from usf_mae_jax.cli import ConfigError
from usf_mae_jax.core import trees

WD_RULES = ("reference", "all", "finetune")
FINETUNE_NO_DECAY = ("pos_embed", "cls_token")


def warmup_cosine(peak_lr: float, total_steps: int, warmup_steps: int, min_lr: float = 0.0) -> optax.Schedule:
    """Linear warmup 0 -> peak over `warmup_steps`, then half-cycle cosine peak -> min_lr at `total_steps`."""
    if total_steps <= 0:
        raise ConfigError(f"total_steps must be positive, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ConfigError(f"warmup_steps {warmup_steps} must lie in [0, total_steps={total_steps}]")
    decay_steps = max(total_steps - warmup_steps, 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak_lr * step / max(warmup_steps, 1)
        progress = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
        cosine = min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
        return jnp.where(step < warmup_steps, warm, cosine)

    return schedule


def _ndim(value: Any) -> int:
    return len(value.shape) if hasattr(value, "shape") else int(np.ndim(value))


def weight_decay_mask(params: Any, rule: str) -> Any:
    """A tree of booleans in the structure of `params`: True where weight decay applies (module docstring)."""
    if rule not in WD_RULES:
        raise ConfigError(f"unknown weight-decay rule {rule!r}; choose one of {', '.join(WD_RULES)}")

    def decayed(name: str, value: Any) -> bool:
        if rule == "all":
            return True
        parts = name.split("/")
        if _ndim(value) <= 1 or parts[-1] == "bias":
            return False
        return not (rule == "finetune" and any(p in FINETUNE_NO_DECAY for p in parts))

    return trees.map_with_names(decayed, params)


def layer_id(name: str, depth: int) -> int:
    """The reference layer id of a parameter from its '/'-path, e.g. "blocks_3/attn/qkv/kernel" -> 4."""
    top = name.split("/", 1)[0]
    if top in ("cls_token", "pos_embed", "patch_embed"):
        return 0
    if top.startswith("blocks_"):
        index = int(top.split("_", 1)[1])
        if not 0 <= index < depth:
            raise ConfigError(f"parameter {name} names block {index}, but the model has depth {depth}")
        return index + 1
    return depth + 1


def layer_ids(params: Mapping, depth: int) -> Any:
    return trees.map_with_names(lambda name, _: layer_id(name, depth), params)


def layer_decay_scales(params: Mapping, depth: int, decay: float) -> Any:
    """The layer-wise lr-decay multiplier of every parameter: decay ** (depth + 1 - layer_id)."""
    if not 0.0 < decay <= 1.0:
        raise ConfigError(f"optimizer.layer_decay must lie in (0, 1], got {decay}")
    return jax.tree.map(lambda lid: float(decay ** (depth + 1 - lid)), layer_ids(params, depth))


def scale_by_tree(scales: Any) -> optax.GradientTransformation:
    """Multiplies each update by its fixed per-parameter scale (chained after AdamW: lr and decay together)."""

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales), state

    return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(opt_cfg: Any, schedule: Callable, params: Any, *, layer_scales: Any | None = None,
                   grad_accum_steps: int = 1) -> optax.GradientTransformation:
    """The optimizer named by `opt_cfg.name`, for `params` (concrete or ShapeDtypeStructs; only the tree).

    adamw: [clip by global norm] -> AdamW(schedule, mask from `opt_cfg.wd_mask`) -> [layer-decay scales]
    lars:  LARS(schedule) with decay and trust ratio on matrices only
    Either is wrapped in optax.MultiSteps when `grad_accum_steps > 1`.
    """
    name = opt_cfg.get("name", "adamw")
    if name == "adamw":
        parts = []
        if opt_cfg.clip_grad_norm and opt_cfg.clip_grad_norm > 0:
            parts.append(optax.clip_by_global_norm(opt_cfg.clip_grad_norm))
        parts.append(optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                                 weight_decay=opt_cfg.weight_decay,
                                 mask=weight_decay_mask(params, opt_cfg.wd_mask)))
        if layer_scales is not None:
            parts.append(scale_by_tree(layer_scales))
        tx = optax.chain(*parts) if len(parts) > 1 else parts[0]
    elif name == "lars":
        matrices = jax.tree.map(lambda p: _ndim(p) > 1, params)
        tx = optax.lars(schedule, weight_decay=float(opt_cfg.weight_decay), weight_decay_mask=matrices,
                        trust_coefficient=float(opt_cfg.trust_coefficient), eps=0.0, trust_ratio_mask=matrices,
                        momentum=float(opt_cfg.momentum))
    else:
        raise ConfigError(f"unknown optimizer.name {name!r}; choose adamw or lars")
    if grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=grad_accum_steps)
    return tx
