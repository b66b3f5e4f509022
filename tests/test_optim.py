"""core/optim.py: lr scaling, the per-step schedule, weight-decay masks, layer-wise lr decay, gradient accumulation."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from usf_mae_jax.cli import ConfigError
from usf_mae_jax.core import optim, steps
from usf_mae_jax.models import classifier, vit


def opt_cfg(**overrides):
    cfg = ml_collections.ConfigDict(dict(blr=1.5e-4, lr=None, lr_batch_denominator=256, b1=0.9, b2=0.95, eps=1e-8,
                                         weight_decay=0.05, wd_mask="reference", min_lr=0.0, clip_grad_norm=0.0))
    cfg.update(overrides)
    return cfg


def test_peak_lr_scaling_and_configurable_denominator():
    assert steps.peak_learning_rate(opt_cfg(), 4096) == pytest.approx(1.5e-4 * 16)
    # USF-MAE notebook: base_lr * 128 / 256 at batch 64, i.e. a denominator of 128.
    assert steps.peak_learning_rate(opt_cfg(blr=3e-4, lr_batch_denominator=128), 64) == pytest.approx(1.5e-4)
    assert steps.peak_learning_rate(opt_cfg(lr=0.01), 64) == 0.01


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
    with pytest.raises(ValueError, match=r"unknown weight-decay rule .some.; choose one of reference, all, finetune"):
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


@pytest.fixture(scope="module")
def classifier_params():
    config = vit.model_config("mu", depth=3, img_size=32)
    model = classifier.ViTClassifier(config, num_classes=4, rngs=nnx.Rngs(0))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def test_layer_ids(classifier_params):
    ids = optim.layer_ids(classifier_params, depth=3)
    assert ids["cls_token"] == 0 and ids["pos_embed"] == 0
    assert ids["patch_embed"]["proj"]["kernel"] == 0 and ids["patch_embed"]["proj"]["bias"] == 0
    for k in range(3):
        assert ids[f"blocks_{k}"]["attn"]["qkv"]["kernel"] == k + 1
        assert ids[f"blocks_{k}"]["norm2"]["scale"] == k + 1
    assert ids["fc_norm"]["scale"] == 4 and ids["head"]["kernel"] == 4 and ids["head"]["bias"] == 4


def test_lr_scales(classifier_params):
    scales = optim.layer_decay_scales(classifier_params, depth=3, decay=0.5)
    assert scales["head"]["kernel"] == 1.0
    assert scales["blocks_2"]["mlp"]["fc1"]["kernel"] == 0.5
    assert scales["blocks_0"]["mlp"]["fc1"]["kernel"] == 0.125
    assert scales["patch_embed"]["proj"]["kernel"] == 0.0625 and scales["cls_token"] == 0.0625
    # ViT-B/16 with the reference decay 0.65: the patch embedding trains at 0.65 ** 13.
    assert optim.layer_decay_scales({"patch_embed": 0.0}, depth=12, decay=0.65)["patch_embed"] == pytest.approx(
        0.65**13)
    with pytest.raises(ValueError, match="names block 5"):
        optim.layer_ids({"blocks_5": {"w": 0.0}}, depth=3)
    with pytest.raises(ValueError, match="decay"):
        optim.layer_decay_scales(classifier_params, depth=3, decay=0.0)


def test_finetune_weight_decay_mask(classifier_params):
    mask = optim.weight_decay_mask(classifier_params, "finetune")
    assert mask["blocks_1"]["attn"]["qkv"]["kernel"] is True
    assert mask["patch_embed"]["proj"]["kernel"] is True and mask["head"]["kernel"] is True
    assert mask["blocks_1"]["attn"]["qkv"]["bias"] is False
    assert mask["blocks_1"]["norm1"]["scale"] is False and mask["fc_norm"]["bias"] is False
    assert mask["cls_token"] is False and mask["pos_embed"] is False
    assert mask["patch_embed"]["proj"]["bias"] is False


def test_scale_by_tree_scales_lr_and_weight_decay():
    params = {"blocks_0": {"w": jnp.ones((2, 2))}, "head": {"w": jnp.ones((2, 2))}}
    scales = optim.layer_decay_scales(params, depth=1, decay=0.5)
    opt = optax.chain(optax.adamw(0.1, weight_decay=0.5), optim.scale_by_tree(scales))
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = opt.update(zero_grads, opt.init(params), params)
    # With zero gradients the update is pure decoupled weight decay: -lr * wd * w * scale.
    np.testing.assert_allclose(updates["head"]["w"], -0.05 * np.ones((2, 2)), rtol=1e-6)
    np.testing.assert_allclose(updates["blocks_0"]["w"], -0.025 * np.ones((2, 2)), rtol=1e-6)


def plan_config(**fields) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict({
        "batch_size": 8, "grad_accum_steps": 1, "total_steps": 150, "total_epochs": None, "warmup_steps": 0,
        "warmup_epochs": None, "warmup_fraction": None, "eval_steps": None, "eval_epochs": None, "log_steps": 10,
        "ckpt_steps": 200, "ckpt_minutes": 30.0, "optimizer": opt_cfg()})
    config.update(fields)
    return config


@pytest.mark.parametrize(("total", "ckpt_steps", "every"), [(150, 200, 15), (12, 4, 2), (2000, 200, 200), (7, 200, 1)])
def test_checkpoints_at_least_every_tenth_of_the_run(total, ckpt_steps, every):
    plan = steps.plan(plan_config(total_steps=total, ckpt_steps=ckpt_steps), examples_per_epoch=64)
    assert plan.ckpt_every == every and plan.ckpt_minutes == 30.0


@pytest.mark.parametrize("minutes", [-1.0, -0.5])
def test_bad_ckpt_minutes_is_a_config_error(minutes):
    with pytest.raises(ConfigError, match="ckpt_minutes must be a non-negative number of minutes"):
        steps.plan(plan_config(ckpt_minutes=minutes), examples_per_epoch=64)
