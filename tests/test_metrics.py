"""Metrics of usf_mae_jax.evaluators.metrics against scikit-learn on random predictions."""

import json
import math

import cv2
import numpy as np
import pytest
from sklearn import metrics as skm

from usf_mae_jax.evaluators import metrics


def random_predictions(n, num_classes, seed):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, num_classes, n)
    logits = rng.normal(size=(n, num_classes)) + 1.5 * np.eye(num_classes)[y_true]
    prob = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y_true, prob


@pytest.mark.parametrize("num_classes", [2, 8])
def test_metrics_match_sklearn(num_classes):
    y_true, prob = random_predictions(200, num_classes, seed=num_classes)
    names = [f"c{i}" for i in range(num_classes)]
    res = metrics.classification_results(y_true, prob, names, split="fold1/test")
    pred = prob.argmax(1)
    assert tuple(res) == metrics.RESULT_KEYS
    assert res["accuracy"] == pytest.approx(skm.accuracy_score(y_true, pred))
    assert res["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y_true, pred))
    assert res["f1_macro"] == pytest.approx(skm.f1_score(y_true, pred, average="macro"))
    assert res["f1_weighted"] == pytest.approx(skm.f1_score(y_true, pred, average="weighted"))
    assert res["precision_macro"] == pytest.approx(skm.precision_score(y_true, pred, average="macro"))
    assert res["recall_macro"] == pytest.approx(skm.recall_score(y_true, pred, average="macro"))
    assert res["mcc"] == pytest.approx(skm.matthews_corrcoef(y_true, pred))
    if num_classes == 2:
        assert res["auc"] == pytest.approx(skm.roc_auc_score(y_true, prob[:, 1]))
    else:
        expected = skm.roc_auc_score(y_true, prob, multi_class="ovr", average="macro")
        assert res["auc"] == pytest.approx(expected)
    f1 = skm.f1_score(y_true, pred, average=None)
    assert [res["per_class"][n]["f1"] for n in names] == pytest.approx(f1)
    support = np.bincount(y_true, minlength=num_classes).tolist()
    assert [res["per_class"][n]["support"] for n in names] == support
    assert res["confusion_matrix"] == skm.confusion_matrix(y_true, pred).tolist()
    assert res["n_test"] == 200 and res["split"] == "fold1/test"
    # A sanity anchor independent of sklearn: the confusion-matrix diagonal is the accuracy.
    cm = np.array(res["confusion_matrix"])
    assert np.trace(cm) / cm.sum() == pytest.approx(res["accuracy"])


def test_absent_class_and_undefined_auc():
    prob = np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1]])
    res = metrics.classification_results([0, 1, 0], prob, ["a", "b", "c"], split="val")
    assert res["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert res["auc"] == pytest.approx(1.0)  # two present classes: binary AUC on class 1's score
    one = metrics.classification_results([1, 1], prob[:2], ["a", "b", "c"], split="val")
    assert math.isnan(one["auc"])


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="shape"):
        metrics.classification_results([0, 1], np.ones((2, 3)) / 3, ["a", "b"], split="t")
    with pytest.raises(ValueError, match="labels must lie"):
        metrics.classification_results([0, 2], np.ones((2, 2)) / 2, ["a", "b"], split="t")


def test_write_results_and_png(tmp_path):
    y_true, prob = random_predictions(50, 3, seed=1)
    res = metrics.classification_results(y_true, prob, ["x", "y", "z"], split="test")
    res["auc"] = float("nan")
    paths = metrics.write_results(str(tmp_path), res)
    with open(paths["results"]) as f:
        loaded = json.load(f)
    assert list(loaded) == list(metrics.RESULT_KEYS) and loaded["auc"] is None
    image = cv2.imread(paths["confusion_matrix"])
    assert image is not None and image.shape[0] > 3 * 64 and image.shape[2] == 3
    # The cell of the largest row-normalised rate is drawn darkest (blue channel kept, others lowered).
    cm = np.array(res["confusion_matrix"])
    i, j = np.unravel_index(np.argmax(cm / cm.sum(1, keepdims=True)), cm.shape)
    corner = image[28 + 48 + i * 64 + 3, 48 + j * 64 + 3]
    assert corner[0] == 255 and corner[1] < 128


def test_crossval_table_mean_std_and_paper_column():
    runs = [{k: 0.0 for k in metrics.SCALAR_KEYS} for _ in range(3)]
    for run, f1 in zip(runs, (0.80, 0.82, 0.84)):
        run["f1_macro"] = f1
    runs[0]["auc"] = None
    table = metrics.crossval_table(runs, paper=metrics.paper_reference("busbra"), title="BUS-BRA")
    assert "| f1_macro | 82.0 ± 2.0 | 81.6 |" in table
    assert "| mcc | 0.0 ± 0.0 | |" in table
    assert table.startswith("BUS-BRA\n\n| metric | ours (mean ± std, n=3) | paper |")
    stats = metrics.summarize(runs)
    assert stats["auc"] == (0.0, 0.0)  # the None run is left out, not counted as zero
    assert metrics.paper_reference("labelled") == {}
