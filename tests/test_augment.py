"""Augmentation geometry: flips are flips, rotation keeps the centre, crop scales stay in range, determinism."""

import numpy as np
import pytest

from usf_mae_jax.data import augment


def _noise(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def test_flips_are_flips():
    image = _noise((5, 7, 1))
    np.testing.assert_array_equal(augment.hflip(image)[:, 0], image[:, 6])
    np.testing.assert_array_equal(augment.vflip(image)[0], image[4])
    np.testing.assert_array_equal(augment.hflip(augment.hflip(image)), image)


@pytest.mark.parametrize("side", [33, 32])
def test_rotation_by_90_is_rot90_and_keeps_the_centre(side):
    image = _noise((side, side, 1))
    np.testing.assert_array_equal(augment.rotate(image, 90.0), np.rot90(image, 1))  # counter-clockwise
    np.testing.assert_array_equal(augment.rotate(image, 0.0), image)
    rotated = augment.rotate(_noise((31, 31, 3)), 37.0)
    assert rotated.shape == (31, 31, 3)
    np.testing.assert_array_equal(rotated[15, 15], _noise((31, 31, 3))[15, 15])


def test_rotation_fills_corners_with_zero():
    rotated = augment.rotate(np.full((40, 40, 1), 200, np.uint8), 45.0)
    assert rotated[0, 0, 0] == 0 and rotated[20, 20, 0] == 200


def test_nearest_resize_follows_the_pil_rule():
    image = np.arange(4, dtype=np.uint8).reshape(1, 4, 1).repeat(4, axis=0)  # columns 0 1 2 3
    out = augment.resize_nearest(image, 8)
    assert out.shape == (8, 8, 1) and out[0, :, 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    # shrinking 4 -> 2: PIL samples source floor((x + 0.5) * 2) = 1, 3
    assert augment.resize_nearest(image, 2)[0, :, 0].tolist() == [1, 3]


def test_usf_mae_crop_box_reproduces_torchvision_rejection():
    rng = np.random.default_rng(0)
    boxes = [augment.random_resized_crop_box(224, 224, augment.USF_MAE_SCALE, augment.CROP_RATIO, rng)
             for _ in range(3000)]
    areas = np.array([h * w for _, _, h, w in boxes]) / 224**2
    aspects = np.array([w / h for _, _, h, w in boxes])
    assert all(t >= 0 and left >= 0 and t + h <= 224 and left + w <= 224 for t, left, h, w in boxes)
    # Area > 1 never survives (it is rejected, not clamped); the lower bound is the scale's 0.5.
    assert areas.max() == 1.0 and areas.min() >= 0.49
    assert aspects.min() >= 0.74 and aspects.max() <= 1.34
    # The fallback after 10 rejected draws is the whole (square) image: a few percent of the samples.
    whole = np.mean([box == (0, 0, 224, 224) for box in boxes])
    assert 0.02 < whole < 0.1


def test_mae_crop_scales_and_fallback():
    rng = np.random.default_rng(1)
    boxes = [augment.random_resized_crop_box(100, 160, augment.MAE_SCALE, augment.CROP_RATIO, rng)
             for _ in range(2000)]
    areas = np.array([h * w for _, _, h, w in boxes]) / (100 * 160)
    assert areas.min() >= 0.19 and areas.max() <= 1.0
    # Ratio out of range with no valid draw: centre crop clamped to the ratio (torchvision fallback).
    never = np.random.default_rng(2)
    assert augment.random_resized_crop_box(10, 100, (5.0, 6.0), augment.CROP_RATIO, never) == (0, 43, 10, 13)


@pytest.mark.parametrize("preset", augment.PRESETS)
@pytest.mark.parametrize("channels", [1, 3])
def test_presets_output_shape_dtype_and_determinism(preset, channels):
    if preset == "usf_mae_us":
        pytest.importorskip("usaugment", reason="optional (requirements-test.txt); tests/test_us_augment.py")
    size = 32
    image = _noise((size, size, channels) if preset == "none" else (45, 60, channels))
    fn = augment.make_augment(preset, size)
    a = fn(image, np.random.default_rng([7, 0, 3]))
    b = fn(image, np.random.default_rng([7, 0, 3]))
    assert a.shape == (size, size, channels) and a.dtype == np.uint8 and a.flags.c_contiguous
    np.testing.assert_array_equal(a, b)
    if preset in ("usf_mae", "mae"):
        others = [fn(image, np.random.default_rng([7, 0, i])) for i in range(4, 8)]
        assert any(not np.array_equal(a, o) for o in others)


def test_usf_mae_without_crop_is_resize_rotate_flip():
    """With the crop forced to the whole image, the preset is exactly resize -> rotate -> flips."""
    image = _noise((20, 20, 1))
    seed = next(s for s in range(500) if augment.random_resized_crop_box(
        20, 20, augment.USF_MAE_SCALE, augment.CROP_RATIO, _advance(s)) == (0, 0, 20, 20))
    rng = np.random.default_rng(seed)
    angle, flip_h, flip_v = rng.uniform(0, 90), rng.random() < 0.5, rng.random() < 0.5
    expected = augment.rotate(image, angle)
    expected = augment.hflip(expected) if flip_h else expected
    expected = augment.vflip(expected) if flip_v else expected
    np.testing.assert_array_equal(augment.usf_mae(image, np.random.default_rng(seed), 20), expected)


def _advance(seed):
    rng = np.random.default_rng(seed)
    rng.uniform(0, 90), rng.random(), rng.random()
    return rng


def test_unknown_preset_and_bad_size():
    with pytest.raises(ValueError, match="unknown augmentation preset 'simclr'"):
        augment.make_augment("simclr", 32)
    with pytest.raises(ValueError, match=r"feeds frames unchanged to a 32x32 model, but got 30x32 frames"):
        augment.make_augment("none", 32)(_noise((30, 32, 1)), np.random.default_rng(0))
