"""The ViT classifier for fine-tuning, and the linear-probe head, with the reference parameter names.

Fine-tune model (the reference `models_vit.VisionTransformer` of facebookresearch/mae, described in
docs/mae_fidelity.md):

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

from usf_mae_jax.core import trees
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

    def _input_tokens(self, images: jax.Array) -> jax.Array:
        """The cls token and the patch tokens, with their positions: the first block's input."""
        self._check_images(images)
        dtype = self.config.compute_dtype
        table = self.pos_embed[...].astype(dtype)
        tokens = self.patch_embed(images) + table[1:]
        cls = jnp.broadcast_to((self.cls_token[...][0] + self.pos_embed[...][:1]).astype(dtype),
                               (tokens.shape[0], 1, tokens.shape[-1]))
        return jnp.concatenate([cls, tokens], axis=1)

    def forward_features(self, images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """(N, D) float32 features: pooled patch tokens after `fc_norm`, or the cls token after `norm`."""
        x = self.run_blocks(self.encoder_blocks(), self._input_tokens(images), rng)
        if self.global_pool:
            return self.fc_norm(x[:, 1:].mean(axis=1)).astype(jnp.float32)
        return self.norm(x)[:, 0].astype(jnp.float32)

    def block_average_features(self, images: jax.Array) -> jax.Array:
        """(N, D): every block's mean patch token averaged over the blocks (vit `block_average`), no head."""
        return self.block_average(self._input_tokens(images))

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


def encoder_weights(model: ViTClassifier, params: Mapping, source_img_size: int | None = None
                    ) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
    """Pretrained encoder weights for `model` by '/'-path, from an MAE or classifier params pure-dict.

    Taken: `patch_embed`, `cls_token`, `blocks_{i}`, and `norm` for a cls-pooled model. As the reference
    fine-tune does for global pooling, `norm` is then dropped and `fc_norm` and `head` stay freshly
    initialised; decoder weights are ignored. The position table comes from `params['pos_embed']` when the
    source has a learned one, else from the fixed sin-cos table of the source grid; either way it is resized
    bicubically to the model's grid. Shapes must agree; anything else is a ValueError naming the parameter.

    Returns (weights, report) with report {"loaded", "fresh", "ignored"} as '/'-joined paths, for the log.
    """
    config = model.config
    source = trees.flatten(params)
    target = trees.flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    encoder_tops = {"patch_embed", "cls_token", *(f"blocks_{i}" for i in range(config.depth))}
    if not model.global_pool:
        encoder_tops.add("norm")
    weights, fresh = {}, []
    for name, value in target.items():
        top = name.split("/", 1)[0]
        if top == "pos_embed":
            continue
        if top in encoder_tops:
            if name not in source:
                raise ValueError(f"pretrained params lack {name}, needed by the classifier")
            array = np.asarray(source[name], np.float32)
            if array.shape != tuple(value.shape):
                raise ValueError(f"pretrained {name} has shape {array.shape}, the classifier expects "
                                 f"{tuple(value.shape)}")
            weights[name] = array
        else:
            fresh.append(name)
    if "pos_embed" in source:
        table = np.asarray(source["pos_embed"], np.float32).reshape(-1, config.width)
    else:
        grid = (source_img_size or config.img_size) // config.patch_size
        table = pos_embed.sincos_2d(config.width, grid)
    weights["pos_embed"] = np.asarray(pos_embed.resize_patch_table(table, (config.grid, config.grid)), np.float32)
    ignored = sorted(n for n in source if n.split("/", 1)[0] not in encoder_tops and n != "pos_embed")
    return weights, {"loaded": sorted(weights), "fresh": sorted(fresh), "ignored": ignored}


def load_encoder_params(model: ViTClassifier, params: Mapping, source_img_size: int | None = None
                        ) -> dict[str, list[str]]:
    """Copies `encoder_weights(model, params, source_img_size)` into `model`, in place; returns the report."""
    weights, report = encoder_weights(model, params, source_img_size)
    state = nnx.state(model, nnx.Param)
    current = trees.flatten(nnx.to_pure_dict(state))
    current.update({name: jnp.asarray(value) for name, value in weights.items()})
    nnx.replace_by_pure_dict(state, trees.unflatten(current))
    nnx.update(model, state)
    return report
