"""Segmentation metrics, per image and per dataset, their report files, and the test-overlay picture.

    results, rows = segmentation_results(preds, masks, ids, class_names, split="busbra/fold1/test")
    write_per_image_csv(path, rows); cv2.imwrite(path, overlay_grid(images, masks, preds, ids))

Every prediction is scored at its mask's stored resolution (the segmentation task resizes the logits to it,
never the ground truth; docs/segmentation.md). For each image and each foreground class c, with TP, FP and FN
counted over the pixels where the prediction or the truth is c:

    dice = 2TP / (2TP + FP + FN)   iou = TP / (TP + FP + FN)   precision = TP / (TP + FP)   recall = TP / (TP + FN)
    hd95 = the 95th percentile of the symmetric surface distances in pixels: the distances from each surface
           pixel of the prediction to the truth's surface, together with those from the truth's to the
           prediction's (a surface pixel is one that a 4-connected erosion removes; medpy's `hd95`).

Empty masks, the two documented rules:
  * prediction and truth both empty: the image says nothing about class c and is left out of that class's
    per-image averages (it is counted in `n_empty`); counting it as Dice 1 would let every absent class of a
    multi-class set inflate the means;
  * exactly one of them empty (a missed lesion, or one invented where there is none): dice, iou, precision and
    recall are 0, and hd95 is the image diagonal sqrt(H^2 + W^2), a bound on any distance in the image.

`results.json` holds, per foreground class and as their unweighted mean, the per-image averages (`dice`, `iou`,
`hd95`, `precision`, `recall`) and the dataset-level ("global") values computed from TP, FP and FN summed over
all images (`dice_global`, `iou_global`, `precision_global`, `recall_global`); `miou_all_classes` is the
global IoU averaged over every class, background included (the mIoU of mmsegmentation and of the MMOTU
paper). With several foreground classes, `foreground` scores the binary any-class-versus-background map too.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence

import cv2
import numpy as np
from scipy import ndimage

SCALAR_KEYS = ("dice", "iou", "hd95", "precision", "recall", "dice_global", "iou_global", "precision_global",
               "recall_global", "miou_all_classes")
RESULT_KEYS = (*SCALAR_KEYS, "per_class", "foreground", "n_test", "split")
DISTANCE_KEYS = ("hd95",)  # in pixels; every other scalar is a fraction in [0, 1]
CSV_FIELDS = ("id", "class", "gt_pixels", "pred_pixels", "tp", "fp", "fn", "dice", "iou", "precision", "recall",
              "hd95")
_CROSS = ndimage.generate_binary_structure(2, 1)


def surface(mask: np.ndarray) -> np.ndarray:
    """The pixels of a boolean mask that a 4-connected erosion removes (the image border counts as outside)."""
    return mask & ~ndimage.binary_erosion(mask, structure=_CROSS, border_value=0)


def hd95(pred: np.ndarray, truth: np.ndarray) -> float:
    """The 95th percentile of the symmetric surface distances of two non-empty boolean masks, in pixels."""
    if not pred.any() or not truth.any():
        raise ValueError("hd95 needs two non-empty masks; the empty cases follow the module's rules")
    pred_surface, truth_surface = surface(pred), surface(truth)
    to_truth = ndimage.distance_transform_edt(~truth_surface)[pred_surface]
    to_pred = ndimage.distance_transform_edt(~pred_surface)[truth_surface]
    return float(np.percentile(np.concatenate([to_truth, to_pred]), 95))


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


def overlap_scores(tp: int, fp: int, fn: int) -> dict[str, float]:
    """dice, iou, precision, recall of counts; 0 where a denominator is 0 (the one-side-empty rule)."""
    return {"dice": _ratio(2 * tp, 2 * tp + fp + fn), "iou": _ratio(tp, tp + fp + fn),
            "precision": _ratio(tp, tp + fp), "recall": _ratio(tp, tp + fn)}


def image_rows(pred: np.ndarray, truth: np.ndarray, num_classes: int, image_id: str, class_names: Sequence[str],
               distances: bool = True) -> list[dict]:
    """One row per foreground class of one image (CSV_FIELDS); metrics are None when both masks are empty."""
    if pred.shape != truth.shape:
        raise ValueError(f"{image_id}: prediction {pred.shape} and mask {truth.shape} differ in size")
    confusion = np.bincount(truth.astype(np.int64).ravel() * num_classes + pred.astype(np.int64).ravel(),
                            minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    diagonal = math.hypot(*truth.shape)
    rows = []
    for c in range(1, num_classes):
        tp = int(confusion[c, c])
        fp, fn = int(confusion[:, c].sum()) - tp, int(confusion[c].sum()) - tp
        row = {"id": image_id, "class": class_names[c], "gt_pixels": tp + fn, "pred_pixels": tp + fp,
               "tp": tp, "fp": fp, "fn": fn}
        if tp + fp + fn == 0:
            row.update(dice=None, iou=None, precision=None, recall=None, hd95=None)
        else:
            row.update(overlap_scores(tp, fp, fn))
            if not distances:
                row["hd95"] = None
            elif tp + fp == 0 or tp + fn == 0:
                row["hd95"] = diagonal
            else:
                row["hd95"] = hd95(pred == c, truth == c)
        rows.append(row)
    return rows


def _mean(values: list) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def _class_summary(rows: list[dict]) -> dict:
    tp, fp, fn = (sum(r[k] for r in rows) for k in ("tp", "fp", "fn"))
    scored = [r for r in rows if r["dice"] is not None]
    summary = {k: _mean([r[k] for r in scored]) for k in ("dice", "iou", "hd95", "precision", "recall")}
    summary.update({f"{k}_global": v for k, v in overlap_scores(tp, fp, fn).items()})
    summary.update(n_images=len(scored), n_empty=len(rows) - len(scored), gt_pixels=tp + fn, pred_pixels=tp + fp)
    return summary


def segmentation_results(preds: Sequence[np.ndarray], truths: Sequence[np.ndarray], ids: Sequence[str],
                         class_names: Sequence[str], split: str, distances: bool = True
                         ) -> tuple[dict, list[dict]]:
    """(the results.json dict with keys RESULT_KEYS, the per-image rows) of integer class maps.

    `class_names` starts with the background. `distances=False` skips HD95 (cheap validation).
    """
    if not (len(preds) == len(truths) == len(ids)) or not ids:
        raise ValueError(f"need as many predictions, masks and ids, and at least one: got {len(preds)}, "
                         f"{len(truths)}, {len(ids)}")
    num_classes = len(class_names)
    rows, totals = [], np.zeros((num_classes, num_classes), np.int64)
    for pred, truth, image_id in zip(preds, truths, ids):
        rows += image_rows(pred, truth, num_classes, image_id, class_names, distances)
        totals += np.bincount(truth.astype(np.int64).ravel() * num_classes + pred.astype(np.int64).ravel(),
                              minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    per_class = {name: _class_summary([r for r in rows if r["class"] == name]) for name in class_names[1:]}
    results = {k: _mean([s[k] for s in per_class.values()]) for k in SCALAR_KEYS[:-1]}
    union = totals.sum(axis=0) + totals.sum(axis=1) - np.diag(totals)
    results["miou_all_classes"] = float(np.mean(np.diag(totals)[union > 0] / union[union > 0]))
    results["per_class"] = per_class
    results["foreground"] = None
    if num_classes > 2:
        binary = [r for p, t, i in zip(preds, truths, ids) for r in
                  image_rows((p > 0).astype(np.uint8), (t > 0).astype(np.uint8), 2, i, ("background", "any"),
                             distances)]
        results["foreground"] = _class_summary(binary)
    results.update(n_test=len(ids), split=split)
    return results, rows


def write_per_image_csv(path: str, rows: list[dict]) -> None:
    """The per-image, per-class rows as CSV (CSV_FIELDS; empty cells where both masks are empty)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows({k: ("" if row[k] is None else row[k]) for k in CSV_FIELDS} for row in rows)


