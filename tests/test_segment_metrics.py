"""Segmentation metrics against independent implementations: medpy (test-only dependency), scikit-learn,
and brute-force surface distances on small masks; empty masks, single pixels and several classes."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from medpy.metric import binary as medpy
from sklearn.metrics import jaccard_score

from usf_mae_jax.evaluators import segmentation as seg

BINARY = ("background", "lesion")


def blob(shape, rng, count=2):
    """A random union of rectangles: non-empty, with holes and several components sometimes."""
    mask = np.zeros(shape, bool)
    for _ in range(count):
        y, x = rng.integers(0, shape[0] - 2), rng.integers(0, shape[1] - 2)
        mask[y:y + rng.integers(1, shape[0] // 2), x:x + rng.integers(1, shape[1] // 2)] = True
    return mask


def brute_force_hd95(a: np.ndarray, b: np.ndarray) -> float:
    """Surface = pixels with a 4-neighbour outside the mask (or off the image); all pairwise distances."""
    def border(mask):
        padded = np.pad(mask, 1)
        inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
        return np.argwhere(mask & ~inner)

    sa, sb = border(a), border(b)
    d = np.sqrt(((sa[:, None, :] - sb[None, :, :]) ** 2).sum(-1))
    return float(np.percentile(np.concatenate([d.min(axis=1), d.min(axis=0)]), 95))


@pytest.mark.parametrize("seed", range(6))
def test_binary_scores_match_medpy_and_brute_force(seed):
    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(8, 24)), int(rng.integers(8, 24)))
    pred, truth = blob(shape, rng), blob(shape, rng)
    (row,) = seg.image_rows(pred.astype(np.uint8), truth.astype(np.uint8), 2, "x", BINARY)
    assert row["dice"] == pytest.approx(medpy.dc(pred, truth))
    assert row["iou"] == pytest.approx(medpy.jc(pred, truth))
    assert row["precision"] == pytest.approx(medpy.precision(pred, truth))
    assert row["recall"] == pytest.approx(medpy.recall(pred, truth))
    assert row["hd95"] == pytest.approx(medpy.hd95(pred, truth))
    assert row["hd95"] == pytest.approx(brute_force_hd95(pred, truth))
    assert (row["tp"], row["gt_pixels"], row["pred_pixels"]) == ((pred & truth).sum(), truth.sum(), pred.sum())


def test_single_pixels_and_identical_masks():
    pred, truth = np.zeros((10, 12), np.uint8), np.zeros((10, 12), np.uint8)
    pred[2, 3], truth[5, 7] = 1, 1
    (row,) = seg.image_rows(pred, truth, 2, "x", BINARY)
    assert row["hd95"] == 5.0 == medpy.hd95(pred.astype(bool), truth.astype(bool))  # a 3-4-5 triangle
    assert (row["dice"], row["iou"], row["precision"], row["recall"]) == (0.0, 0.0, 0.0, 0.0)
    (same,) = seg.image_rows(truth, truth, 2, "x", BINARY)
    assert (same["dice"], same["iou"], same["hd95"]) == (1.0, 1.0, 0.0)


def test_empty_masks_follow_the_documented_rules():
    empty, lesion = np.zeros((30, 40), np.uint8), np.zeros((30, 40), np.uint8)
    lesion[10:20, 10:20] = 1
    (missed,) = seg.image_rows(empty, lesion, 2, "missed", BINARY)
    (invented,) = seg.image_rows(lesion, empty, 2, "invented", BINARY)
    for row in (missed, invented):
        assert (row["dice"], row["iou"], row["precision"], row["recall"]) == (0.0, 0.0, 0.0, 0.0)
        assert row["hd95"] == 50.0  # the image diagonal: sqrt(30^2 + 40^2)
    (nothing,) = seg.image_rows(empty, empty, 2, "nothing", BINARY)
    assert nothing["dice"] is None and nothing["hd95"] is None
    results, rows = seg.segmentation_results([lesion, empty, empty], [lesion, lesion, empty], ["a", "b", "c"],
                                             BINARY, "t")
    lesion_summary = results["per_class"]["lesion"]
    # Both-empty "c" is left out of the per-image means; the missed lesion counts as 0.
    assert (lesion_summary["n_images"], lesion_summary["n_empty"]) == (2, 1)
    assert results["dice"] == 0.5 and results["hd95"] == 25.0
    assert results["dice_global"] == pytest.approx(2 * 100 / (2 * 100 + 100))  # TP 100, FN 100
    assert len(rows) == 3 and results["n_test"] == 3 and results["foreground"] is None


def test_multiclass_per_class_global_and_miou():
    rng = np.random.default_rng(7)
    names = ("background", "cyst", "solid", "septum")
    preds = [rng.integers(0, 4, (12, 16)).astype(np.uint8) for _ in range(5)]
    truths = [np.where(blob((12, 16), rng), rng.integers(1, 4), 0).astype(np.uint8) for _ in range(5)]
    truths[0][:] = 0  # an image without any foreground
    results, rows = seg.segmentation_results(preds, truths, [f"i{k}" for k in range(5)], names, "t")
    for c, name in enumerate(names[1:], 1):
        scored = [(p == c, t == c) for p, t in zip(preds, truths) if (p == c).any() or (t == c).any()]
        expected_dice = np.mean([medpy.dc(p, t) if p.any() and t.any() else 0.0 for p, t in scored])
        expected_hd = np.mean([medpy.hd95(p, t) if p.any() and t.any() else math.hypot(12, 16) for p, t in scored])
        assert results["per_class"][name]["dice"] == pytest.approx(expected_dice)
        assert results["per_class"][name]["hd95"] == pytest.approx(expected_hd)
        everything_p = np.concatenate([p.ravel() == c for p in preds])
        everything_t = np.concatenate([t.ravel() == c for t in truths])
        assert results["per_class"][name]["dice_global"] == pytest.approx(medpy.dc(everything_p, everything_t))
    assert results["dice"] == pytest.approx(np.mean([results["per_class"][n]["dice"] for n in names[1:]]))
    flat_p, flat_t = np.concatenate([p.ravel() for p in preds]), np.concatenate([t.ravel() for t in truths])
    assert results["miou_all_classes"] == pytest.approx(jaccard_score(flat_t, flat_p, average="macro"))
    foreground = results["foreground"]
    assert foreground["dice_global"] == pytest.approx(medpy.dc(flat_p > 0, flat_t > 0))
    assert len(rows) == 5 * 3 and set(results) == set(seg.RESULT_KEYS)


def test_a_class_absent_everywhere_is_left_out_of_the_mean():
    truth = np.zeros((8, 8), np.uint8)
    truth[2:5, 2:5] = 1
    results, _ = seg.segmentation_results([truth], [truth], ["a"], ("background", "a", "never"), "t")
    assert results["per_class"]["never"]["dice"] is None and results["dice"] == 1.0


def test_per_image_csv_and_overlay(tmp_path):
    truth = np.zeros((20, 20), np.uint8)
    truth[5:12, 5:12] = 1
    pred = np.roll(truth, 3, axis=1)
    _, rows = seg.segmentation_results([pred, truth * 0], [truth, truth * 0], ["a.png", "b.png"], BINARY, "t")
    seg.write_per_image_csv(str(tmp_path / "per_image.csv"), rows)
    with open(tmp_path / "per_image.csv") as f:
        read = list(csv.DictReader(f))
    assert [r["id"] for r in read] == ["a.png", "b.png"] and read[1]["dice"] == "" and read[1]["hd95"] == ""
    assert float(read[0]["dice"]) == pytest.approx(2 * 28 / (2 * 49))
    image = (np.arange(400).reshape(20, 20) % 255).astype(np.uint8)[:, :, None]
    grid = seg.overlay_grid([image, image], [truth, truth], [pred, pred], ["a", "b"], tile=40, columns=2)
    assert grid.shape == (18 + 40, 80, 3)
    tile = grid[18:, :40]
    green = (tile[:, :, 1] == 200) & (tile[:, :, 0] == 0) & (tile[:, :, 2] == 0)
    red = (tile[:, :, 2] == 255) & (tile[:, :, 0] == 0) & (tile[:, :, 1] == 0)
    assert green.any() and red.any()
    # the red contour is the green one moved right by 3 px * 2 (tile scale)
    assert np.argwhere(red)[:, 1].min() - np.argwhere(green)[:, 1].min() == 6


def test_surface_is_the_four_connected_border():
    mask = np.zeros((6, 6), bool)
    mask[1:5, 1:5] = True
    expected = mask.copy()
    expected[2:4, 2:4] = False
    np.testing.assert_array_equal(seg.surface(mask), expected)
    full = np.ones((3, 3), bool)  # the image border counts as outside: only the centre is interior
    np.testing.assert_array_equal(seg.surface(full), [[1, 1, 1], [1, 0, 1], [1, 1, 1]])
