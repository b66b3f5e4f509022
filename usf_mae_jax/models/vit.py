"""ViT building blocks in Flax NNX, numerically equal to the reference MAE / timm ViT.

Parameter paths mirror the reference PyTorch keys (docs/mae_fidelity.md), so that converting a
checkpoint is a table of transposes:

    patch_embed/proj/{kernel (p, p, C, D), bias}
    cls_token (1, 1, D)
    blocks_{i}/norm1, blocks_{i}/attn/qkv, blocks_{i}/attn/proj, blocks_{i}/norm2,
    blocks_{i}/mlp/fc1, blocks_{i}/mlp/fc2

Reference choices reproduced here, each a place where earlier ports went wrong:
  * pre-norm blocks, fused qkv with bias, attention scale `head_dim ** -0.5`;
  * exact (erf) GELU, not the tanh approximation that `nnx.gelu` defaults to;
  * LayerNorm eps 1e-6;
  * xavier-uniform Linear weights with zero bias, xavier over the *fused* qkv matrix;
  * the patch-embed kernel initialised as xavier over the weight viewed as [D, C*p*p] (Flax's conv xavier
    would count fan_out as D*p*p, a ~130x smaller variance for B/16);
  * tokens initialised normal(std 0.02).

Params are float32; `dtype` is the compute dtype (bf16 on accelerators). LayerNorm reductions and the
attention softmax run in float32 whatever the compute dtype.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from usf_mae_jax.models import attention as kernels

LN_EPS = 1e-6
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Encoder width/depth/heads, then decoder width/depth/heads, and the patch size. Sources: the reference
# factories `mae_vit_{base,large,huge}_patch*_dec512d8b` (facebookresearch/mae models_mae.py); `tiny`,
# `small` follow timm's ViT-Ti/S widths; `mu` is a test-only size (big_vision's "mu").
SIZES: dict[str, dict[str, int]] = {
    "mu": dict(width=32, depth=1, heads=2, decoder_width=32, decoder_depth=1, decoder_heads=2, patch_size=16),
    "tiny": dict(width=192, depth=12, heads=3, decoder_width=128, decoder_depth=2, decoder_heads=4,
                 patch_size=16),
    "small": dict(width=384, depth=12, heads=6, decoder_width=256, decoder_depth=4, decoder_heads=8,
                  patch_size=16),
    "base": dict(width=768, depth=12, heads=12, decoder_width=512, decoder_depth=8, decoder_heads=16,
                 patch_size=16),
    "large": dict(width=1024, depth=24, heads=16, decoder_width=512, decoder_depth=8, decoder_heads=16,
                  patch_size=16),
    "huge": dict(width=1280, depth=32, heads=16, decoder_width=512, decoder_depth=8, decoder_heads=16,
                 patch_size=14),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything that fixes the shape and the numerics of a ViT / MAE."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    decoder_width: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    norm_pix_loss: bool = False
    dtype: str = "float32"
    attention: str = "auto"  # auto | custom | xla | cudnn (models/attention.py)

    def __post_init__(self):
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}")
        for width, heads, what in ((self.width, self.heads, "encoder"),
                                   (self.decoder_width, self.decoder_heads, "decoder")):
            if width % heads:
                raise ValueError(f"{what} width {width} is not divisible by its {heads} heads")
            if width % 4:
                raise ValueError(f"{what} width {width} must be divisible by 4 for the 2-D sin-cos table")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.attention not in kernels.IMPLEMENTATIONS:
            raise ValueError(f"attention must be one of {kernels.IMPLEMENTATIONS}, got {self.attention!r}")

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def compute_dtype(self) -> Any:
        return jnp.dtype(self.dtype)


def model_config(variant: str = "base", **overrides) -> ModelConfig:
    """Builds a ModelConfig from a size preset, with any field overridden (e.g. depth=2, img_size=64)."""
    if variant not in SIZES:
        raise ValueError(f"unknown model variant {variant!r}; choose one of {sorted(SIZES)}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown model field(s) {unknown}; valid fields are {sorted(fields)}")
    return ModelConfig(**{**SIZES[variant], **overrides})


def config_from_block(model_block: Any) -> ModelConfig:
    """ModelConfig from a config's `model` block: the variant's sizes, overridden by every field that is set
    (a ConfigDict or any mapping; fields that are None keep the variant's value)."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    overrides = {k: model_block[k] for k in fields if k in model_block and model_block[k] is not None}
    return model_config(model_block["variant"], **overrides)


def xavier_uniform():
    """torch.nn.init.xavier_uniform_ on a Linear weight (fan_in = in, fan_out = out)."""
    return nnx.initializers.xavier_uniform()


def patch_kernel_init():
    """xavier_uniform over the conv weight viewed as [D, C*p*p]: fan_in = C*p*p, fan_out = D."""
    return nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=3)


def token_init():
    """torch.nn.init.normal_(std=0.02), as the reference uses for cls_token and mask_token."""
    return nnx.initializers.normal(stddev=0.02)


