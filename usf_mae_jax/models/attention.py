"""Scaled dot-product attention kernels of the ViT, and which one runs on which platform.

Every kernel computes the reference's `softmax(q k^T * head_dim**-0.5) v` (timm `Attention`, docs/mae_fidelity.md
"Block"), with the softmax statistics in float32. They differ only in how XLA runs them:

  custom  `softmax_attention` below: plain matmuls with a hand-written VJP whose backward matmuls all multiply
          row-major operands. Measured on the CPU, where XLA's autodiff form is ~20% slower
          (docs/performance.md). It keeps the full (B, H, N, N) softmax weights as residuals.
  xla     `jax.nn.dot_product_attention(implementation="xla")`: XLA's own attention and autodiff, on any
          platform. The TPU compiler fuses it well.
  cudnn   `jax.nn.dot_product_attention(implementation="cudnn")`: cuDNN flash attention on NVIDIA GPUs, which
          never materialises the (N, N) weights. Odd sequence lengths are padded (`padded_attention`).
  auto    (the default) `resolve` picks per platform: cudnn on NVIDIA GPUs when the dtype and head dim allow it,
          custom on the CPU, xla everywhere else (TPU, ROCm, float32 on a GPU).

The choice is made while tracing, from the backend the process runs on (`current_platform`), because the
cuDNN kernel cannot even be traced without cuDNN: `jax.lax.platform_dependent` would trace every branch.

Why the padding: in jax 0.10.2 `cudnn_dot_product_attention` replaces a missing bias by `zeros(0)` before
`check_is_flash_attention` runs, which therefore treats every call as biased and, in training, rejects odd
sequence lengths ("Unsupported sequence length Q 197, KV 197": the decoder's 1 + 196 tokens, and the fine-tuning
encoder's). Padding q, k and v to a multiple of `CUDNN_SEQUENCE_MULTIPLE` with `query_seq_lengths` and
`key_value_seq_lengths` set to the true length keeps the function exact: padded keys get zero weight, padded
query rows are sliced off, and the gradient of the padding is a slice, so padded positions contribute nothing
(tests/test_attention.py checks values and gradients against the unpadded kernel).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

IMPLEMENTATIONS = ("auto", "custom", "xla", "cudnn")

# Sequence lengths handed to cuDNN are even (its check above) and, when padding is needed anyway, rounded up to
# a multiple of 8: 197 tokens become 200, 1.5% more attention work.
CUDNN_SEQUENCE_MULTIPLE = 8

# cuDNN flash attention takes fp16/bf16 inputs and head dims that are multiples of 8 up to 128 (256 from Hopper
# on); `check_is_flash_attention` in jax/_src/cudnn/fused_attention_stablehlo.py. The ViT sizes use 32-80.
CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
CUDNN_MAX_HEAD_DIM = 128


def current_platform() -> str:
    """'cpu', 'tpu', 'cuda' (NVIDIA GPU), 'rocm' (AMD GPU) or another backend name, for the default device."""
    device = jax.devices()[0]
    if device.platform != "gpu":
        return device.platform
    return "cuda" if "cuda" in device.client.platform_version.lower() else "rocm"


def cudnn_supports(dtype, head_dim: int) -> bool:
    """Whether cuDNN flash attention takes this compute dtype and head dim (sequence lengths are padded)."""
    return jnp.dtype(dtype) in CUDNN_DTYPES and head_dim % 8 == 0 and head_dim <= CUDNN_MAX_HEAD_DIM


def resolve(implementation: str, dtype, head_dim: int, platform: str | None = None) -> str:
    """The concrete kernel ('custom', 'xla' or 'cudnn') that `implementation` means on `platform`.

    'auto' chooses as the module docstring says; an explicit choice is returned as it is, except that 'cudnn'
    with a dtype or head dim cuDNN does not take is an error here rather than deep inside the trace.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if implementation == "cudnn" and not cudnn_supports(dtype, head_dim):
        raise ValueError(f"attention=cudnn needs a bfloat16 or float16 compute dtype and a head dim that is a "
                         f"multiple of 8 up to {CUDNN_MAX_HEAD_DIM}; got {jnp.dtype(dtype).name} and {head_dim}. "
                         f"Use attention=auto")
    if implementation != "auto":
        return implementation
    platform = current_platform() if platform is None else platform
    if platform == "cpu":
        return "custom"
    if platform == "cuda" and cudnn_supports(dtype, head_dim):
        return "cudnn"
    return "xla"


