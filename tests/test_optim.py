"""Learning-rate scaling, the per-step schedule, weight-decay masks and gradient accumulation."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from usf_mae_jax.train import optim


def opt_cfg(**overrides):
    cfg = ml_collections.ConfigDict(dict(blr=1.5e-4, lr=None, lr_batch_denominator=256, b1=0.9, b2=0.95, eps=1e-8,
                                         weight_decay=0.05, wd_mask="reference", min_lr=0.0, clip_grad_norm=0.0))
    cfg.update(overrides)
    return cfg


def test_peak_lr_scaling_and_configurable_denominator():
    assert optim.peak_learning_rate(opt_cfg(), 4096) == pytest.approx(1.5e-4 * 16)
    # USF-MAE notebook: base_lr * 128 / 256 at batch 64, i.e. a denominator of 128.
    assert optim.peak_learning_rate(opt_cfg(blr=3e-4, lr_batch_denominator=128), 64) == pytest.approx(1.5e-4)
    assert optim.peak_learning_rate(opt_cfg(lr=0.01), 64) == 0.01


def test_warmup_then_half_cycle_cosine_per_step():
    schedule = optim.warmup_cosine(1.0, total_steps=110, warmup_steps=10, min_lr=0.1)
    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == pytest.approx(0.5)
    assert float(schedule(10)) == pytest.approx(1.0)
    # Reference: min + (peak - min) * 0.5 * (1 + cos(pi * (t - warmup) / (total - warmup)))
    assert float(schedule(60)) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert float(schedule(110)) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="warmup_steps"):
        optim.warmup_cosine(1.0, total_steps=5, warmup_steps=6)


def test_weight_decay_masks():
    params = {"cls_token": jnp.zeros((1, 1, 4)), "norm": {"scale": jnp.ones(4), "bias": jnp.zeros(4)},
              "blocks_0": {"attn": {"qkv": {"kernel": jnp.zeros((4, 12)), "bias": jnp.zeros(12)}}}}
    ref = optim.weight_decay_mask(params, "reference")
    assert ref["cls_token"] is True  # tokens are decayed by the reference
    assert ref["norm"]["scale"] is False and ref["norm"]["bias"] is False
    assert ref["blocks_0"]["attn"]["qkv"]["kernel"] is True and ref["blocks_0"]["attn"]["qkv"]["bias"] is False
    assert all(jax.tree.leaves(optim.weight_decay_mask(params, "all")))
    with pytest.raises(ValueError, match="unknown weight-decay mask"):
        optim.weight_decay_mask(params, "some")


def test_adamw_matches_torch_formula_and_mask():
    params = {"w": jnp.asarray([[1.0, -2.0]]), "bias": jnp.asarray([0.5])}
    grads = {"w": jnp.asarray([[0.1, 0.3]]), "bias": jnp.asarray([0.2])}
    tx = optim.make_optimizer(opt_cfg(b2=0.999), lambda _: 0.1, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    # torch.optim.AdamW step 1: p <- p * (1 - lr * wd) - lr * m_hat / (sqrt(v_hat) + eps), m_hat = g, v_hat = g^2
    w = np.asarray([[1.0, -2.0]])
    g = np.asarray([[0.1, 0.3]])
    expected_w = w * (1 - 0.1 * 0.05) - 0.1 * g / (np.abs(g) + 1e-8)
    np.testing.assert_allclose(optax.apply_updates(params, updates)["w"], expected_w, rtol=1e-6)
    np.testing.assert_allclose(optax.apply_updates(params, updates)["bias"], [0.5 - 0.1], atol=2e-6)  # no decay


def test_clipping_and_gradient_accumulation():
    params = {"w": jnp.ones((3, 3))}
    tx = optim.make_optimizer(opt_cfg(clip_grad_norm=1.0, weight_decay=0.0), lambda _: 1.0, params,
                              grad_accum_steps=2)
    state = tx.init(params)
    big = {"w": jnp.full((3, 3), 100.0)}
    updates, state = tx.update(big, state, params)
    np.testing.assert_array_equal(updates["w"], 0.0)  # first micro-step only accumulates
    updates, state = tx.update(big, state, params)
    assert float(jnp.abs(updates["w"]).max()) > 0  # the second applies the averaged update
    # Adam's first moment saw the accumulated gradient clipped to global norm 1: mu = (1 - b1) * g_clipped.
    mu = optax.tree_utils.tree_get(state, "mu")
    assert float(optax.tree.norm(mu)) == pytest.approx(0.1, rel=1e-5)
