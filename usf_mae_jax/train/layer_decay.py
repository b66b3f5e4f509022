"""Layer-wise learning-rate decay and the fine-tune weight-decay mask, as pure functions over a params dict.

Both reproduce the reference MAE fine-tune recipe (`param_groups_lrd` / `get_layer_id_for_vit` in
facebookresearch/mae, described in `shared/reference/mae_fidelity.md`):

  * layer id 0: `cls_token`, `pos_embed` and everything under `patch_embed`;
  * layer id k + 1: everything under `blocks_{k}`;
  * layer id `num_layers = depth + 1`: everything else (`norm`, `fc_norm`, `head`, a probe head);
  * scale = decay ** (num_layers - layer_id), so the head trains at the full rate and the patch embedding at
    decay ** (depth + 1).

The scale multiplies the whole update of a parameter, which in the reference means both its learning rate and
its decoupled weight decay (the torch AdamW of a group applies `lr * weight_decay`).

The weight-decay mask excludes 1-D parameters (biases, LayerNorm scales), every `bias`, and the `pos_embed`
and `cls_token` of the reference's `no_weight_decay()` list; 1-D-ness is what the reference tests, the names
cover the tokens, whose arrays are 2-D or 3-D.

`params` is a nested dict of arrays as `nnx.to_pure_dict(nnx.state(model, nnx.Param))` returns it; each
function returns a dict of the same structure, ready for optax's `masked` / `multi_transform` or for
`scale_by_tree` below.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

NO_DECAY_NAMES = ("pos_embed", "cls_token", "bias")


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _path_names(path) -> tuple[str, ...]:
    return tuple(_key_name(k) for k in path)


def layer_id(path: tuple[str, ...], depth: int) -> int:
    """The reference layer id of a parameter given its path of names, e.g. ("blocks_3", "attn", "qkv")."""
    top = path[0]
    if top in ("cls_token", "pos_embed", "patch_embed"):
        return 0
    if top.startswith("blocks_"):
        index = int(top.split("_", 1)[1])
        if not 0 <= index < depth:
            raise ValueError(f"parameter {'/'.join(path)} names block {index}, "
                             f"but the model has depth {depth}")
        return index + 1
    return depth + 1


def layer_ids(params: Mapping, depth: int) -> dict:
    """The layer id of every parameter, in the structure of `params`."""
    return jax.tree_util.tree_map_with_path(lambda path, _: layer_id(_path_names(path), depth), params)


def lr_scales(params: Mapping, depth: int, decay: float) -> dict:
    """The layer-wise lr-decay multiplier of every parameter: decay ** (depth + 1 - layer_id)."""
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"layer decay must lie in (0, 1], got {decay}")
    num_layers = depth + 1
    return jax.tree.map(lambda lid: float(decay ** (num_layers - lid)), layer_ids(params, depth))


def weight_decay_mask(params: Mapping) -> dict:
    """True where the fine-tune AdamW decays a parameter; False for 1-D, bias, pos_embed, cls_token."""
    def decayed(path, value) -> bool:
        names = _path_names(path)
        return bool(np.ndim(value) > 1 and not any(name in NO_DECAY_NAMES for name in names))
    return jax.tree_util.tree_map_with_path(decayed, params)


def scale_by_tree(scales: Mapping) -> optax.GradientTransformation:
    """Multiplies each update by its fixed per-parameter scale (e.g. `lr_scales`).

    Chained after AdamW (`optax.chain(optax.adamw(...), scale_by_tree(scales))`) it scales the learning rate
    and the decoupled weight decay together, as the reference's per-group `lr_scale` does.
    """
    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        scaled = jax.tree.map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales)
        return scaled, state

    return optax.GradientTransformation(init_fn, update_fn)
