"""The ViT segmenter: the MAE encoder with a UperNet head (the MAE paper's protocol) or a linear head.

The MAE paper evaluates semantic segmentation with UperNet on ViT features, following BEiT's code
(docs/segmentation.md, "Model"). Reimplemented here from that description and mmsegmentation's documented
`UPerHead` (read, not copied):

    patch_embed, cls_token, pos_embed (1 + L, D) learned, blocks_{i}       the encoder, as `ViTClassifier`
    out_indices: four evenly spaced blocks, depth//3 - 1, depth//2 - 1, 2*depth//3 - 1, depth - 1
                 (3, 5, 7, 11 for ViT-B; 7, 11, 15, 23 for ViT-L), their patch tokens as (N, g, g, D) maps
    neck/fpn1    ConvTranspose 2x2 s2 -> BatchNorm -> GELU -> ConvTranspose 2x2 s2   x4  (stride p/4)
    neck/fpn2    ConvTranspose 2x2 s2                                                 x2  (stride p/2)
                 (the third map as it is, the fourth max-pooled 2x2)                  x1, x1/2
    decode_head  PPM on the coarsest map (adaptive average pools 1, 2, 3, 6 -> 1x1 ConvModule -> bilinear up,
                 concatenated with it -> 3x3 `bottleneck`), 1x1 `lateral_{i}` on the others, a top-down path
                 adding each upsampled coarser map, 3x3 `fpn_{i}`, everything upsampled to the finest map and
                 concatenated -> 3x3 `fpn_bottleneck` -> dropout 0.1 -> 1x1 `conv_seg`
    ConvModule   conv without bias -> BatchNorm (eps 1e-5, PyTorch momentum 0.1) -> ReLU; kaiming-normal
                 (fan out) convs, `conv_seg` normal(std 0.01) with a zero bias, as mmsegmentation initialises

The `linear` head is the probe-like baseline: the final `norm` of the last block's patch tokens and a 1x1
projection (`head`), i.e. logits at the patch grid. Either head returns logits at its own resolution (stride
p/4 for UperNet, p for linear); callers upsample them bilinearly (half-pixel centres, torch's
`align_corners=False`), to the input size for the loss and to each mask's own size for scoring.

BatchNorm statistics are `nnx.BatchStat`s: the segmentation task carries them as the step's `extra` state.
Over a sharded global batch inside `jit` the batch statistics are global, i.e. SyncBN. BEiT's auxiliary FCN
head is not used. Dropout and drop path run only when an `rng` is passed (training).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from usf_mae_jax.models import classifier, vit
from usf_mae_jax.models.vit import ModelConfig

HEADS = ("upernet", "linear")
POOL_SCALES = (1, 2, 3, 6)  # the PPM's adaptive pools (PSPNet, mmsegmentation's UPerHead default)
BN_EPS, BN_MOMENTUM = 1e-5, 0.9  # torch BatchNorm2d defaults; Flax momentum 0.9 = PyTorch 0.1
HEAD_DROPOUT = 0.1
SEG_INIT_STD = 0.01


def out_indices(depth: int) -> tuple[int, int, int, int]:
    """The four evenly spaced blocks whose outputs feed UperNet: (3, 5, 7, 11) at depth 12 (module doc)."""
    return tuple(max(0, i) for i in (depth // 3 - 1, depth // 2 - 1, 2 * depth // 3 - 1, depth - 1))


def resize_bilinear(x: jax.Array, height: int, width: int) -> jax.Array:
    """NHWC bilinear resize with half-pixel centres and clamped borders (torch's align_corners=False)."""
    if x.shape[1:3] == (height, width):
        return x
    return jax.image.resize(x, (x.shape[0], height, width, x.shape[3]), "bilinear", antialias=False)


@functools.lru_cache(maxsize=64)
def _pool_matrix(size: int, bins: int) -> np.ndarray:
    """(bins, size) averaging weights of torch's AdaptiveAvgPool: bin i spans [floor(i*n/b), ceil((i+1)*n/b))."""
    weights = np.zeros((bins, size), np.float32)
    for i in range(bins):
        start, stop = (i * size) // bins, -(-((i + 1) * size) // bins)
        weights[i, start:stop] = 1.0 / (stop - start)
    return weights


def adaptive_avg_pool(x: jax.Array, bins: int) -> jax.Array:
    """NHWC adaptive average pooling to (bins, bins), exact for any input size (overlapping bins included)."""
    rows, cols = _pool_matrix(x.shape[1], bins), _pool_matrix(x.shape[2], bins)
    return jnp.einsum("ih,jw,nhwc->nijc", rows.astype(x.dtype), cols.astype(x.dtype), x)


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """Inverted dropout (torch's Dropout2d is not used by UPerHead: its dropout is element-wise)."""
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def batch_norm(features: int, dtype, rngs: nnx.Rngs) -> nnx.BatchNorm:
    return nnx.BatchNorm(features, momentum=BN_MOMENTUM, epsilon=BN_EPS, dtype=dtype, param_dtype=jnp.float32,
                         rngs=rngs)


class ConvModule(nnx.Module):
    """conv (no bias, 'same' padding) -> BatchNorm -> ReLU, mmsegmentation's ConvModule with BN."""

    def __init__(self, in_features: int, out_features: int, kernel: int, dtype, rngs: nnx.Rngs):
        self.conv = nnx.Conv(in_features, out_features, (kernel, kernel), padding="SAME", use_bias=False,
                             kernel_init=nnx.initializers.variance_scaling(2.0, "fan_out", "normal"), dtype=dtype,
                             param_dtype=jnp.float32, rngs=rngs)
        self.bn = batch_norm(out_features, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.bn(self.conv(x)))


class Deconv2x2(nnx.Module):
    """ConvTranspose with kernel 2, stride 2 (torch's ConvTranspose2d(k=2, s=2)), written as one matmul.

    Each input pixel becomes a 2x2 block: out[n, 2i + a, 2j + b] = x[n, i, j] @ kernel[a, b] + bias. The same
    function as `lax.conv_transpose`, whose lowering on XLA:CPU ran the two deconvolutions of `fpn1` about
    ten times slower than this matmul (docs/segmentation.md, "Measured").
    """

    def __init__(self, width: int, dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.kernel = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (2, 2, width, width), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((width,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        n, h, w, c = x.shape
        kernel = self.kernel[...].astype(self.dtype)
        blocks = x.astype(self.dtype).reshape(-1, c) @ kernel.transpose(2, 0, 1, 3).reshape(c, -1)
        out = blocks.reshape(n, h, w, 2, 2, -1).transpose(0, 1, 3, 2, 4, 5).reshape(n, 2 * h, 2 * w, -1)
        return out + self.bias[...].astype(self.dtype)


class Fpn1(nnx.Module):
    """x4: ConvTranspose -> BatchNorm -> GELU -> ConvTranspose (BEiT's `fpn1`)."""

    def __init__(self, width: int, dtype, rngs: nnx.Rngs):
        self.deconv_0 = Deconv2x2(width, dtype, rngs)
        self.bn = batch_norm(width, dtype, rngs)
        self.deconv_1 = Deconv2x2(width, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.deconv_1(vit.gelu(self.bn(self.deconv_0(x))))


class Fpn2(nnx.Module):
    """x2: one ConvTranspose (BEiT's `fpn2`)."""

    def __init__(self, width: int, dtype, rngs: nnx.Rngs):
        self.deconv = Deconv2x2(width, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.deconv(x)


class Neck(nnx.Module):
    """Four same-width maps at strides p/4, p/2, p, 2p from four block outputs at stride p."""

    def __init__(self, width: int, dtype, rngs: nnx.Rngs):
        self.fpn1 = Fpn1(width, dtype, rngs)
        self.fpn2 = Fpn2(width, dtype, rngs)

    def __call__(self, maps: list[jax.Array]) -> list[jax.Array]:
        pooled = nnx.max_pool(maps[3], (2, 2), strides=(2, 2), padding="VALID")
        return [self.fpn1(maps[0]), self.fpn2(maps[1]), maps[2], pooled]


class UperHead(nnx.Module):
    """PPM + FPN fusion of four maps into `num_classes` logits at the finest map's resolution (module doc)."""

    def __init__(self, in_features: int, channels: int, num_classes: int, dtype, rngs: nnx.Rngs,
                 pool_scales: tuple[int, ...] = POOL_SCALES):
        self.pool_scales = tuple(pool_scales)
        for i in range(len(self.pool_scales)):
            setattr(self, f"psp_{i}", ConvModule(in_features, channels, 1, dtype, rngs))
        self.bottleneck = ConvModule(in_features + len(self.pool_scales) * channels, channels, 3, dtype, rngs)
        for i in range(3):
            setattr(self, f"lateral_{i}", ConvModule(in_features, channels, 1, dtype, rngs))
            setattr(self, f"fpn_{i}", ConvModule(channels, channels, 3, dtype, rngs))
        self.fpn_bottleneck = ConvModule(4 * channels, channels, 3, dtype, rngs)
        self.conv_seg = nnx.Conv(channels, num_classes, (1, 1), kernel_init=nnx.initializers.normal(SEG_INIT_STD),
                                 bias_init=nnx.initializers.zeros_init(), dtype=dtype, param_dtype=jnp.float32,
                                 rngs=rngs)

    def pyramid_pooling(self, x: jax.Array) -> jax.Array:
        height, width = x.shape[1:3]
        pooled = [resize_bilinear(getattr(self, f"psp_{i}")(adaptive_avg_pool(x, s)), height, width)
                  for i, s in enumerate(self.pool_scales)]
        return self.bottleneck(jnp.concatenate([x, *pooled], axis=-1))

    def __call__(self, maps: list[jax.Array], rng: jax.Array | None = None) -> jax.Array:
        laterals = [getattr(self, f"lateral_{i}")(maps[i]) for i in range(3)] + [self.pyramid_pooling(maps[3])]
        for i in range(3, 0, -1):  # top-down: each map plus its upsampled coarser neighbour (cumulative)
            laterals[i - 1] = laterals[i - 1] + resize_bilinear(laterals[i], *laterals[i - 1].shape[1:3])
        outs = [getattr(self, f"fpn_{i}")(laterals[i]) for i in range(3)] + [laterals[3]]
        height, width = outs[0].shape[1:3]
        fused = self.fpn_bottleneck(jnp.concatenate([resize_bilinear(o, height, width) for o in outs], axis=-1))
        return self.conv_seg(dropout(fused, HEAD_DROPOUT, rng))


class ViTSegmenter(vit.ViTEncoderBase):
    """ViT encoder with a learned position table and a `upernet` or `linear` segmentation head."""

    def __init__(self, config: ModelConfig, num_classes: int, rngs: nnx.Rngs, *, head: str = "upernet",
                 channels: int = 0, drop_path_rate: float = 0.0, source_grid: int | None = None):
        if head not in HEADS:
            raise ValueError(f"unknown segmentation head {head!r}; choose one of {HEADS}")
        if num_classes < 2:
            raise ValueError(f"segmentation needs at least 2 classes (background included), got {num_classes}")
        super().__init__(config, rngs, drop_path_rate)
        dtype = config.compute_dtype
        self.head_kind, self.num_classes = head, num_classes
        # `classifier.encoder_weights` loads the pretrained final `norm` exactly when global_pool is False:
        # the linear head reads normed tokens as a cls-pooled classifier does; UperNet reads raw block outputs.
        self.global_pool = head != "linear"
        self.indices = out_indices(config.depth)
        self.pos_embed = nnx.Param(jnp.asarray(classifier.position_table(config, source_grid)))
        if head == "upernet":
            self.neck = Neck(config.width, dtype, rngs)
            self.decode_head = UperHead(config.width, channels or config.width, num_classes, dtype, rngs)
        else:
            self.norm = vit.layer_norm(config.width, dtype, rngs)
            self.head = nnx.Linear(config.width, num_classes, kernel_init=classifier.trunc_normal(SEG_INIT_STD),
                                   bias_init=nnx.initializers.zeros_init(), dtype=dtype, param_dtype=jnp.float32,
                                   rngs=rngs)

    def block_maps(self, images: jax.Array, rng: jax.Array | None = None) -> list[jax.Array]:
        """The patch tokens after each of `self.indices` (or the last block alone for the linear head) as
        (N, g, g, D) maps."""
        self._check_images(images)
        dtype, grid = self.config.compute_dtype, self.config.grid
        table = self.pos_embed[...].astype(dtype)
        tokens = self.patch_embed(images) + table[1:]
        cls = jnp.broadcast_to((self.cls_token[...][0] + self.pos_embed[...][:1]).astype(dtype),
                               (tokens.shape[0], 1, tokens.shape[-1]))
        x = jnp.concatenate([cls, tokens], axis=1)
        blocks = self.encoder_blocks()
        keys = [None] * len(blocks) if rng is None else list(jax.random.split(rng, len(blocks)))
        wanted = self.indices if self.head_kind == "upernet" else (len(blocks) - 1,)
        maps = {}
        for i, (block, key) in enumerate(zip(blocks, keys)):
            x = block(x, key)
            if i in wanted:
                maps[i] = x[:, 1:].reshape(x.shape[0], grid, grid, x.shape[-1])
        return [maps[i] for i in wanted]

    def __call__(self, images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """(N, H/stride, W/stride, num_classes) float32 logits; `rng` enables drop path and dropout."""
        encoder_rng, head_rng = (None, None) if rng is None else tuple(jax.random.split(rng))
        maps = self.block_maps(images, encoder_rng)
        if self.head_kind == "linear":
            return vit.tokens_2d(self.head, self.norm(maps[0])).astype(jnp.float32)
        return self.decode_head(self.neck(maps), head_rng).astype(jnp.float32)
