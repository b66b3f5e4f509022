"""The fine-tune ViT classifier and the linear-probe head."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from usf_mae_jax.models import classifier, mae, pos_embed, vit


def tiny(img_size=32, **kw):
    return vit.model_config("mu", depth=2, img_size=img_size, **kw)


def images(n, size, seed=0):
    return jax.random.normal(jax.random.key(seed), (n, size, size, 3))


def test_names_shapes_and_init():
    config = tiny()
    model = classifier.ViTClassifier(config, num_classes=3, rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert set(params) == {"patch_embed", "cls_token", "pos_embed", "blocks_0", "blocks_1", "fc_norm", "head"}
    assert params["pos_embed"].shape == (1 + 4, 32)
    np.testing.assert_array_equal(params["pos_embed"], pos_embed.sincos_2d(32, 2))
    head = np.asarray(params["head"]["kernel"])
    assert head.shape == (32, 3) and 0 < head.std() < 1e-4 and np.abs(head).max() <= 2.0
    cls_model = classifier.ViTClassifier(config, num_classes=3, rngs=nnx.Rngs(0), global_pool=False)
    assert "norm" in nnx.to_pure_dict(nnx.state(cls_model, nnx.Param))
    assert not hasattr(cls_model, "fc_norm")
    logits = model(images(2, 32))
    assert logits.shape == (2, 3) and logits.dtype == jnp.float32
    with pytest.raises(ValueError, match="images must have shape"):
        model(images(2, 48))


def test_drop_path_needs_rng_and_changes_output():
    model = classifier.ViTClassifier(tiny(), 2, rngs=nnx.Rngs(0), drop_path_rate=0.5)
    assert [b.drop_path_rate for b in model.encoder_blocks()] == [0.0, 0.5]
    x = images(4, 32)
    np.testing.assert_array_equal(model(x), model(x))
    assert not np.allclose(model(x, rng=jax.random.key(1)), model(x))


def test_pooling_modes_match_hand_computation():
    config = tiny()
    model = classifier.ViTClassifier(config, 2, rngs=nnx.Rngs(0))
    x = images(2, 32)
    table = model.pos_embed[...]
    tokens = model.patch_embed(x) + table[1:]
    cls = jnp.broadcast_to(model.cls_token[...] + table[:1], (2, 1, 32))
    h = model.run_blocks(model.encoder_blocks(), jnp.concatenate([cls, tokens], 1))
    expected = model.fc_norm(h[:, 1:].mean(1))
    np.testing.assert_allclose(model.forward_features(x), expected, rtol=1e-5, atol=1e-6)


def test_load_from_mae_copies_encoder_and_resizes_table():
    mae_model = mae.MaskedAutoencoder(tiny(img_size=32), rngs=nnx.Rngs(1))
    mae_params = nnx.to_pure_dict(nnx.state(mae_model, nnx.Param))
    x = images(2, 32)

    probe = classifier.ViTClassifier(tiny(img_size=32), 2, rngs=nnx.Rngs(5), global_pool=False)
    report = classifier.load_encoder_params(probe, mae_params, source_img_size=32)
    assert "norm/scale" in report["loaded"] and "head/kernel" in report["fresh"]
    assert any(p.startswith("decoder_blocks_0") for p in report["ignored"])
    # Without drop path, a cls-pooled classifier on MAE weights is the MAE encoder's cls feature.
    np.testing.assert_allclose(probe.forward_features(x), mae_model.encode(x)[:, 0], rtol=1e-5, atol=1e-5)

    big = classifier.ViTClassifier(tiny(img_size=64), 2, rngs=nnx.Rngs(5))
    report = classifier.load_encoder_params(big, mae_params, source_img_size=32)
    assert "norm/scale" in report["ignored"] and "fc_norm/scale" in report["fresh"]
    expected = pos_embed.resize_patch_table(pos_embed.sincos_2d(32, 2), (4, 4))
    np.testing.assert_allclose(big.pos_embed[...], expected, rtol=1e-6)
    assert not np.allclose(expected, pos_embed.sincos_2d(32, 4))  # resized, not recomputed
    fc2 = mae_params["blocks_1"]["mlp"]["fc2"]["kernel"]
    np.testing.assert_array_equal(big.blocks_1.mlp.fc2.kernel[...], fc2)
    assert big(images(1, 64)).shape == (1, 2)

    bad = {**mae_params, "cls_token": np.zeros((1, 1, 16))}
    with pytest.raises(ValueError, match="cls_token has shape"):
        classifier.load_encoder_params(probe, bad)


def test_linear_probe_head():
    head = classifier.LinearProbeHead(8, 3, rngs=nnx.Rngs(0))
    assert head.head_0.scale is None and head.head_0.bias is None
    assert head.head_0.epsilon == 1e-6 and head.head_0.momentum == 0.9
    assert 0.001 < float(np.std(head.head_1.kernel[...])) < 0.02
    feats = 5.0 + 3.0 * jax.random.normal(jax.random.key(0), (64, 8))
    head.train()
    head(feats)
    # One step of the running mean with Flax momentum 0.9 (= PyTorch 0.1): 0.1 * batch mean.
    np.testing.assert_allclose(head.head_0.mean[...], 0.1 * feats.mean(0), rtol=1e-5)
    head.eval()
    assert head(feats).shape == (64, 3)
