"""data_prep/clean.py: grayscale collapse, scan-region crop, the authors' annotation masks + NS inpainting,
size cap, and the order and independence of the switches."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from data_prep import clean
from data_prep.clean import (
    CleanOptions,
    annotation_mask,
    cap_longest_side,
    clean_image,
    collapse_equal_channels,
    colour_mark_mask,
    crop_to_scan_region,
    grayscale_mark_mask,
    remove_annotations,
    scan_region,
)


def _scan(height=96, width=128, seed=0):
    """A smooth mid-gray 'scan' in a black frame, with a text-like strip in the top margin."""
    rng = np.random.default_rng(seed)
    image = np.zeros((height, width), np.uint8)
    tissue = cv2.GaussianBlur(rng.integers(60, 160, (60, 80)).astype(np.uint8), (9, 9), 3)
    image[20:80, 30:110] = tissue
    image[4:7, 2:20] = 255  # thin UI text line in the margin
    return image


def test_collapse_equal_channels():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert collapse_equal_channels(np.stack([gray] * 3, -1)).shape == (3, 4)
    colour = np.stack([gray, gray, gray + 1], -1)
    assert collapse_equal_channels(colour) is colour
    assert collapse_equal_channels(gray[..., None]).shape == (3, 4)


def test_scan_region_ignores_margins_and_text():
    image = _scan()
    assert scan_region(image) == (20, 80, 30, 110)
    assert crop_to_scan_region(image).shape == (60, 80)
    dark = np.zeros((32, 32), np.uint8)
    assert scan_region(dark) == (0, 32, 0, 32)  # nothing to crop to: unchanged


def test_colour_marks_are_found_and_grayscale_has_none():
    gray = cv2.GaussianBlur(np.random.default_rng(1).integers(40, 120, (64, 64)).astype(np.uint8), (7, 7), 2)
    rgb = np.stack([gray] * 3, -1)
    assert not colour_mark_mask(gray).any()
    marked = rgb.copy()
    marked[30:36, 10:50] = (255, 255, 0)  # yellow caliper line (AUL-style)
    mask = colour_mark_mask(marked)
    assert mask[30:36, 10:50].all()
    assert mask.sum() // 255 == 6 * 40


def test_small_colour_specks_are_dropped():
    rgb = np.full((64, 64, 3), 80, np.uint8)
    rgb[10:14, 10:14] = (0, 255, 0)  # 16 px < 20 px minimum component
    rgb[40:46, 40:50] = (255, 0, 0)  # 60 px, kept
    mask = colour_mark_mask(rgb)
    assert not mask[10:14, 10:14].any()
    assert mask[40:46, 40:50].all()


def test_grayscale_marks_keep_only_mid_sized_contours():
    image = np.full((96, 96), 60, np.uint8)
    cv2.drawMarker(image, (30, 30), 255, cv2.MARKER_CROSS, 9, 1)  # caliper cross: small contour
    image[60:90, 5:90] = 200  # a large bright structure: contour area > 2000
    mask = grayscale_mark_mask(image)
    assert mask[30, 30] == 255
    assert not mask[70:80, 20:80].any()


def test_inpainting_removes_a_caliper_and_keeps_the_rest():
    base = np.full((64, 64), 90, np.uint8)
    marked = base.copy()
    cv2.drawMarker(marked, (32, 32), 255, cv2.MARKER_CROSS, 9, 1)
    cleaned = remove_annotations(marked)
    assert abs(int(cleaned[32, 32]) - 90) <= 5
    assert np.abs(cleaned.astype(int) - base).max() <= 5
    mask = annotation_mask(marked)
    assert mask[32, 32] == 255 and not mask[0:10, 0:10].any()


def test_colour_is_content_keeps_doppler_colour():
    rgb = np.full((64, 64, 3), 70, np.uint8)
    rgb[20:44, 20:44] = (200, 30, 30)  # a Doppler-like colour blob
    kept = remove_annotations(rgb, colour_is_content=True)
    removed = remove_annotations(rgb, colour_is_content=False)
    assert (kept[30, 30] == (200, 30, 30)).all()
    assert not (removed[30, 30] == (200, 30, 30)).all()


def test_cap_longest_side():
    image = np.zeros((100, 300), np.uint8)
    assert cap_longest_side(image, 150).shape == (50, 150)
    assert cap_longest_side(image, 512) is image
    assert cap_longest_side(image, None) is image


def test_clean_image_switches_are_independent():
    image = np.stack([_scan()] * 3, -1)
    assert clean_image(image, CleanOptions()).shape == (96, 128)
    assert clean_image(image, CleanOptions(grayscale=False)).shape == (96, 128, 3)
    assert clean_image(image, CleanOptions(crop=True)).shape == (60, 80)
    assert clean_image(image, CleanOptions(crop=True, max_side=40)).shape == (30, 40)
    untouched = clean_image(image, CleanOptions(grayscale=False))
    np.testing.assert_array_equal(untouched, image)
    with pytest.raises(ValueError, match="uint8"):
        clean_image(image.astype(np.float32), CleanOptions())


def test_mask_like_frames_are_told_apart_from_ultrasound():
    speckle = np.random.default_rng(0).integers(0, 256, (40, 50), dtype=np.uint8)
    speckle[:, :20] = 0  # a wide black margin, as HC18 frames have, is still an image
    assert clean.mask_like_reason(speckle) is None
    mask = np.zeros((40, 50), np.uint8)
    mask[10:30, 10:30] = 255
    mask[10, 10:30] = 128  # a JPEG mask's grey edge
    assert clean.mask_like_reason(mask).startswith("mask-like content: 99.0% of its pixels are near 0 or 255")
    assert clean.mask_like_reason(np.zeros((8, 8, 3), np.uint8)) is not None  # a blank frame
