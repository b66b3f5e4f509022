"""The ViT classifier for fine-tuning, and the linear-probe head, with the reference parameter names.

Fine-tune model (the reference `models_vit.VisionTransformer` of facebookresearch/mae, described in
`shared/reference/mae_fidelity.md`):

    patch_embed, cls_token, pos_embed (1 + L, D) learned, blocks_{i}, then
      global_pool=True  (reference default): mean of the patch tokens -> fc_norm -> head
      global_pool=False:                     norm -> cls token        -> head

  * `pos_embed` is a parameter, initialised from the fixed sin-cos table. When the initialising checkpoint
    was trained at another image size, its table is resized to the new patch grid by bicubic interpolation of
    the patch rows (`pos_embed.resize_patch_table`), as the reference `interpolate_pos_embed` does.
  * `head` is a Linear initialised with trunc_normal(std 2e-5) and a zero bias.
  * Drop path follows the blocks' linearly increasing `drop_path_rate`; pass `rng` to turn it on.

Linear probe (reference `main_linprobe.py`): the frozen encoder's cls feature after `norm` (a
`ViTClassifier(global_pool=False)`'s `forward_features`), computed once and cached, then `LinearProbeHead`:
BatchNorm without affine (eps 1e-6, momentum 0.9 in Flax = 0.1 in PyTorch) -> Linear (trunc_normal std
0.01). Its attributes `head_0` / `head_1` mirror the reference keys `head.0` / `head.1`.

Inputs are network inputs: ImageNet-normalised float NHWC images (`vit.normalize_images`).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from usf_mae_jax.models import pos_embed, vit
from usf_mae_jax.models.vit import ModelConfig

HEAD_INIT_STD = 2e-5  # reference main_finetune.py: trunc_normal_(model.head.weight, std=2e-5)
PROBE_INIT_STD = 0.01  # reference main_linprobe.py: trunc_normal_(model.head.weight, std=0.01)
BN_EPS = 1e-6  # reference main_linprobe.py: BatchNorm1d(affine=False, eps=1e-6)
BN_MOMENTUM = 0.9  # PyTorch's default momentum 0.1 is Flax's 0.9 (Flax weights the running average)


def trunc_normal(std: float):
    """torch's trunc_normal_(std) with its default cut at +-2 (absolute, not in units of std)."""
    return nnx.initializers.truncated_normal(stddev=std, lower=-2.0, upper=2.0)


def position_table(config: ModelConfig, source_grid: int | None = None) -> np.ndarray:
    """The (1 + L, D) initial position table for `config`.

    Without `source_grid` it is the fixed sin-cos table of the model's grid; with it, the table of the
    pretraining grid resized bicubically to the model's grid, as a checkpoint trained at that size carries it.
    """
    grid = source_grid or config.grid
    table = pos_embed.sincos_2d(config.width, grid)
    return np.array(pos_embed.resize_patch_table(table, (config.grid, config.grid)), np.float32)


