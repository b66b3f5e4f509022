"""The segmentation model and loss: block choice, parameter names, UperNet's pooling and resizing against
torch, output resolution, BatchNorm statistics as extra state, and the loss against torch and numpy."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from usf_mae_jax.core import optim, trees
from usf_mae_jax.models import classifier, vit
from usf_mae_jax.models import segmentation as seg
from usf_mae_jax.trainers.segment import parse_class_weights, segmentation_loss

SMALL = vit.model_config("mu", img_size=64, patch_size=16, depth=4, width=32, heads=2)


def output_shape(model, images) -> tuple[int, ...]:
    """The logits' shape, traced only (eager nnx calls are slow on a busy CPU)."""
    graphdef, state = nnx.split(model)
    return jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, images).shape


@functools.lru_cache(maxsize=4)
def _compiled_forward(graphdef):
    def forward(state, images, rng):
        module = nnx.merge(graphdef, state)
        return module(images, rng), nnx.state(module)

    return jax.jit(forward)


def run_jitted(model, images, rng=None):
    """model(images, rng), compiled once per mode; returns the logits and writes new BatchNorm statistics back."""
    graphdef, state = nnx.split(model)
    logits, new_state = _compiled_forward(graphdef)(state, images, rng)
    nnx.update(model, new_state)
    return logits


def test_out_indices_are_the_mae_protocol_blocks():
    assert seg.out_indices(12) == (3, 5, 7, 11)  # ViT-B, the MAE paper
    assert seg.out_indices(24) == (7, 11, 15, 23)  # ViT-L
    assert seg.out_indices(4) == (0, 1, 1, 3) and seg.out_indices(1) == (0, 0, 0, 0)


def test_parameter_names_and_output_resolution():
    model = nnx.eval_shape(lambda: seg.ViTSegmenter(SMALL, 3, nnx.Rngs(0), channels=16))
    _, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    names = trees.flatten(nnx.to_pure_dict(params))
    tops = sorted({n.split("/")[0] for n in names})
    assert tops == ["blocks_0", "blocks_1", "blocks_2", "blocks_3", "cls_token", "decode_head", "neck", "patch_embed",
                    "pos_embed"]
    heads = sorted({"/".join(n.split("/")[:2]) for n in names if n.startswith(("neck", "decode_head"))})
    assert heads == ["decode_head/bottleneck", "decode_head/conv_seg", "decode_head/fpn_0", "decode_head/fpn_1",
                     "decode_head/fpn_2", "decode_head/fpn_bottleneck", "decode_head/lateral_0",
                     "decode_head/lateral_1", "decode_head/lateral_2", "decode_head/psp_0", "decode_head/psp_1",
                     "decode_head/psp_2", "decode_head/psp_3", "neck/fpn1", "neck/fpn2"]
    assert names["decode_head/fpn_bottleneck/conv/kernel"].shape == (3, 3, 4 * 16, 16)
    assert names["decode_head/conv_seg/kernel"].shape == (1, 1, 16, 3)
    assert "decode_head/lateral_0/conv/bias" not in names  # ConvModule: no conv bias before BatchNorm
    assert sorted(trees.flatten(nnx.to_pure_dict(stats)))[:2] == ["decode_head/bottleneck/bn/mean",
                                                                   "decode_head/bottleneck/bn/var"]
    # Layer decay: the encoder by block, both heads at the top (full lr).
    assert optim.layer_id("decode_head/conv_seg/kernel", 4) == optim.layer_id("neck/fpn1/bn/scale", 4) == 5
    images = jnp.zeros((2, 64, 64, 3))
    assert output_shape(model, images) == (2, 16, 16, 3)  # stride p/4
    linear = nnx.eval_shape(lambda: seg.ViTSegmenter(SMALL, 2, nnx.Rngs(0), head="linear"))
    assert output_shape(linear, images) == (2, 4, 4, 2)  # the patch grid
    assert not jax.tree.leaves(nnx.state(linear, nnx.BatchStat))