def _contours(canvas: np.ndarray, class_map: np.ndarray, colour: tuple[int, int, int]) -> None:
    for c in np.unique(class_map[class_map > 0]):
        found, _ = cv2.findContours((class_map == c).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(canvas, found, -1, colour, 1)


def overlay_grid(images: Sequence[np.ndarray], truths: Sequence[np.ndarray], preds: Sequence[np.ndarray],
                 captions: Sequence[str], tile: int = 160, columns: int = 4) -> np.ndarray:
    """A BGR grid: each tile is an image with its ground-truth contour (green) and predicted contour (red).

    Contours are drawn at the tile's resolution from nearest-resized class maps, so thin structures stay
    visible; each tile is captioned (e.g. the image id and its Dice).
    """
    tiles = []
    for image, truth, pred, caption in zip(images, truths, preds, captions):
        gray = image if image.ndim == 2 else image[:, :, 0] if image.shape[2] == 1 else None
        rgb = np.repeat(gray[:, :, None], 3, axis=2) if gray is not None else image
        canvas = cv2.cvtColor(cv2.resize(rgb, (tile, tile), interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2BGR)
        for class_map, colour in ((truth, (0, 200, 0)), (pred, (0, 0, 255))):
            _contours(canvas, cv2.resize(class_map.astype(np.uint8), (tile, tile),
                                         interpolation=cv2.INTER_NEAREST_EXACT), colour)
        cv2.rectangle(canvas, (0, 0), (tile - 1, 15), (0, 0, 0), -1)
        cv2.putText(canvas, caption[:28], (3, 11), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (255, 255, 255), 1, cv2.LINE_AA)
        tiles.append(canvas)
    if not tiles:
        raise ValueError("no image to draw")
    while len(tiles) % columns:
        tiles.append(np.zeros_like(tiles[0]))
    rows = [np.concatenate(tiles[i:i + columns], axis=1) for i in range(0, len(tiles), columns)]
    legend = np.full((18, rows[0].shape[1], 3), 255, np.uint8)
    cv2.putText(legend, "green: ground truth   red: prediction", (3, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1,
                cv2.LINE_AA)
    return np.concatenate([legend, *rows], axis=0)
