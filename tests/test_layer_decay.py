"""Layer-decay group assignment and the fine-tune weight-decay mask."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from usf_mae_jax.models import classifier, vit
from usf_mae_jax.train import layer_decay


@pytest.fixture(scope="module")
def params():
    config = vit.model_config("mu", depth=3, img_size=32)
    model = classifier.ViTClassifier(config, num_classes=4, rngs=nnx.Rngs(0))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def test_layer_ids(params):
    ids = layer_decay.layer_ids(params, depth=3)
    assert ids["cls_token"] == 0 and ids["pos_embed"] == 0
    assert ids["patch_embed"]["proj"]["kernel"] == 0 and ids["patch_embed"]["proj"]["bias"] == 0
    for k in range(3):
        assert ids[f"blocks_{k}"]["attn"]["qkv"]["kernel"] == k + 1
        assert ids[f"blocks_{k}"]["norm2"]["scale"] == k + 1
    assert ids["fc_norm"]["scale"] == 4 and ids["head"]["kernel"] == 4 and ids["head"]["bias"] == 4


def test_lr_scales(params):
    scales = layer_decay.lr_scales(params, depth=3, decay=0.5)
    assert scales["head"]["kernel"] == 1.0
    assert scales["blocks_2"]["mlp"]["fc1"]["kernel"] == 0.5
    assert scales["blocks_0"]["mlp"]["fc1"]["kernel"] == 0.125
    assert scales["patch_embed"]["proj"]["kernel"] == 0.0625 and scales["cls_token"] == 0.0625
    # ViT-B/16 with the reference decay 0.65: the patch embedding trains at 0.65 ** 13.
    assert layer_decay.lr_scales({"patch_embed": 0.0}, depth=12, decay=0.65)["patch_embed"] == pytest.approx(
        0.65**13)
    with pytest.raises(ValueError, match="names block 5"):
        layer_decay.layer_ids({"blocks_5": {"w": 0.0}}, depth=3)
    with pytest.raises(ValueError, match="decay"):
        layer_decay.lr_scales(params, depth=3, decay=0.0)


def test_weight_decay_mask(params):
    mask = layer_decay.weight_decay_mask(params)
    assert mask["blocks_1"]["attn"]["qkv"]["kernel"] is True
    assert mask["patch_embed"]["proj"]["kernel"] is True and mask["head"]["kernel"] is True
    assert mask["blocks_1"]["attn"]["qkv"]["bias"] is False
    assert mask["blocks_1"]["norm1"]["scale"] is False and mask["fc_norm"]["bias"] is False
    assert mask["cls_token"] is False and mask["pos_embed"] is False
    assert mask["patch_embed"]["proj"]["bias"] is False


def test_scale_by_tree_scales_lr_and_weight_decay():
    params = {"blocks_0": {"w": jnp.ones((2, 2))}, "head": {"w": jnp.ones((2, 2))}}
    scales = layer_decay.lr_scales(params, depth=1, decay=0.5)
    opt = optax.chain(optax.adamw(0.1, weight_decay=0.5), layer_decay.scale_by_tree(scales))
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = opt.update(zero_grads, opt.init(params), params)
    # With zero gradients the update is pure decoupled weight decay: -lr * wd * w * scale.
    np.testing.assert_allclose(updates["head"]["w"], -0.05 * np.ones((2, 2)), rtol=1e-6)
    np.testing.assert_allclose(updates["blocks_0"]["w"], -0.025 * np.ones((2, 2)), rtol=1e-6)