def test_adaptive_pool_and_resize_match_torch():
    x = np.random.default_rng(0).normal(size=(2, 7, 5, 3)).astype(np.float32)
    torch_x = torch.tensor(x).permute(0, 3, 1, 2)
    for bins in (1, 2, 3, 6):
        ours = np.asarray(seg.adaptive_avg_pool(jnp.asarray(x), bins))
        theirs = torch.nn.functional.adaptive_avg_pool2d(torch_x, bins).permute(0, 2, 3, 1).numpy()
        np.testing.assert_allclose(ours, theirs, atol=1e-6)
    for size in ((14, 10), (4, 3), (7, 5)):  # up, down and same
        ours = np.asarray(seg.resize_bilinear(jnp.asarray(x), *size))
        theirs = torch.nn.functional.interpolate(torch_x, size=size, mode="bilinear",
                                                 align_corners=False).permute(0, 2, 3, 1).numpy()
        np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_deconv_is_torchs_transposed_convolution_with_kernel_and_stride_2():
    deconv = seg.Deconv2x2(4, jnp.float32, nnx.Rngs(0))
    deconv.bias[...] = jnp.arange(4.0)
    x = np.random.default_rng(1).normal(size=(2, 3, 5, 4)).astype(np.float32)
    theirs = torch.nn.functional.conv_transpose2d(
        torch.tensor(x).permute(0, 3, 1, 2), torch.tensor(np.asarray(deconv.kernel[...]).transpose(2, 3, 0, 1)),
        torch.tensor(np.asarray(deconv.bias[...])), stride=2).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(deconv(jnp.asarray(x))), theirs, atol=1e-5)


def test_train_mode_updates_batch_statistics_and_eval_mode_uses_them():
    model = seg.ViTSegmenter(SMALL, 2, nnx.Rngs(0), channels=8)
    images = jax.random.normal(jax.random.key(1), (4, 64, 64, 3))
    before = trees.flatten(nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))
    model.train()
    run_jitted(model, images, jax.random.key(2))
    after = trees.flatten(nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))
    assert any(not np.allclose(before[k], after[k]) for k in before)
    model.eval()
    first, second = run_jitted(model, images), run_jitted(model, images)
    np.testing.assert_array_equal(first, second)  # no dropout, no drop path, running statistics
    assert trees.flatten(nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))).keys() == after.keys()


def test_encoder_weights_load_into_the_segmenter_with_a_resized_table():
    source = classifier.ViTClassifier(vit.model_config("mu", img_size=32, patch_size=16, depth=4, width=32,
                                                       heads=2), 2, nnx.Rngs(3), global_pool=False)
    params = nnx.to_pure_dict(nnx.state(source, nnx.Param))
    for head, has_norm in (("upernet", False), ("linear", True)):
        model = seg.ViTSegmenter(SMALL, 2, nnx.Rngs(0), head=head, channels=8)
        weights, report = classifier.encoder_weights(model, params, 32)
        assert weights["pos_embed"].shape == (1 + 16, 32)  # 2x2 grid resized to 4x4
        np.testing.assert_array_equal(weights["blocks_3/mlp/fc2/kernel"], params["blocks_3"]["mlp"]["fc2"]["kernel"])
        assert ("norm/scale" in weights) == has_norm
        assert all(n.startswith(("decode_head", "neck", "head")) for n in report["fresh"])


def test_loss_matches_torch_cross_entropy_and_a_numpy_dice():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 6, 3)).astype(np.float32)
    masks = rng.integers(0, 3, (2, 5, 6)).astype(np.int32)
    weights = np.array([0.5, 1.0, 2.0], np.float32)
    total, terms = segmentation_loss(jnp.asarray(logits), jnp.asarray(masks), jnp.asarray(weights), 0.7)
    ce = torch.nn.functional.cross_entropy(torch.tensor(logits).permute(0, 3, 1, 2), torch.tensor(masks).long(),
                                           weight=torch.tensor(weights))
    np.testing.assert_allclose(float(terms["ce"]), float(ce), rtol=1e-5)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    onehot = np.eye(3)[masks]
    dice = [(2 * (probs[..., c] * onehot[..., c]).sum() + 1) / (probs[..., c].sum() + onehot[..., c].sum() + 1)
            for c in (1, 2)]
    expected = 1 - (dice[0] * 1.0 + dice[1] * 2.0) / 3.0
    np.testing.assert_allclose(float(terms["dice_loss"]), expected, rtol=1e-5)
    np.testing.assert_allclose(float(total), float(ce) + 0.7 * expected, rtol=1e-5)
    perfect = jnp.asarray(np.eye(3)[masks] * 50.0)
    assert float(segmentation_loss(perfect, jnp.asarray(masks), jnp.ones(3), 1.0)[0]) < 1e-2


def test_class_weights_are_checked():
    np.testing.assert_array_equal(parse_class_weights("", 3), [1, 1, 1])
    np.testing.assert_array_equal(parse_class_weights("0.5, 2", 2), [0.5, 2])
    with pytest.raises(ValueError, match="needs 3 non-negative values"):
        parse_class_weights("1,1", 3)
    with pytest.raises(ValueError, match="comma-separated numbers"):
        parse_class_weights("a,b", 2)
