"""The MAE's numerical contract pieces (mae_fidelity.md), each checked against a closed form."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend import core as jax_core

from usf_mae_jax.models import mae, pos_embed, vit


def test_pos_embed_matches_closed_form():
    dim, grid = 16, 3
    table = pos_embed.sincos_2d(dim, grid)
    assert table.shape == (1 + grid * grid, dim) and table.dtype == np.float32
    np.testing.assert_array_equal(table[0], 0.0)  # cls row
    quarter = dim // 4
    for row in range(grid):
        for col in range(grid):
            vec = table[1 + row * grid + col]
            for k in range(quarter):
                w = 1.0 / 10000 ** (k / quarter)
                # block 0 embeds the column (x), block 1 the row (y); each is [sin..., cos...]
                np.testing.assert_allclose(vec[k], np.sin(col * w), atol=1e-7)
                np.testing.assert_allclose(vec[quarter + k], np.cos(col * w), atol=1e-7)
                np.testing.assert_allclose(vec[2 * quarter + k], np.sin(row * w), atol=1e-7)
                np.testing.assert_allclose(vec[3 * quarter + k], np.cos(row * w), atol=1e-7)


def test_pos_embed_is_not_a_parameter():
    model = mae.MaskedAutoencoder(vit.model_config("mu", img_size=32, patch_size=8), rngs=nnx.Rngs(0))
    names = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))[0]
    assert not any("pos" in jax.tree_util.keystr(p) for p, _ in names)


def test_resize_patch_table_keeps_cls_and_identity():
    table = pos_embed.sincos_2d(32, 4)
    np.testing.assert_array_equal(pos_embed.resize_patch_table(table, (4, 4)), table)
    bigger = pos_embed.resize_patch_table(table, (6, 6))
    assert bigger.shape == (37, 32)
    np.testing.assert_array_equal(bigger[0], table[0])


@pytest.mark.parametrize("new_grid", [(24, 24), (7, 7), (14, 10)])
def test_resize_patch_table_matches_torch_bicubic(new_grid):
    torch = pytest.importorskip("torch")
    table = pos_embed.sincos_2d(64, 14) + np.random.default_rng(0).normal(0, 0.1, (197, 64)).astype(np.float32)
    grid = torch.from_numpy(table[1:]).reshape(1, 14, 14, 64).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(grid, size=new_grid, mode="bicubic", align_corners=False)
    expected = expected.permute(0, 2, 3, 1).reshape(-1, 64).numpy()
    resized = pos_embed.resize_patch_table(table, new_grid)
    np.testing.assert_array_equal(resized[0], table[0])
    np.testing.assert_allclose(resized[1:], expected, atol=2e-6)


def test_patchify_order_and_round_trip():
    rng = np.random.default_rng(0)
    images = rng.standard_normal((2, 8, 12, 3)).astype(np.float32)
    patches = np.asarray(vit.patchify(jnp.asarray(images), 4))
    assert patches.shape == (2, 6, 48)
    # Patch 4 is grid row 1, col 1; its vector is (row-in-patch, col-in-patch, channel), channel fastest.
    expected = images[1, 4:8, 4:8, :].reshape(-1)
    np.testing.assert_array_equal(patches[1, 4], expected)
    np.testing.assert_array_equal(patches[0, 0, :3], images[0, 0, 0, :])
    np.testing.assert_array_equal(patches[0, 0, 3:6], images[0, 0, 1, :])
    square = rng.standard_normal((2, 8, 8, 3)).astype(np.float32)
    np.testing.assert_array_equal(vit.unpatchify(vit.patchify(jnp.asarray(square), 4), 4, 3), square)


def test_random_masking_with_given_noise():
    tokens = jnp.arange(2 * 8 * 1, dtype=jnp.float32).reshape(2, 8, 1)
    noise = jnp.asarray([[0.9, 0.1, 0.5, 0.3, 0.8, 0.2, 0.7, 0.4],
                         [0.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]])
    masking = mae.random_masking(noise, 0.75)
    kept = mae.take_rows(tokens, masking.ids_keep, masking.ids_restore)
    assert kept.shape == (2, 2, 1)  # int(8 * 0.25) = 2
    np.testing.assert_array_equal(kept[0, :, 0], [1.0, 5.0])  # smallest noise first: ids 1, 5
    np.testing.assert_array_equal(kept[1, :, 0], [8.0, 15.0])  # ids 0, 7 of sample 1
    np.testing.assert_array_equal(masking.mask[0], [1, 0, 1, 1, 1, 0, 1, 1])
    np.testing.assert_array_equal(masking.mask[1], [0, 1, 1, 1, 1, 1, 1, 0])
    shuffle = np.argsort(np.asarray(noise), axis=1)
    np.testing.assert_array_equal(masking.ids_shuffle, shuffle)
    np.testing.assert_array_equal(np.take_along_axis(shuffle, np.asarray(masking.ids_restore), 1),
                                  np.tile(np.arange(8), (2, 1)))


@pytest.mark.parametrize("keep", [5, 16])
def test_take_rows_gradient_is_autodiffs_and_has_no_scatter(keep):
    """Keeping rows (keep < L) and un-shuffling (keep == L): the hand-written gradient, a gather by the inverse
    permutation, equals autodiff's scatter-add."""
    masking = mae.random_masking(jax.random.uniform(jax.random.key(0), (3, 16)), 1 - keep / 16)
    ids, inverse = (masking.ids_keep, masking.ids_restore) if keep < 16 else (masking.ids_restore,
                                                                                masking.ids_shuffle)
    x = jax.random.normal(jax.random.key(1), (3, 16, 4))
    weights = jax.random.normal(jax.random.key(2), (3, keep, 4))

    def ours(x):
        return jnp.sum(mae.take_rows(x, ids, inverse) * weights)

    def autodiff(x):
        return jnp.sum(jnp.take_along_axis(x, ids[:, :, None], axis=1) * weights)

    np.testing.assert_array_equal(jax.grad(ours)(x), jax.grad(autodiff)(x))
    assert "scatter" in jax.jit(jax.grad(autodiff)).lower(x).as_text()
    assert "scatter" not in jax.jit(jax.grad(ours)).lower(x).as_text()