class ViTClassifier(vit.ViTEncoderBase):
    """ViT with a learned position table, a pooled (`fc_norm`) or cls (`norm`) feature, and a Linear head."""

    def __init__(self, config: ModelConfig, num_classes: int, rngs: nnx.Rngs, *, global_pool: bool = True,
                 drop_path_rate: float = 0.0, source_grid: int | None = None):
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        super().__init__(config, rngs, drop_path_rate)
        dtype = config.compute_dtype
        self.global_pool = global_pool
        self.num_classes = num_classes
        self.pos_embed = nnx.Param(jnp.asarray(position_table(config, source_grid)))
        if global_pool:
            self.fc_norm = vit.layer_norm(config.width, dtype, rngs)
        else:
            self.norm = vit.layer_norm(config.width, dtype, rngs)
        self.head = nnx.Linear(config.width, num_classes, kernel_init=trunc_normal(HEAD_INIT_STD),
                               bias_init=nnx.initializers.zeros_init(), dtype=dtype,
                               param_dtype=jnp.float32, rngs=rngs)

    def forward_features(self, images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """(N, D) float32 features: pooled patch tokens after `fc_norm`, or the cls token after `norm`."""
        self._check_images(images)
        dtype = self.config.compute_dtype
        table = self.pos_embed[...].astype(dtype)
        tokens = self.patch_embed(images) + table[1:]
        cls = jnp.broadcast_to((self.cls_token[...][0] + self.pos_embed[...][:1]).astype(dtype),
                               (tokens.shape[0], 1, tokens.shape[-1]))
        x = self.run_blocks(self.encoder_blocks(), jnp.concatenate([cls, tokens], axis=1), rng)
        if self.global_pool:
            return self.fc_norm(x[:, 1:].mean(axis=1)).astype(jnp.float32)
        return self.norm(x)[:, 0].astype(jnp.float32)

    def __call__(self, images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """(N, num_classes) float32 logits; `rng` enables drop path (training), None disables it."""
        return self.head(self.forward_features(images, rng)).astype(jnp.float32)


class LinearProbeHead(nnx.Module):
    """BatchNorm without affine, then Linear, on cached frozen-encoder features (reference linear probe)."""

    def __init__(self, width: int, num_classes: int, rngs: nnx.Rngs):
        self.head_0 = nnx.BatchNorm(width, use_scale=False, use_bias=False, epsilon=BN_EPS,
                                    momentum=BN_MOMENTUM, param_dtype=jnp.float32, rngs=rngs)
        self.head_1 = nnx.Linear(width, num_classes, kernel_init=trunc_normal(PROBE_INIT_STD),
                                 bias_init=nnx.initializers.zeros_init(), param_dtype=jnp.float32, rngs=rngs)

    def __call__(self, features: jax.Array) -> jax.Array:
        """Logits; batch statistics in `train()` mode, the running ones in `eval()` mode."""
        return self.head_1(self.head_0(features.astype(jnp.float32)))


def _flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], object]:
    flat = {}
    for key, value in tree.items():
        path = (*prefix, str(key))
        if isinstance(value, Mapping):
            flat.update(_flatten(value, path))
        else:
            flat[path] = value
    return flat


def load_encoder_params(model: ViTClassifier, params: Mapping, source_img_size: int | None = None
                        ) -> dict[str, list[str]]:
    """Copies pretrained encoder weights (an MAE or classifier params pure-dict) into `model`, in place.

    Copied: `patch_embed`, `cls_token`, `blocks_{i}`, and `norm` for a cls-pooled model. As the reference
    fine-tune does for global pooling, `norm` is then dropped and `fc_norm` and `head` stay freshly
    initialised; decoder weights are ignored. The position table comes from `params['pos_embed']` when the
    source has a learned one, else from the fixed sin-cos table of the source grid; either way it is resized
    bicubically to the model's grid. Shapes must agree; anything else is a ValueError naming the parameter.

    Returns {"loaded": [...], "fresh": [...], "ignored": [...]} as '/'-joined paths, for the run's log.
    """
    config = model.config
    source = _flatten(params)
    target_state = nnx.state(model, nnx.Param)
    target = _flatten(nnx.to_pure_dict(target_state))
    encoder_tops = {"patch_embed", "cls_token", *(f"blocks_{i}" for i in range(config.depth))}
    if not model.global_pool:
        encoder_tops.add("norm")
    loaded, fresh = {}, []
    for path, value in target.items():
        if path[0] == "pos_embed":
            continue
        if path[0] in encoder_tops:
            if path not in source:
                raise ValueError(f"pretrained params lack {'/'.join(path)}, needed by the classifier")
            array = np.asarray(source[path], np.float32)
            if array.shape != tuple(value.shape):
                raise ValueError(f"pretrained {'/'.join(path)} has shape {array.shape}, the classifier "
                                 f"expects {tuple(value.shape)}")
            loaded[path] = jnp.asarray(array)
        else:
            fresh.append("/".join(path))
    if ("pos_embed",) in source:
        table = np.asarray(source[("pos_embed",)], np.float32).reshape(-1, config.width)
    else:
        grid = (source_img_size or config.img_size) // config.patch_size
        table = pos_embed.sincos_2d(config.width, grid)
    loaded[("pos_embed",)] = jnp.asarray(pos_embed.resize_patch_table(table, (config.grid, config.grid)))
    new_state = dict(target)
    new_state.update(loaded)
    nested: dict = {}
    for path, value in new_state.items():
        node = nested
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    nnx.replace_by_pure_dict(target_state, nested)
    nnx.update(model, target_state)
    ignored = sorted("/".join(p) for p in source if p[0] not in encoder_tops and p[0] != "pos_embed")
    return {"loaded": sorted("/".join(p) for p in loaded), "fresh": sorted(fresh), "ignored": ignored}
