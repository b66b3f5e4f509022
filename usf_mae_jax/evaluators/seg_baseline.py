"""The dark-blob baseline of lesion segmentation: Otsu's threshold on a smoothed image, nothing learned.

    python -m usf_mae_jax.evaluators.seg_baseline --data_dir OUT --dataset busbra [--fold 1] [--subset roi] \
        --out W

Lesions in B-mode ultrasound are hypoechoic, darker than the tissue around them, so the classical first try
is a threshold: smooth the image (Gaussian, sigma 1% of its diagonal, at least 1 px) to tame the speckle,
compute Otsu's threshold over the field of view (the non-black pixels, eroded by the blur's reach), call the
darker class lesion, open it with a disc of the blur's size and keep the largest connected component.
Posterior shadows, fat lobules and deep attenuation are as dark as lesions, which is where it fails; a learned
segmenter has to beat it by a wide margin (docs/segmentation.md, "Measured").

The test split is scored exactly as the segmentation task scores it (evaluators/segmentation.py, binary:
every foreground class is the lesion): W/results.json, W/per_image_metrics.csv and W/test_overlays.png.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import cv2
import numpy as np

from usf_mae_jax import cli
from usf_mae_jax.core import files
from usf_mae_jax.data import segmentation as segdata
from usf_mae_jax.evaluators import segmentation as metrics


def otsu_lesion(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W) 0/1 mask of the largest dark blob of an (H, W[, C]) uint8 image (module docstring)."""
    gray = image.mean(axis=2).astype(np.uint8) if image.ndim == 3 else image
    sigma = max(1.0, 0.01 * math.hypot(*gray.shape))
    reach = max(1, int(round(2 * sigma)))
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * reach + 1, 2 * reach + 1))
    inside = cv2.erode((gray > 0).astype(np.uint8), disc) > 0
    if inside.sum() < 2:
        return np.zeros(gray.shape, np.uint8)
    smooth = cv2.GaussianBlur(gray, (0, 0), sigma)
    threshold, _ = cv2.threshold(smooth[inside].reshape(-1, 1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    dark = cv2.morphologyEx(((smooth <= threshold) & inside).astype(np.uint8), cv2.MORPH_OPEN, disc)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(dark, connectivity=4)
    if count < 2:
        return np.zeros(gray.shape, np.uint8)
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return (labels == largest).astype(np.uint8)


def evaluate(data_dir: str, dataset: str, fold: int | None, subset: str | None, out: str) -> dict:
    """Scores the baseline on the test split and writes its files into `out`; returns the results."""
    data = segdata.load_segmentation(data_dir, dataset, fold, subset, classes="binary")
    test = data.splits["test"]
    preds = [otsu_lesion(image) for image in test.images]
    results, rows = metrics.segmentation_results(preds, test.masks, test.ids, data.mask_class_names,
                                                 f"{data.split_name('test')} (otsu baseline)")
    os.makedirs(out, exist_ok=True)
    files.write_json(os.path.join(out, "results.json"), results, sort_keys=False)
    metrics.write_per_image_csv(os.path.join(out, "per_image_metrics.csv"), rows)
    shown = np.unique(np.linspace(0, len(test) - 1, min(16, len(test))).round().astype(int))
    grid = metrics.overlay_grid([test.images[i] for i in shown], [test.masks[i] for i in shown],
                                [preds[i] for i in shown], [os.path.basename(test.ids[i]) for i in shown])
    cv2.imwrite(os.path.join(out, "test_overlays.png"), grid)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m usf_mae_jax.evaluators.seg_baseline",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", required=True, help="the converter's --out_dir (a conversion with masks)")
    parser.add_argument("--dataset", default="busbra", choices=["busbra", "busi", "mmotu", "gist514", "labelled"])
    parser.add_argument("--fold", type=int, default=None, help="the official round (default: the benchmark's)")
    parser.add_argument("--subset", default=None, help="GIST514-DB roi | raw")
    parser.add_argument("--out", required=True, help="folder for results.json, the CSV and the overlays")
    parser.add_argument("--verbose", action="store_true", help="show the traceback of expected errors")
    args = parser.parse_args(argv)

    def work() -> int:
        results = evaluate(args.data_dir, args.dataset, args.fold, args.subset, args.out)
        print(f"otsu baseline on {results['split']}: Dice {results['dice']:.4f}, IoU {results['iou']:.4f}, "
              f"HD95 {results['hd95']:.1f} px (n={results['n_test']})")
        return 0

    return cli.run_cli(work, parser.prog, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