def test_len_keep_is_a_floor():
    assert mae.num_kept(196, 0.75) == 49
    assert mae.num_kept(10, 0.75) == 2


def test_random_masking_statistics_without_noise():
    model = mae.MaskedAutoencoder(vit.model_config("mu", img_size=64, patch_size=8), rngs=nnx.Rngs(0))
    images = jnp.zeros((256, 64, 64, 3))
    _, _, mask = model(images, 0.75, rng=jax.random.key(3))
    mask = np.asarray(mask)
    np.testing.assert_array_equal(mask.sum(axis=1), 64 - 16)  # exactly L - len_keep removed per sample
    assert len({tuple(row) for row in mask}) == 256  # one independent mask per sample
    # Every position is removed with probability 0.75 (std over 256 samples ~0.027).
    frequency = mask.mean(axis=0)
    assert frequency.min() > 0.63 and frequency.max() < 0.87, frequency
    _, _, other = model(images, 0.75, rng=jax.random.key(4))
    assert not np.array_equal(mask, np.asarray(other))  # keys change the masks: no fixed order
    with pytest.raises(ValueError, match="no fixed-order fallback"):
        model(images, 0.75)


def test_loss_counts_masked_patches_only_and_norm_pix_uses_ddof1():
    rng = np.random.default_rng(1)
    images = jnp.asarray(rng.standard_normal((2, 8, 8, 3)), jnp.float32)
    patches = vit.patchify(images, 4)
    target = np.asarray(patches)
    pred = jnp.asarray(rng.standard_normal(target.shape), jnp.float32)
    mask = jnp.asarray([[1, 0, 0, 1], [0, 0, 1, 0]], jnp.float32)
    per_patch = ((np.asarray(pred) - target) ** 2).mean(-1)
    expected = (per_patch * np.asarray(mask)).sum() / 3.0
    got = mae.masked_patch_loss(patches, pred, mask, norm_pix_loss=False)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    # Changing predictions of visible patches must not change the loss.
    pred_visible_changed = pred.at[0, 1].add(100.0)
    np.testing.assert_allclose(mae.masked_patch_loss(patches, pred_visible_changed, mask, False), got, rtol=1e-6)
    mean = target.mean(-1, keepdims=True)
    std = np.sqrt(target.var(-1, ddof=1, keepdims=True) + 1e-6)
    per_patch_norm = ((np.asarray(pred) - (target - mean) / std) ** 2).mean(-1)
    np.testing.assert_allclose(mae.masked_patch_loss(patches, pred, mask, True),
                               (per_patch_norm * np.asarray(mask)).sum() / 3.0, rtol=1e-5)
    biased = ((np.asarray(pred) - (target - mean) / np.sqrt(target.var(-1, keepdims=True) + 1e-6)) ** 2).mean(-1)
    assert abs(float((biased * np.asarray(mask)).sum() / 3.0) - float(got)) > 1e-4


