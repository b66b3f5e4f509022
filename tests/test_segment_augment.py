"""Joint augmentation: a mask pixel follows its image pixel through flip, rotation and crop; masks keep their
class values (nearest neighbour); photometric ops touch the image only; logits resize like torch's bilinear."""

from __future__ import annotations

import ml_collections
import numpy as np
import pytest
import torch

from usf_mae_jax.cli import ConfigError
from usf_mae_jax.data import augment
from usf_mae_jax.data import segmentation as segdata


def input_cfg(**fields):
    values = dict(augment="joint", crop_scale_min=0.5, rotation_degrees=20.0, contrast=0.2, brightness=0.1)
    values.update(fields)
    return ml_collections.ConfigDict(values)


def unique_image(size=16):
    """Every pixel has its own value, so a pixel can be found again after any exact geometric op."""
    return (np.arange(size * size) % 256).astype(np.uint8).reshape(size, size, 1)


def test_exact_ops_move_mask_and_image_pixels_together():
    image = unique_image()
    mask = np.zeros((16, 16), np.uint8)
    mask[3, 11] = 5  # one pixel of class 5
    value = image[3, 11, 0]
    for rotated_image, rotated_mask in [segdata.rotate_pair(image, mask, 90.0),
                                        segdata.rotate_pair(image, mask, -90.0),
                                        (augment.hflip(image), augment.hflip(mask)),
                                        segdata.crop_pair(image, mask, (2, 5, 10, 10), 10)]:
        assert rotated_image.shape[:2] == rotated_mask.shape
        (where,) = np.argwhere(rotated_mask == 5)
        assert rotated_image[where[0], where[1], 0] == value
        assert set(np.unique(rotated_mask)) == {0, 5}
    # 90 degrees counter-clockwise about the centre: (row 3, col 11) -> (row 15 - 11, col 3)
    assert tuple(np.argwhere(segdata.rotate_pair(image, mask, 90.0)[1] == 5)[0]) == (4, 3)


def disc_pair(size=64, value=3):
    rows, cols = np.mgrid[0:size, 0:size]
    mask = (((rows - 0.4 * size) ** 2 + (cols - 0.6 * size) ** 2) < (0.2 * size) ** 2).astype(np.uint8) * value
    image = np.where(mask > 0, 230, 30).astype(np.uint8)[:, :, None]
    return image, mask


@pytest.mark.parametrize("seed", range(8))
def test_transform_keeps_image_and_mask_aligned(seed):
    image, mask = disc_pair(96)
    transform = segdata.make_train_transform(input_cfg(), 64)
    out_image, out_mask = transform(image, mask, np.random.default_rng(seed))
    assert out_image.shape == (64, 64, 1) and out_mask.shape == (64, 64) and out_image.dtype == np.uint8
    assert set(np.unique(out_mask)) <= {0, 3}  # nearest neighbour: no invented class values
    bright = out_image[:, :, 0] > 130  # the disc in the image (contrast and brightness keep 230 vs 30 apart)
    lesion = out_mask == 3
    if lesion.sum() > 20:
        assert (bright & lesion).sum() / (bright | lesion).sum() > 0.9
    again = transform(image, mask, np.random.default_rng(seed))
    np.testing.assert_array_equal(again[0], out_image)
    np.testing.assert_array_equal(again[1], out_mask)


def test_photometric_ops_touch_the_image_only():
    image, mask = disc_pair(32)
    geometry_only = segdata.make_train_transform(input_cfg(contrast=0.0, brightness=0.0), 32)
    with_colour = segdata.make_train_transform(input_cfg(contrast=0.5, brightness=0.3), 32)
    changed = 0
    for seed in range(6):
        plain = geometry_only(image, mask, np.random.default_rng(seed))
        jittered = with_colour(image, mask, np.random.default_rng(seed))
        np.testing.assert_array_equal(plain[1], jittered[1])  # same geometry, same mask
        changed += int(not np.array_equal(plain[0], jittered[0]))
    assert changed >= 5


def test_no_augment_is_the_nearest_resize_of_both():
    image, mask = disc_pair(40)
    out_image, out_mask = segdata.make_train_transform(input_cfg(augment="none"), 20)(image, mask, None)
    np.testing.assert_array_equal(out_image, augment.resize_nearest(image, 20))
    np.testing.assert_array_equal(out_mask, augment.resize_nearest(mask, 20))
    with pytest.raises(ConfigError, match=r"input\.augment for segmentation is one of"):
        segdata.make_train_transform(input_cfg(augment="usf_mae"), 20)
    with pytest.raises(ConfigError, match=r"crop_scale_min must lie in"):
        segdata.make_train_transform(input_cfg(crop_scale_min=0.0), 20)


def test_logits_resize_like_torch_bilinear_without_aligned_corners():
    logits = np.random.default_rng(0).normal(size=(7, 9, 3)).astype(np.float32)
    ours = segdata.resize_logits(logits, (23, 31))
    theirs = torch.nn.functional.interpolate(torch.tensor(logits).permute(2, 0, 1)[None], size=(23, 31),
                                             mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-3)
    assert segdata.resize_logits(logits[:, :, :2], (14, 18)).shape == (14, 18, 2)
