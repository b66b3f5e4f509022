"""The attention kernels (usf_mae_jax/models/attention.py): every kernel is the same function and gradient, the
padding that cuDNN needs changes nothing, 'auto' picks per platform, and the bf16 train step with cuDNN
attention lowers for CUDA (it crashed at trace time on the decoder's 197 tokens before the padding)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from usf_mae_jax.models import attention, vit


def reference_attention(qkv):
    """The reference formula on (B, N, 3, H, hd): softmax(q k^T * hd**-0.5) v, heads concatenated."""
    q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
    weights = jax.nn.softmax((q @ jnp.swapaxes(k, -1, -2)) * qkv.shape[-1] ** -0.5, axis=-1)
    out = (weights @ v).transpose(0, 2, 1, 3)
    return out.reshape(*out.shape[:2], -1)


def value_and_grad(fn, qkv, d_out):
    out, vjp = jax.vjp(fn, qkv)
    return out, vjp(d_out)[0]


@pytest.mark.parametrize("length", [50, 197, 7])
@pytest.mark.parametrize("kernel", ["custom", "xla"])
def test_kernels_are_the_reference_function_and_gradient(kernel, length):
    rng = np.random.default_rng(length)
    qkv = jnp.asarray(rng.standard_normal((2, length, 3, 2, 8), np.float32))
    d_out = jnp.asarray(rng.standard_normal((2, length, 16), np.float32))
    out, grad = value_and_grad(lambda x: attention.multi_head_attention(x, kernel), qkv, d_out)
    expected_out, expected_grad = value_and_grad(reference_attention, qkv, d_out)
    np.testing.assert_allclose(out, expected_out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("length, padded", [(197, 200), (7, 8), (9, 16), (50, 50), (200, 200)])
def test_padded_length_is_even_and_rounds_odd_lengths_to_a_multiple_of_8(length, padded):
    assert attention.padded_length(length) == padded


@pytest.mark.parametrize("length", [197, 7])
def test_padding_with_sequence_lengths_is_the_unpadded_function_and_gradient(length):
    """The cuDNN path's padding and masking, run by XLA's kernel on the CPU, against the unpadded call."""
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal((3, length, 4, 16), np.float32)) for _ in range(3))
    d_out = jnp.asarray(rng.standard_normal((3, length, 4, 16), np.float32))

    def unpadded(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, scale=0.25, implementation="xla")

    def padded(q, k, v):
        return attention.padded_attention(q, k, v, 0.25, "xla")

    lowered = jax.jit(padded).lower(q, k, v).as_text()
    assert f"x{attention.padded_length(length)}x4x16" in lowered  # it really runs on the padded length
    out, vjp = jax.vjp(padded, q, k, v)
    expected_out, expected_vjp = jax.vjp(unpadded, q, k, v)
    assert out.shape == expected_out.shape
    np.testing.assert_allclose(out, expected_out, rtol=1e-6, atol=1e-6)
    for name, got, expected in zip("qkv", vjp(d_out), expected_vjp(d_out)):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6, err_msg=f"d{name}")


@pytest.mark.parametrize("tokens", [50, attention.PIN_TRANSPOSED_GRADS_MIN_TOKENS + 69])
def test_hand_written_attention_gradient_equals_autodiff(tokens):
    rng = np.random.default_rng(tokens)
    q, k, v, d_out = (jnp.asarray(rng.standard_normal((2, 3, tokens, 8), np.float32)) for _ in range(4))

    def plain(q, k, v):
        return jax.nn.softmax(q @ jnp.swapaxes(k, -1, -2), axis=-1) @ v

    out, vjp = jax.vjp(attention.softmax_attention, q, k, v)
    expected_out, expected_vjp = jax.vjp(plain, q, k, v)
    np.testing.assert_allclose(out, expected_out, rtol=1e-5, atol=1e-6)
    for name, got, expected in zip("qkv", vjp(d_out), expected_vjp(d_out)):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5, err_msg=f"d{name}")
    lowered = jax.jit(lambda *a: vjp(d_out)).lower(q, k, v).as_text()
    assert ("optimization_barrier" in lowered) == (tokens >= attention.PIN_TRANSPOSED_GRADS_MIN_TOKENS)


@pytest.mark.parametrize("platform, dtype, head_dim, expected", [
    ("cpu", "float32", 64, "custom"),
    ("cpu", "bfloat16", 32, "custom"),
    ("cuda", "bfloat16", 64, "cudnn"),
    ("cuda", "float16", 32, "cudnn"),
    ("cuda", "float32", 64, "xla"),  # cuDNN flash attention takes only 16-bit inputs
    ("cuda", "bfloat16", 12, "xla"),  # head dim not a multiple of 8
    ("cuda", "bfloat16", 160, "xla"),
    ("rocm", "bfloat16", 64, "xla"),
    ("tpu", "bfloat16", 64, "xla"),
])
def test_auto_picks_the_kernel_per_platform(platform, dtype, head_dim, expected):
    assert attention.resolve("auto", jnp.dtype(dtype), head_dim, platform) == expected
    for explicit in ("custom", "xla"):
        assert attention.resolve(explicit, jnp.dtype(dtype), head_dim, platform) == explicit


def test_auto_on_this_machine_is_the_cpu_kernel_and_bad_choices_fail_early():
    assert attention.current_platform() == "cpu"
    assert attention.resolve("auto", jnp.float32, 64) == "custom"
    with pytest.raises(ValueError, match="attention=cudnn needs a bfloat16 or float16"):
        attention.resolve("cudnn", jnp.float32, 64)
    with pytest.raises(ValueError, match="attention must be one of"):
        attention.resolve("flash", jnp.bfloat16, 64)
    with pytest.raises(ValueError, match="attention must be one of"):
        vit.model_config("mu", attention="flash")


@pytest.fixture
def cudnn_probe_stubbed(monkeypatch):
    """Lowering for CUDA on a CPU-only jaxlib: the one probe that needs cuDNN installed returns cuDNN 9.10.
    The support checks themselves (`check_is_flash_attention`) are plain Python on shapes and still run."""
    from jax._src.cudnn import fused_attention_stablehlo

    monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 91000)


def cudnn_calls(text: str) -> dict[str, int]:
    names = ("__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward")
    return {name: text.count(f"custom_call @{name}(") for name in names}


@pytest.mark.parametrize("length", [197, 50])
def test_a_block_with_cudnn_attention_lowers_for_cuda_in_training(cudnn_probe_stubbed, length):
    block = vit.Block(64, 2, 4.0, jnp.bfloat16, nnx.Rngs(0), attention="cudnn")
    graphdef, params = nnx.split(block)
    x = jax.ShapeDtypeStruct((4, length, 64), jnp.bfloat16)

    def loss(params, x):
        return jnp.sum(nnx.merge(graphdef, params)(x).astype(jnp.float32))

    text = jax.jit(jax.grad(loss)).trace(params, x).lower(lowering_platforms=("cuda",)).as_text()
    assert cudnn_calls(text) == {"__cudnn$fmhaSoftmax": 1, "__cudnn$fmhaSoftmaxBackward": 1}
    assert f"4x{attention.padded_length(length)}x2x32xbf16" in text


def test_the_bf16_train_step_with_cudnn_attention_lowers_for_cuda(cudnn_probe_stubbed):
    """The documented GPU recipe's step, with ViT-B's sequence lengths (224 px, patch 16: 50 encoder tokens,
    197 decoder tokens) on a small width, lowered for CUDA: one cuDNN call per block and direction, the decoder's
    padded to 200 tokens, no scatter anywhere (the masking gradients are gathers) and no conditional on data."""
    from helpers import data_dependent_conditionals, pretrain_setup

    from configs import pretrain
    from usf_mae_jax.core import sharding

    config = pretrain.get_config("usf_mae")
    with config.unlocked():
        config.model.update(variant="mu", img_size=224, patch_size=16, dtype="bfloat16", attention="cudnn",
                            depth=2, decoder_depth=2)
        config.input.update(source="synthetic", synthetic_count=64)
        config.update(total_epochs=None, warmup_fraction=None, total_steps=10, warmup_steps=1, batch_size=2)
    mesh = sharding.make_mesh(config.mesh)
    setup = pretrain_setup(config, mesh)
    batch = {"image": jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.uint8, sharding=sharding.batch_sharding(mesh))}
    traced = setup.train_step.trace(setup.abstract_state, batch)
    text = traced.lower(lowering_platforms=("cuda",)).as_text()
    assert cudnn_calls(text) == {"__cudnn$fmhaSoftmax": 4, "__cudnn$fmhaSoftmaxBackward": 4}
    assert "2x200x2x16xbf16" in text and "2x50x2x16xbf16" in text
    assert "scatter" not in text
    assert data_dependent_conditionals(text) == 0  # the guard is a select here: no host sync per step