def test_initialisation_statistics():
    cfg = vit.model_config("base", depth=1, decoder_depth=1)
    model = mae.MaskedAutoencoder(cfg, rngs=nnx.Rngs(0))
    p, d = cfg.patch_size, cfg.width
    kernel = np.asarray(model.patch_embed.proj.kernel[...])
    assert kernel.shape == (p, p, 3, d)
    # xavier over [D, 3*p*p]: var = 2 / (3*p*p + D); Flax's conv xavier would give 2 / (3*p*p + D*p*p).
    np.testing.assert_allclose(kernel.var(), 2.0 / (3 * p * p + d), rtol=0.05)
    qkv = np.asarray(model.blocks_0.attn.qkv.kernel[...])
    assert qkv.shape == (d, 3 * d)
    np.testing.assert_allclose(qkv.var(), 2.0 / (d + 3 * d), rtol=0.05)  # xavier over the fused matrix
    fc1 = np.asarray(model.blocks_0.mlp.fc1.kernel[...])
    np.testing.assert_allclose(fc1.var(), 2.0 / (d + 4 * d), rtol=0.05)
    np.testing.assert_array_equal(np.asarray(model.blocks_0.mlp.fc1.bias[...]), 0.0)
    for token in (model.cls_token[...], model.mask_token[...]):
        assert abs(float(np.std(token)) - 0.02) < 0.004 and float(np.abs(token).max()) > 0
    np.testing.assert_array_equal(np.asarray(model.norm.scale[...]), 1.0)
    assert model.norm.epsilon == 1e-6


def test_exact_gelu_is_used():
    block = vit.Mlp(4, 4, jnp.float32, nnx.Rngs(0))
    x = jnp.asarray([[0.5, -1.0, 2.0, 0.1]])
    hidden = block.fc1(x)
    expected = block.fc2(jax.nn.gelu(hidden, approximate=False))
    np.testing.assert_allclose(block(x), expected, rtol=0, atol=0)
    assert not np.allclose(block(x), block.fc2(jax.nn.gelu(hidden, approximate=True)), atol=1e-7)


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="img_size 100 is not divisible by patch_size 16"):
        vit.model_config("base", img_size=100)
    with pytest.raises(ValueError, match="unknown model variant"):
        vit.model_config("gigantic")
    with pytest.raises(ValueError, match="unknown model field"):
        vit.model_config("base", widht=3)
    with pytest.raises(ValueError, match=r"open interval \(0, 1\)"):
        mae.validate_mask_ratio(1.0)


def test_encode_shape_and_bf16_compute_keeps_f32_params():
    cfg = vit.model_config("mu", img_size=32, patch_size=8, dtype="bfloat16")
    model = mae.MaskedAutoencoder(cfg, rngs=nnx.Rngs(0))
    assert model.blocks_0.attn.qkv.kernel[...].dtype == jnp.float32
    x = jnp.ones((2, 32, 32, 3))
    assert model.encode(x).shape == (2, 17, 32)
    loss, pred, _ = model(x, 0.75, rng=jax.random.key(0))
    assert loss.dtype == jnp.float32 and pred.dtype == jnp.float32 and np.isfinite(float(loss))


def test_normalize_images_replicates_grayscale():
    gray = jnp.full((1, 2, 2, 1), 255, jnp.uint8)
    out = np.asarray(vit.normalize_images(gray, 3))
    np.testing.assert_allclose(out[0, 0, 0], (1.0 - np.asarray(vit.IMAGENET_MEAN)) / np.asarray(vit.IMAGENET_STD),
                               rtol=1e-6)


@pytest.mark.parametrize("dtype, channels, in_chans", [(np.uint8, 3, 3), (np.uint8, 1, 3), (np.float32, 3, 3),
                                                       (np.uint8, 1, 1)])
def test_normalized_patches_equals_normalize_then_patchify(dtype, channels, in_chans):
    rng = np.random.default_rng(7)
    if dtype == np.uint8:
        images = jnp.asarray(rng.integers(0, 256, (2, 16, 16, channels), dtype=np.uint8))
    else:
        images = jnp.asarray(rng.random((2, 16, 16, channels), dtype=np.float32))
    expected = vit.patchify(vit.normalize_images(images, in_chans), 4)
    got = jax.jit(vit.normalized_patches, static_argnums=(1, 2))(images, 4, in_chans)
    assert got.shape == (2, 16, 16 * in_chans) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-6, atol=1e-6)  # <= 1 ulp apart
    with pytest.raises(ValueError, match="2 channels but the model expects 3"):
        vit.normalized_patches(images[..., :1].repeat(2, -1), 4, 3)


