"""Field-of-view-aware MAE masking (models/fov.py, trainers/pretrain.py): off, the loss and the masking are
bit-exact with the reference model; on, no in-view patch is lost from the loss, no out-of-view patch is in it,
the visible tokens come only from in-view patches (all of them when there are too few), and an all-in-view
batch gives exactly the reference's loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import pretrain as pretrain_configs
from usf_mae_jax.cli import ConfigError
from usf_mae_jax.models import fov, vit
from usf_mae_jax.models.mae import MaskedAutoencoder, num_kept
from usf_mae_jax.trainers import pretrain

CONFIG = vit.model_config("mu", img_size=32, patch_size=8)  # 16 patches, 4 kept at ratio 0.75


def images_with_black(seed: int, black_columns: int) -> np.ndarray:
    """uint8 (4, 32, 32, 1) speckle-like images (values >= 1) whose leftmost columns are black."""
    rng = np.random.default_rng(seed)
    images = rng.integers(1, 256, (4, 32, 32, 1)).astype(np.uint8)
    images[:, :, :black_columns] = 0
    return images


def setup():
    model = MaskedAutoencoder(CONFIG, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    return model, graphdef, nnx.to_pure_dict(params)


def test_off_is_the_reference_model_bit_for_bit():
    model, graphdef, params = setup()
    images, key = jnp.asarray(images_with_black(0, 16)), jax.random.key(3)
    ours = pretrain.mae_loss(graphdef, CONFIG, 0.75, params, images, key)  # fov_threshold None: off
    noise = jax.random.uniform(jax.random.fold_in(key, pretrain.MASK_STREAM), (4, 16), jnp.float32)
    reference, _, _ = model(vit.normalize_images(images), 0.75, noise=noise)
    assert np.asarray(ours).tobytes() == np.asarray(reference).tobytes()


def test_all_in_view_batch_gives_the_reference_loss_and_mask_exactly():
    model, graphdef, params = setup()
    images, key = jnp.asarray(images_with_black(1, 0)), jax.random.key(4)
    off = pretrain.mae_loss(graphdef, CONFIG, 0.75, params, images, key)
    on = pretrain.mae_loss(graphdef, CONFIG, 0.75, params, images, key, fov_threshold=0)
    assert np.asarray(on).tobytes() == np.asarray(off).tobytes()
    noise = jax.random.uniform(jax.random.key(5), (4, 16))
    patches = vit.normalized_patches(images, 8)
    _, _, mask, weights = fov.masked_loss(model, patches, 0.75, noise, fov.view_mask(images, 8))
    _, _, reference_mask = model.forward_patches(patches, 0.75, noise=noise)
    np.testing.assert_array_equal(mask, reference_mask)
    np.testing.assert_array_equal(weights, reference_mask)


def test_no_in_view_patch_is_lost_and_visible_tokens_are_in_view():
    model, _, _ = setup()
    images = jnp.asarray(images_with_black(2, 16))  # the left half: 8 of 16 patches out of view
    in_view = fov.view_mask(images, 8)
    assert np.asarray(in_view).sum(axis=1).tolist() == [8] * 4
    patches = vit.normalized_patches(images, 8)
    for seed in range(5):
        noise = jax.random.uniform(jax.random.key(seed), (4, 16))
        loss, pred, mask, weights = fov.masked_loss(model, patches, 0.75, noise, in_view)
        visible = 1 - np.asarray(mask)
        assert (visible.sum(axis=1) == num_kept(16, 0.75)).all()
        assert (visible <= np.asarray(in_view)).all()  # every visible token is in view
        # Every in-view patch is visible or a loss target; no out-of-view patch is a target.
        np.testing.assert_array_equal(np.asarray(weights) + visible, np.asarray(in_view))
        per_patch = ((np.asarray(pred) - np.asarray(patches)) ** 2).mean(axis=-1)
        expected = (per_patch * np.asarray(weights)).sum() / np.asarray(weights).sum()
        np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_fewer_in_view_patches_than_kept_tokens_keeps_them_all_visible():
    model, _, _ = setup()
    images = images_with_black(3, 24)  # 4 columns of patches, 3 black: 4 in-view patches per image ...
    images[1, :8] = 0  # ... and 3 in the second image, fewer than the 4 kept tokens
    in_view = fov.view_mask(jnp.asarray(images), 8)
    assert np.asarray(in_view).sum(axis=1).tolist() == [4, 3, 4, 4]
    noise = jax.random.uniform(jax.random.key(0), (4, 16))
    loss, _, mask, weights = fov.masked_loss(model, vit.normalized_patches(jnp.asarray(images), 8), 0.75, noise,
                                             in_view)
    visible = 1 - np.asarray(mask)
    assert (visible >= np.asarray(in_view)).all()  # all in-view patches are visible
    assert float(np.asarray(weights).sum()) > 0 and np.isfinite(float(loss))  # plain weights as the fallback
    black = jnp.zeros((4, 32, 32, 1), jnp.uint8)
    loss, *_ = fov.masked_loss(model, vit.normalized_patches(black, 8), 0.75, noise, fov.view_mask(black, 8))
    assert np.isfinite(float(loss))


def test_pretrain_task_reads_the_option_and_checks_the_threshold():
    config = pretrain_configs.get_config("demo,runlocal")
    assert config.model.fov_masking is False and pretrain.PretrainTask(config).fov_threshold is None
    config.model.fov_masking, config.model.fov_threshold = True, 8
    assert pretrain.PretrainTask(config).fov_threshold == 8
    config.model.fov_threshold = 300
    with pytest.raises(ConfigError, match="fov_threshold must lie in"):
        pretrain.PretrainTask(config)