def multi_head_attention(qkv: jax.Array, implementation: str) -> jax.Array:
    """(B, N, 3, H, hd) fused q/k/v, as timm's `qkv(x).reshape(B, N, 3, H, hd)`, -> (B, N, H * hd).

    `implementation` is a concrete kernel from `resolve`. The logits are scaled by `hd ** -0.5`.
    """
    batch, length, _, heads, head_dim = qkv.shape
    scale = head_dim**-0.5
    if implementation == "custom":
        q, k, v = qkv.transpose(2, 0, 3, 1, 4)  # (B, H, N, hd) each
        out = softmax_attention(q * np.asarray(scale, q.dtype), k, v).transpose(0, 2, 1, 3)
    elif implementation == "cudnn":
        out = padded_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], scale, "cudnn")
    elif implementation == "xla":
        out = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], scale=scale,
                                           implementation="xla")
    else:
        raise ValueError(f"not a concrete attention kernel: {implementation!r} (resolve it first)")
    return out.reshape(batch, length, heads * head_dim)


def padded_length(length: int) -> int:
    """The sequence length handed to cuDNN: `length` when even, else the next multiple of 8."""
    if length % 2 == 0:
        return length
    return -(-length // CUDNN_SEQUENCE_MULTIPLE) * CUDNN_SEQUENCE_MULTIPLE


def padded_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float, implementation: str) -> jax.Array:
    """`jax.nn.dot_product_attention` on (B, N, H, hd) arrays padded to `padded_length(N)`, masked to N.

    The same function as the unpadded call (module docstring). `implementation="xla"` runs the same padding
    and masking on any platform, which is how the CPU tests check it.
    """
    length = q.shape[1]
    padded = padded_length(length)
    if padded == length:
        return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=implementation)
    widths = ((0, 0), (0, padded - length), (0, 0), (0, 0))
    lengths = jnp.full((q.shape[0],), length, jnp.int32)
    out = jax.nn.dot_product_attention(jnp.pad(q, widths), jnp.pad(k, widths), jnp.pad(v, widths), scale=scale,
                                       query_seq_lengths=lengths, key_value_seq_lengths=lengths,
                                       implementation=implementation)
    return out[:, :length]


# XLA folds the final swapaxes of dK^T and dV^T back into their matmuls, which turns them into the transposed-
# LHS contraction that XLA:CPU runs single-threaded with heavy operand packing. An optimization barrier on the
# CPU keeps the row-major form. Measured on a 2-core CPU: at the decoder's 197 tokens (head dim 32) each of the
# two matmuls takes ~10 ms instead of ~19 ms; at the encoder's 50 kept tokens the barrier costs more than it
# saves (1.4 ms vs 0.9 ms), hence the threshold. Other platforms never see the barrier.
PIN_TRANSPOSED_GRADS_MIN_TOKENS = 128


@jax.custom_vjp
def softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """softmax(q k^T) v over (B, H, N, hd) arrays, softmax statistics in float32.

    The gradient is written by hand so that every matmul, forward and backward, multiplies row-major operands
    without transposing an (N, N) matrix: only the small (N, hd) operands are transposed. XLA's CPU backend
    otherwise falls back to slow strided contractions for two of the four backward matmuls (about 20% of the
    attention time at N = 197). The values are the same function and gradient as autodiff's.
    """
    return _attention_forward(q, k, v)[0]


def _attention_forward(q, k, v):
    k_t = jnp.swapaxes(k, -1, -2)
    weights = jax.nn.softmax((q @ k_t).astype(jnp.float32), axis=-1).astype(v.dtype)
    return weights @ v, (q, k_t, v, weights)


def _attention_backward(residuals, d_out):
    q, k_t, v, weights = residuals
    d_weights = (d_out @ jnp.swapaxes(v, -1, -2)).astype(jnp.float32)
    w32 = weights.astype(jnp.float32)
    d_logits = (w32 * (d_weights - jnp.sum(d_weights * w32, axis=-1, keepdims=True))).astype(q.dtype)
    d_q = d_logits @ jnp.swapaxes(k_t, -1, -2)
    d_k_t = jnp.swapaxes(q, -1, -2) @ d_logits
    d_v_t = jnp.swapaxes(d_out, -1, -2) @ weights
    if q.shape[-2] >= PIN_TRANSPOSED_GRADS_MIN_TOKENS:
        d_k_t, d_v_t = jax.lax.platform_dependent((d_k_t, d_v_t), cpu=jax.lax.optimization_barrier,
                                                  default=lambda grads: grads)
    return d_q, jnp.swapaxes(d_k_t, -1, -2), jnp.swapaxes(d_v_t, -1, -2)


softmax_attention.defvjp(_attention_forward, _attention_backward)