def dense(in_features: int, out_features: int, dtype, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(in_features, out_features, kernel_init=xavier_uniform(),
                      bias_init=nnx.initializers.zeros_init(), dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def layer_norm(width: int, dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(width, epsilon=LN_EPS, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def channel_stats(in_chans: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel normalisation mean and std: ImageNet's for 3 channels, their averages for any other count."""
    if in_chans == 3:
        return np.asarray(IMAGENET_MEAN, np.float32), np.asarray(IMAGENET_STD, np.float32)
    return (np.full(in_chans, np.mean(IMAGENET_MEAN), np.float32),
            np.full(in_chans, np.mean(IMAGENET_STD), np.float32))


def normalize_images(images: jax.Array, in_chans: int = 3) -> jax.Array:
    """uint8 (or [0, 1] float) NHWC images -> ImageNet-normalised float32, channels replicated if needed.

    Runs on the device inside the jitted step, so the host ships uint8 and a grayscale image crosses the bus
    once, not three times (docs/design.md, "Batches").
    """
    x = images.astype(jnp.float32)
    if images.dtype == jnp.uint8:
        x = x / 255.0
    if x.shape[-1] == 1 and in_chans == 3:
        x = jnp.repeat(x, 3, axis=-1)
    if x.shape[-1] != in_chans:
        raise ValueError(f"images have {x.shape[-1]} channels but the model expects {in_chans}")
    mean, std = channel_stats(in_chans)
    return (x - mean) / std


def normalized_patches(images: jax.Array, patch_size: int, in_chans: int = 3) -> jax.Array:
    """`patchify(normalize_images(images, in_chans), patch_size)`, computed patch-first.

    The same values (up to one float32 rounding step): normalisation is per channel and patchify only moves
    pixels, so the uint8 image is rearranged first and each (row, col, channel) patch entry is then normalised
    with its channel's mean and std. On XLA:CPU this halves the cost of the pair (9.8 against 18.5 ms for 32
    images of 224 px), because the fused byte gather of the other order does not vectorise.
    """
    patches = patchify(images, patch_size)
    channels = images.shape[-1]
    if channels == 1 and in_chans == 3:
        patches = patches.reshape(*patches.shape[:-1], -1, 1)
        patches = jnp.broadcast_to(patches, (*patches.shape[:-1], 3)).reshape(*patches.shape[:-2], -1)
    elif channels != in_chans:
        raise ValueError(f"images have {channels} channels but the model expects {in_chans}")
    x = patches.astype(jnp.float32)
    if images.dtype == jnp.uint8:
        x = x / 255.0
    mean, std = channel_stats(in_chans)
    pixels_per_patch = patch_size * patch_size
    return (x - np.tile(mean, pixels_per_patch)) / np.tile(std, pixels_per_patch)


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
    """(N, H, W, C) -> (N, h*w, p*p*C), patch vectors ordered (row-in-patch, col-in-patch, channel)."""
    n, h, w, c = images.shape
    p = patch_size
    x = images.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(patches: jax.Array, patch_size: int, channels: int) -> jax.Array:
    """Exact inverse of `patchify` for a square patch grid."""
    n, length, _ = patches.shape
    side = int(round(length**0.5))
    if side * side != length:
        raise ValueError(f"{length} patches do not form a square grid")
    p = patch_size
    x = patches.reshape(n, side, side, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, side * p, side * p, channels)


class PatchProjection(nnx.Module):
    """The conv weight and bias of the reference `patch_embed.proj`, in Flax's (p, p, C, D) kernel layout."""

    def __init__(self, patch_size: int, in_chans: int, width: int, rngs: nnx.Rngs):
        shape = (patch_size, patch_size, in_chans, width)
        self.kernel = nnx.Param(patch_kernel_init()(rngs.params(), shape, jnp.float32))
        self.bias = nnx.Param(jnp.zeros((width,), jnp.float32))


class PatchEmbed(nnx.Module):
    """Stride-p, kernel-p conv as one matmul over patchified pixels.

    The kernel keeps the conv layout (p, p, C, D) so that `torch_weight.transpose(2, 3, 1, 0)` loads it, and is
    applied as a (p*p*C, D) matrix to the (row, col, channel) patch vectors, which is the same function.
    """

    def __init__(self, patch_size: int, in_chans: int, width: int, dtype, rngs: nnx.Rngs):
        self.patch_size = patch_size
        self.dtype = dtype
        self.proj = PatchProjection(patch_size, in_chans, width, rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.embed_patches(patchify(images, self.patch_size))

    def embed_patches(self, patches: jax.Array) -> jax.Array:
        """(N, L, p*p*C) patch vectors, ordered as `patchify` orders them, -> (N, L, D) tokens."""
        kernel = self.proj.kernel[...]
        tokens = patches.astype(self.dtype) @ kernel.reshape(-1, kernel.shape[-1]).astype(self.dtype)
        return tokens + self.proj.bias[...].astype(self.dtype)


class Attention(nnx.Module):
    """Multi-head self-attention with a fused qkv projection (timm `Attention`).

    `implementation` names the kernel (models/attention.py); 'auto' is resolved when the model is traced, from
    the platform it runs on, the compute dtype and the head dim.
    """

    def __init__(self, width: int, heads: int, dtype, rngs: nnx.Rngs, implementation: str = "auto"):
        self.heads = heads
        self.implementation = implementation
        self.qkv = dense(width, 3 * width, dtype, rngs)
        self.proj = dense(width, width, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, length, width = x.shape
        head_dim = width // self.heads
        # qkv rows are [q | k | v], each head-major: reshape (B, N, 3, H, hd) as the reference does.
        qkv = tokens_2d(self.qkv, x).reshape(batch, length, 3, self.heads, head_dim)
        kernel = kernels.resolve(self.implementation, qkv.dtype, head_dim)
        return tokens_2d(self.proj, kernels.multi_head_attention(qkv, kernel))


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, written as torch writes it: x * 0.5 * (1 + erf(x / sqrt(2))).

    Same function as `jax.nn.gelu(approximate=False)`, which goes through erfc and costs about twice as much
    on the CPU.
    """
    return x * 0.5 * (1.0 + jax.lax.erf(x * np.asarray(1.0 / np.sqrt(2.0), x.dtype)))


def tokens_2d(layer: nnx.Module, x: jax.Array) -> jax.Array:
    """Applies a Linear to (..., D) tokens as one (rows, D) matmul.

    The same function; flattening first lets XLA's CPU backend emit plain 2-D GEMMs for the weight gradient
    instead of batched contractions with extra transposes.
    """
    return layer(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)


class Mlp(nnx.Module):
    def __init__(self, width: int, hidden: int, dtype, rngs: nnx.Rngs):
        self.fc1 = dense(width, hidden, dtype, rngs)
        self.fc2 = dense(hidden, width, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return tokens_2d(self.fc2, gelu(tokens_2d(self.fc1, x)))


def drop_path(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """Stochastic depth per sample (timm `drop_path`): zero a residual branch, rescale survivors."""
    if rate == 0.0 or rng is None:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


class Block(nnx.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, dtype, rngs: nnx.Rngs,
                 attention: str = "auto", drop_path_rate: float = 0.0):
        self.drop_path_rate = drop_path_rate
        self.norm1 = layer_norm(width, dtype, rngs)
        self.attn = Attention(width, heads, dtype, rngs, attention)
        self.norm2 = layer_norm(width, dtype, rngs)
        self.mlp = Mlp(width, int(width * mlp_ratio), dtype, rngs)

    def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        rngs = (None, None) if rng is None else tuple(jax.random.split(rng))
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path_rate, rngs[0])
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, rngs[1])


class ViTEncoderBase(nnx.Module):
    """Patch embedding, cls token and encoder blocks, shared by the MAE and the classifier.

    Subclasses add their own final norm and heads at the top level, so that every model keeps the reference
    key layout without an `encoder/` prefix.
    """

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs, drop_path_rate: float = 0.0):
        self.config = config
        dtype = config.compute_dtype
        self.patch_embed = PatchEmbed(config.patch_size, config.in_chans, config.width, dtype, rngs)
        self.cls_token = nnx.Param(token_init()(rngs.params(), (1, 1, config.width), jnp.float32))
        # Linearly increasing stochastic-depth rates, as timm's VisionTransformer assigns them.
        rates = np.linspace(0.0, drop_path_rate, config.depth) if config.depth else []
        for i in range(config.depth):
            setattr(self, f"blocks_{i}", Block(config.width, config.heads, config.mlp_ratio, dtype, rngs,
                                               config.attention, float(rates[i])))

    def _check_images(self, images: jax.Array) -> None:
        c = self.config
        expected = (c.img_size, c.img_size, c.in_chans)
        if tuple(images.shape[1:]) != expected:
            raise ValueError(f"images must have shape (N, {c.img_size}, {c.img_size}, {c.in_chans}), "
                             f"got {tuple(images.shape)}")

    def encoder_blocks(self) -> list[Block]:
        return [getattr(self, f"blocks_{i}") for i in range(self.config.depth)]

    def run_blocks(self, blocks: list[Block], x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        keys = [None] * len(blocks) if rng is None else list(jax.random.split(rng, len(blocks)))
        for block, key in zip(blocks, keys):
            x = block(x, key)
        return x

    def block_average(self, x: jax.Array) -> jax.Array:
        """(N, D) float32: the mean patch token (cls excluded) of every block's output, averaged over the blocks.

        A probe feature for MAE encoders, whose last block specialises in reconstructing pixels: on real
        ultrasound its intermediate blocks probe better than the final, normed tokens (docs/real_data.md).
        `x` is the token sequence entering the first block, cls first.
        """
        total = jnp.zeros((x.shape[0], x.shape[-1]), jnp.float32)
        for block in self.encoder_blocks():
            x = block(x)
            total = total + x[:, 1:].mean(axis=1).astype(jnp.float32)
        return total / max(self.config.depth, 1)