def test_forward_patches_is_the_image_forward_and_checks_shapes():
    cfg = vit.model_config("mu", img_size=16, patch_size=4)
    model = mae.MaskedAutoencoder(cfg, rngs=nnx.Rngs(0))
    images = jnp.asarray(np.random.default_rng(8).standard_normal((2, 16, 16, 3)), jnp.float32)
    noise = jax.random.uniform(jax.random.key(1), (2, 16))
    from_images = model(images, 0.75, noise=noise)
    from_patches = model.forward_patches(vit.patchify(images, 4), 0.75, noise=noise)
    for a, b in zip(from_images, from_patches):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match=r"patches must have shape \(N, 16, 48\), got \(2, 16, 16\)"):
        model.forward_patches(jnp.zeros((2, 16, 16)), 0.75, noise=noise)


def dot_flops(jaxpr) -> int:
    """2 x multiply-adds of every dot_general in a jaxpr, sub-jaxprs (custom_vjp, pjit, cond) included."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lhs_contract, _), (lhs_batch, _) = eqn.params["dimension_numbers"]
            lhs, rhs = (np.asarray(v.aval.shape, np.int64) for v in eqn.invars[:2])
            shared = int(np.prod(lhs[list(lhs_contract)])) * int(np.prod(lhs[list(lhs_batch)]))
            total += 2 * int(np.prod(lhs)) * int(np.prod(rhs)) // shared
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                if isinstance(sub, jax_core.ClosedJaxpr):
                    total += dot_flops(sub.jaxpr)
                elif isinstance(sub, jax_core.Jaxpr):
                    total += dot_flops(sub)
    return total


def test_train_flops_of_vit_b_mae():
    assert mae.train_flops_per_image(vit.model_config("base"), 0.75) == 3 * 19_388_858_368  # 58.2 GFLOP


@pytest.mark.parametrize("variant, overrides, ratio", [
    ("mu", dict(img_size=32, patch_size=8), 0.75),
    ("mu", dict(img_size=48, patch_size=8, depth=2, decoder_depth=3, mlp_ratio=2.0), 0.5),
    ("tiny", dict(img_size=64, patch_size=16, decoder_width=64, in_chans=1), 0.9),
])
def test_train_flops_formula_counts_the_models_matmuls(variant, overrides, ratio):
    """The formula against the matmuls the model actually traces: the forward's, and the gradient's, which has
    two per forward matmul except the patch embedding's input gradient (pixels are not differentiated)."""
    config = vit.model_config(variant, **overrides)
    graphdef, params = nnx.split(mae.MaskedAutoencoder(config, rngs=nnx.Rngs(0)))
    patches = jnp.zeros((1, config.num_patches, config.patch_size**2 * config.in_chans))
    noise = jax.random.uniform(jax.random.key(0), (1, config.num_patches))

    def loss(params):
        return nnx.merge(graphdef, params).forward_patches(patches, ratio, noise=noise)[0]

    expected = mae.train_flops_per_image(config, ratio)
    forward = dot_flops(jax.make_jaxpr(loss)(params).jaxpr)
    assert 3 * forward == expected
    patch_input_gradient = 2 * mae.num_kept(config.num_patches, ratio) * patches.shape[-1] * config.width
    assert dot_flops(jax.make_jaxpr(jax.value_and_grad(loss))(params).jaxpr) == expected - patch_input_gradient


def test_block_average_is_the_mean_over_blocks_of_each_blocks_mean_patch_token():
    from usf_mae_jax.models import classifier

    config = vit.model_config("mu", img_size=32, patch_size=8, depth=3)
    model = mae.MaskedAutoencoder(config, rngs=nnx.Rngs(1))
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    x = model._with_cls(model._patch_tokens(vit.patchify(images, 8)))
    expected = []
    for block in model.encoder_blocks():
        x = block(x)
        expected.append(np.asarray(x[:, 1:]).mean(axis=1))
    np.testing.assert_allclose(model.encode_block_average(images), np.mean(expected, axis=0), atol=1e-5)
    # The classifier computes the same feature from the same encoder weights (its table is the MAE's sin-cos).
    head = classifier.ViTClassifier(config, 2, nnx.Rngs(2))
    classifier.load_encoder_params(head, nnx.to_pure_dict(nnx.state(model, nnx.Param)), 32)
    np.testing.assert_allclose(head.block_average_features(images), model.encode_block_average(images), atol=1e-5)
