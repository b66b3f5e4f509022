"""Classification metrics of the downstream evaluation, their report files and the cross-validation table.

Every number comes from scikit-learn, so that our figures are comparable with the papers that report
USF-MAE and its baselines. The entry points are:

    results = classification_results(y_true, y_prob, class_names, split="fold1/test")
    write_results(workdir, results)                  # W/results.json and W/confusion_matrix.png
    table = crossval_table([results_fold1, ...], paper=PAPER_F1["busbra"])   # markdown, mean ± std

`results.json` has exactly the keys of `RESULT_KEYS`. Scalar metrics are fractions in [0, 1]; the table
prints them as percentages, the unit of the paper.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

import cv2
import numpy as np
from sklearn import metrics as skm

RESULT_KEYS = ("accuracy", "balanced_accuracy", "f1_macro", "f1_weighted", "f1_binary", "precision_macro",
               "recall_macro", "auc", "mcc", "per_class", "confusion_matrix", "n_test", "split")
SCALAR_KEYS = ("accuracy", "balanced_accuracy", "f1_macro", "f1_weighted", "f1_binary", "precision_macro",
               "recall_macro", "auc", "mcc")

# USF-MAE's reported F1 (%), from the abstract of arXiv 2510.22990 (docs/usf_mae_recipe.md).
PAPER_F1 = {"busbra": 81.6, "mmotu": 79.6, "gist514": 82.4}


def _check_inputs(y_true: np.ndarray, y_prob: np.ndarray, num_classes: int) -> None:
    if y_true.ndim != 1:
        raise ValueError(f"labels must be a 1-D array, got shape {y_true.shape}")
    if y_prob.shape != (y_true.shape[0], num_classes):
        raise ValueError(f"probabilities must have shape (n, num_classes) = "
                         f"{(y_true.shape[0], num_classes)}, got {y_prob.shape}")
    if y_true.size == 0:
        raise ValueError("cannot compute metrics on an empty set")
    if y_true.min() < 0 or y_true.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{y_true.min()}, {y_true.max()}]")


def roc_auc(y_true: np.ndarray, y_prob: np.ndarray) -> float:
    """Binary ROC-AUC on the positive-class score, or the one-vs-rest macro AUC for more classes.

    Classes absent from `y_true` have no ROC curve; the macro average then runs over the present classes
    (with the scores renormalised over them, as scikit-learn's multiclass AUC requires). Returns NaN when
    fewer than two classes are present, where AUC is undefined.
    """
    num_classes = y_prob.shape[1]
    present = np.unique(y_true)
    if present.size < 2:
        return float("nan")
    if num_classes == 2:
        return float(skm.roc_auc_score(y_true, y_prob[:, 1]))
    if present.size == 2:
        positive = present[1]
        return float(skm.roc_auc_score(y_true == positive, y_prob[:, positive]))
    scores = y_prob[:, present]
    scores = scores / np.clip(scores.sum(axis=1, keepdims=True), 1e-12, None)
    return float(skm.roc_auc_score(y_true, scores, multi_class="ovr", average="macro", labels=present))


def classification_results(y_true, y_prob, class_names: Sequence[str], split: str) -> dict:
    """All the metrics of one evaluation, as the `results.json` dict (keys `RESULT_KEYS`).

    Args:
      y_true: (n,) integer labels.
      y_prob: (n, C) class probabilities (softmax outputs); the prediction is their argmax.
      class_names: the C class names, in label order.
      split: which split was evaluated, e.g. "fold1/test", recorded for the audit trail.
    """
    y_true = np.asarray(y_true).astype(np.int64)
    y_prob = np.asarray(y_prob, np.float64)
    labels = np.arange(len(class_names))
    _check_inputs(y_true, y_prob, len(class_names))
    y_pred = y_prob.argmax(axis=1)
    prec, rec, f1, support = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels,
                                                                 zero_division=0)
    per_class = {name: {"precision": float(prec[i]), "recall": float(rec[i]), "f1": float(f1[i]),
                        "support": int(support[i])} for i, name in enumerate(class_names)}
    averaged = dict(labels=labels, zero_division=0)
    return {
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(y_true, y_pred)),
        "f1_macro": float(skm.f1_score(y_true, y_pred, average="macro", **averaged)),
        "f1_weighted": float(skm.f1_score(y_true, y_pred, average="weighted", **averaged)),
        # Two classes: the F1 of the positive class (label 1: malignant, GIST), which the paper's single
        # "F1" may be; None for more classes.
        "f1_binary": (float(skm.f1_score(y_true, y_pred, average="binary", pos_label=1, zero_division=0))
                      if len(class_names) == 2 else None),
        "precision_macro": float(skm.precision_score(y_true, y_pred, average="macro", **averaged)),
        "recall_macro": float(skm.recall_score(y_true, y_pred, average="macro", **averaged)),
        "auc": roc_auc(y_true, y_prob),
        "mcc": float(skm.matthews_corrcoef(y_true, y_pred)),
        "per_class": per_class,
        "confusion_matrix": skm.confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "n_test": int(y_true.size),
        "split": split,
    }


def _json_safe(value):
    """NaN (an undefined AUC) is written as null, since strict JSON has no NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def write_results(workdir: str, results: dict, class_names: Sequence[str] | None = None) -> dict[str, str]:
    """Writes `workdir/results.json` and `workdir/confusion_matrix.png`; returns their paths."""
    missing = [k for k in RESULT_KEYS if k not in results]
    if missing:
        raise ValueError(f"results lack the keys {missing}")
    os.makedirs(workdir, exist_ok=True)
    paths = {"results": os.path.join(workdir, "results.json"),
             "confusion_matrix": os.path.join(workdir, "confusion_matrix.png")}
    with open(paths["results"], "w") as f:
        json.dump(_json_safe({k: results[k] for k in RESULT_KEYS}), f, indent=2)
    names = list(class_names) if class_names is not None else list(results["per_class"])
    write_confusion_png(paths["confusion_matrix"], np.asarray(results["confusion_matrix"]), names,
                        title=f"{results['split']}  n={results['n_test']}")
    return paths


def confusion_image(matrix: np.ndarray, class_names: Sequence[str], title: str = "",
                    cell: int = 64) -> np.ndarray:
    """Draws a confusion matrix as a BGR uint8 image with OpenCV (rows: true class, columns: predicted).

    Cell shade is the row-normalised rate, so a small class reads as clearly as a large one; each cell shows
    its count. Class names are numbered in the margins and listed in a legend below the grid.
    """
    matrix = np.asarray(matrix, np.int64)
    n = matrix.shape[0]
    if matrix.shape != (n, n) or len(class_names) != n:
        raise ValueError(f"confusion matrix {matrix.shape} does not match {len(class_names)} class names")
    font, margin, line = cv2.FONT_HERSHEY_SIMPLEX, 48, 18
    legend = [f"{i}: {name}" for i, name in enumerate(class_names)]
    width = max(margin + n * cell + 16, 16 + 8 * max(len(s) for s in [title, *legend]))
    height = 28 + margin + n * cell + 12 + line * n
    image = np.full((height, width, 3), 255, np.uint8)
    cv2.putText(image, title, (8, 20), font, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    top = 28 + margin
    rates = matrix / np.clip(matrix.sum(axis=1, keepdims=True), 1, None)
    for i in range(n):
        cv2.putText(image, str(i), (margin - 20, top + i * cell + cell // 2 + 5), font, 0.45, (0, 0, 0), 1,
                    cv2.LINE_AA)
        cv2.putText(image, str(i), (margin + i * cell + cell // 2 - 5, top - 8), font, 0.45, (0, 0, 0), 1,
                    cv2.LINE_AA)
        for j in range(n):
            shade = round(255 * (1.0 - float(rates[i, j])))
            x0, y0 = margin + j * cell, top + i * cell
            cv2.rectangle(image, (x0, y0), (x0 + cell - 1, y0 + cell - 1), (255, shade, shade), -1)
            cv2.rectangle(image, (x0, y0), (x0 + cell - 1, y0 + cell - 1), (128, 128, 128), 1)
            colour = (255, 255, 255) if rates[i, j] > 0.5 else (0, 0, 0)
            text = str(matrix[i, j])
            size = cv2.getTextSize(text, font, 0.45, 1)[0]
            cv2.putText(image, text, (x0 + (cell - size[0]) // 2, y0 + (cell + size[1]) // 2), font, 0.45,
                        colour, 1, cv2.LINE_AA)
    for i, text in enumerate(legend):
        cv2.putText(image, text, (8, top + n * cell + 12 + line * (i + 1) - 4), font, 0.45, (0, 0, 0), 1,
                    cv2.LINE_AA)
    return image


def write_confusion_png(path: str, matrix: np.ndarray, class_names: Sequence[str], title: str = "") -> None:
    if not cv2.imwrite(path, confusion_image(matrix, class_names, title)):
        raise OSError(f"could not write the confusion-matrix image {path}")


def summarize(results: Sequence[dict], keys: Sequence[str] = SCALAR_KEYS) -> dict[str, tuple[float, float]]:
    """Mean and sample standard deviation (ddof=1; 0 for a single run) of each scalar metric over runs.

    Undefined values (a NaN or null AUC) are left out of that metric's statistics.
    """
    if not results:
        raise ValueError("no results to summarise")
    summary = {}
    for key in keys:
        values = np.array([np.nan if r[key] is None else r[key] for r in results], np.float64)
        values = values[~np.isnan(values)]
        if values.size == 0:
            summary[key] = (float("nan"), float("nan"))
        else:
            summary[key] = (float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else 0.0)
    return summary


def crossval_table(results: Sequence[dict], paper: dict[str, float] | None = None, title: str = "",
                   keys: Sequence[str] = SCALAR_KEYS, raw_keys: Sequence[str] = ()) -> str:
    """A markdown table of mean ± std (in %) of every scalar metric over folds/seeds.

    `paper` maps metric keys to the published value in % (e.g. `{"f1_macro": 81.6}`); when given, a
    "paper" column is added so the table reads as the comparison. `keys` are the metrics tabulated (the
    segmentation task passes its own); those in `raw_keys` (e.g. HD95 in pixels) are printed as they are,
    not as percentages.
    """
    summary = summarize(results, keys)
    header = f"| metric | ours (mean ± std, n={len(results)}) |" + (" paper |" if paper else "")
    rule = "|---|---|" + ("---|" if paper else "")
    rows = [header, rule]
    for key, (mean, std) in summary.items():
        scale = 1 if key in raw_keys else 100
        cell = "n/a" if math.isnan(mean) else f"{scale * mean:.1f} ± {scale * std:.1f}"
        row = f"| {key} | {cell} |"
        if paper:
            row += f" {paper[key]:.1f} |" if key in paper else " |"
        rows.append(row)
    text = "\n".join(rows) + "\n"
    return f"{title}\n\n{text}" if title else text


def paper_reference(benchmark: str) -> dict[str, float]:
    """The published USF-MAE numbers for a benchmark, keyed by metric, for `crossval_table(paper=...)`.

    The paper reports one F1 per benchmark without saying macro or weighted (docs/usf_mae_recipe.md); we put it
    next to our macro F1, the likelier protocol, and report weighted F1 beside it.
    """
    if benchmark not in PAPER_F1:
        return {}
    return {"f1_macro": PAPER_F1[benchmark]}
