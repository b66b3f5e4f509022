"""The baselines of the comparison table (usf_mae_jax/study/baselines.py): their results, their determinism, the
label budget, that they learn what is trivially learnable, that selection uses the validation split, and the
command line (one-line errors, skipping a finished run)."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch
from helpers import converted_busbra, read_json
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.preprocessing import StandardScaler

from configs import finetune, segment
from usf_mae_jax.cli import ConfigError
from usf_mae_jax.data import downstream
from usf_mae_jax.data import segmentation as segdata
from usf_mae_jax.evaluators import metrics
from usf_mae_jax.evaluators import segmentation as segmetrics
from usf_mae_jax.study import baselines

torch.set_num_threads(1)  # two shared cores: more threads oversubscribe them and slow torch down many times

RUN_KEYS = ("model", "n_train", "epochs", "best_epoch", "train_seconds")


def _split(name: str, images: list[np.ndarray], labels) -> downstream.SplitData:
    return downstream.SplitData(name, images, np.asarray(labels, np.int64), [f"{name}/{i}" for i in range(len(images))])


def brightness_benchmark(num_classes: int = 3, per_class=(16, 8, 12), size: int = 32, seed: int = 0):
    """Classes that differ only in mean brightness (60 ... 200) under Gaussian noise (std 25)."""
    rng = np.random.default_rng(seed)
    levels = np.linspace(60, 200, num_classes)
    splits = {}
    for name, count in zip(downstream.SPLITS, per_class):
        labels = np.repeat(np.arange(num_classes), count)
        splits[name] = _split(name, [np.clip(rng.normal(levels[c], 25, (size, size, 1)), 0, 255).astype(np.uint8)
                                     for c in labels], labels)
    return downstream.BenchmarkData("mock", None, None, "", [f"level{c}" for c in range(num_classes)], 1, splits)


def faint_square_benchmark(seed: int = 0, count: int = 30, size: int = 16):
    """Two classes told apart by a faint +12 square under noise of std 40 (a hard, C-sensitive task). The test
    split is the validation images with inverted labels: a C picked on it would be the worst one on validation."""
    rng = np.random.default_rng(seed)
    splits = {}
    for name in ("train", "validation"):
        labels = np.arange(count) % 2
        images = []
        for label in labels:
            image = rng.normal(128, 40, (size, size))
            image[4:10, 4:10] += 12 * label
            images.append(np.clip(image, 0, 255).astype(np.uint8)[:, :, None])
        splits[name] = _split(name, images, labels)
    splits["test"] = _split("test", splits["validation"].images, 1 - splits["validation"].labels)
    return downstream.BenchmarkData("mock", None, None, "", ["a", "b"], 1, splits)


def disc_segmentation(per_split=(48, 12, 16), seed: int = 0):
    """Noisy grey frames of stored sizes 36-55 px holding a bright disc (the lesion, radius 5-9) and a dark
    disc (a distractor, radius 7): trivial to learn, while Otsu's dark-blob rule finds the distractor."""
    rng = np.random.default_rng(seed)
    splits = {}
    for name, count in zip(downstream.SPLITS, per_split):
        images, masks = [], []
        for _ in range(count):
            height, width = rng.integers(36, 56, 2)
            image = np.clip(rng.normal(110, 20, (height, width)), 1, 255)
            rows, cols = np.mgrid[:height, :width]
            cy, cx = rng.integers(10, height - 10), rng.integers(10, width - 10)
            lesion = (rows - cy) ** 2 + (cols - cx) ** 2 <= rng.uniform(5, 9) ** 2
            dy, dx = (cy + height // 2) % height, (cx + width // 2) % width
            image[lesion] = 200
            image[((rows - dy) ** 2 + (cols - dx) ** 2 <= 49) & ~lesion] = 15
            images.append(image.astype(np.uint8)[:, :, None])
            masks.append(lesion.astype(np.uint8))
        splits[name] = segdata.MaskedSplit(name, images, np.zeros(count, np.int64),
                                           [f"{name}/{i}" for i in range(count)], masks)
    return segdata.SegmentationData("mock", None, None, "", ["lesion"], 1, splits, ["background", "lesion"])


def without_timing(results: dict) -> dict:
    return {k: v for k, v in results.items() if k != "train_seconds"}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return converted_busbra(tmp_path_factory.mktemp("busbra"), patients=20, size=32, seed=0)


# ------------------------------------------------------------------------------------------ protocol


def test_the_augmentations_are_the_tasks_defaults():
    fine, seg = finetune.get_config("busbra").input, segment.get_config("busbra").input
    assert {k: fine[k] for k in baselines.CLASSIFICATION_INPUT} == baselines.CLASSIFICATION_INPUT
    assert {k: seg[k] for k in baselines.SEGMENTATION_INPUT} == baselines.SEGMENTATION_INPUT


def test_classifiers_return_the_task_keys_and_learn_brightness_classes():
    data = brightness_benchmark()
    logreg = baselines.pixels_logreg(data, img_size=32)
    cnn = baselines.small_cnn(data, img_size=32, epochs=3, batch_size=8, lr=3e-3)
    for results in (logreg, cnn):
        assert set(metrics.RESULT_KEYS) | set(RUN_KEYS) <= set(results)
        assert results["n_train"] == 48 and results["n_test"] == 36
        assert results["split"] == "mock/folddefault/test"
        assert np.asarray(results["confusion_matrix"]).shape == (3, 3)
        # 36 test images in 3 classes: chance macro-F1 is about 1/3; 0.9 cannot be reached by luck
        assert results["f1_macro"] > 0.9 and results["auc"] > 0.95
    assert cnn["epochs"] == 3 and len(cnn["validation_history"]) == 3
    assert cnn["validation"] == max(cnn["validation_history"])
    assert cnn["best_epoch"] == 1 + cnn["validation_history"].index(cnn["validation"])
    assert logreg["epochs"] is None and logreg["C"] in baselines.C_GRID


def test_small_cnn_is_deterministic_for_a_seed():
    data = faint_square_benchmark()
    first, again = (baselines.small_cnn(data, img_size=16, epochs=2, batch_size=8, seed=3) for _ in range(2))
    other = baselines.small_cnn(data, img_size=16, epochs=2, batch_size=8, seed=4)
    assert without_timing(first) == without_timing(again)
    assert first["validation_history"] != other["validation_history"] or first["auc"] != other["auc"]


def test_logreg_picks_c_on_validation_not_test():
    data = faint_square_benchmark()
    results = baselines.pixels_logreg(data, img_size=16)
    pixels = {name: np.stack([image.reshape(-1) for image in split.images]).astype(np.float64)
              for name, split in data.splits.items()}
    scaler = StandardScaler().fit(pixels["train"])
    validation, test = {}, {}
    for c in baselines.C_GRID:
        model = LogisticRegression(C=c, class_weight="balanced", max_iter=5000).fit(
            scaler.transform(pixels["train"]), data.splits["train"].labels)
        for scores, name in ((validation, "validation"), (test, "test")):
            scores[c] = f1_score(data.splits[name].labels, model.predict(scaler.transform(pixels[name])),
                                 average="macro")
    best_on_validation = max(baselines.C_GRID, key=lambda c: validation[c])
    assert max(baselines.C_GRID, key=lambda c: test[c]) != best_on_validation  # the check can tell them apart
    assert results["validation_f1_macro_by_C"] == pytest.approx({str(c): v for c, v in validation.items()})
    assert results["C"] == best_on_validation
    assert results["f1_macro"] == pytest.approx(test[best_on_validation])


def test_the_label_budget_reduces_the_training_set_and_keeps_masks_with_their_images():
    data = brightness_benchmark()
    assert baselines.pixels_logreg(data, img_size=32, label_fraction=0.25)["n_train"] == 3 * 4
    segmentation = disc_segmentation()
    train = segmentation.splits["train"]
    subset = baselines._budget(train, 0.25, seed=1)
    assert isinstance(subset, segdata.MaskedSplit) and len(subset) == 12
    assert subset.ids == downstream.label_subset(train, 0.25, seed=1).ids
    for record, image, mask in zip(subset.ids, subset.images, subset.masks):
        index = train.ids.index(record)
        assert image is train.images[index] and mask is train.masks[index]
    results = baselines.small_unet(segmentation, img_size=32, epochs=1, batch_size=4, label_fraction=0.25)
    assert results["n_train"] == 12


def test_small_unet_learns_a_trivial_lesion_that_otsu_misses():
    data = disc_segmentation()
    unet = baselines.small_unet(data, img_size=32, epochs=3, batch_size=8)
    threshold = baselines.otsu(data)
    for results in (unet, threshold):
        assert set(segmetrics.RESULT_KEYS) | set(RUN_KEYS) <= set(results)
        assert results["n_test"] == 16
    # an all-background prediction scores Dice 0 on every image (each holds a lesion)
    assert unet["dice"] > 0.7 and unet["dice"] > threshold["dice"] + 0.4
    assert unet["best_epoch"] == 1 + unet["validation_history"].index(unet["validation"])
    again = baselines.small_unet(data, img_size=32, epochs=3, batch_size=8)
    assert without_timing(again) == without_timing(unet)
    other = baselines.small_unet(data, img_size=32, epochs=3, batch_size=8, seed=1)
    assert other["validation_history"] != unet["validation_history"]


def test_the_torch_baselines_need_torch(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(ConfigError, match=r"^the small_cnn baseline needs torch: pip install torch==2\.13\.0$"):
        baselines.small_cnn(brightness_benchmark(), img_size=32)
    with pytest.raises(ConfigError, match="the small_unet baseline needs torch"):
        baselines.small_unet(disc_segmentation(), img_size=32)


def test_bad_settings_fail_with_config_errors():
    with pytest.raises(ConfigError, match="multiple of 8"):
        baselines.small_unet(disc_segmentation(), img_size=36)
    with pytest.raises(ConfigError, match="epochs and batch_size must be positive"):
        baselines.small_cnn(brightness_benchmark(), img_size=32, epochs=0)
    with pytest.raises(ConfigError, match="unknown baseline"):
        baselines.run("resnet", brightness_benchmark())


# ------------------------------------------------------------------------------------------ command line


def cli(bench_dir: str, out: str, model: str, *extra: str) -> int:
    return baselines.main(["--model", model, "--data_dir", bench_dir, "--benchmark", "busbra", "--fold", "1",
                           "--img_size", "32", "--epochs", "2", "--batch_size", "8", "--out", out, *extra])


def test_cli_runs_each_baseline_on_a_converted_benchmark(bench, tmp_path, capsys):
    for model in baselines.MODELS:
        assert cli(bench, str(tmp_path / model), model) == 0
        results = read_json(tmp_path / model / "results.json")
        assert results["model"] == model and results["settings"]["model"] == model
        assert results["split"] == "busbra/fold1/test"
        assert set(RUN_KEYS) <= set(results)
    assert read_json(tmp_path / "small_cnn" / "results.json")["settings"] == {
        "model": "small_cnn", "benchmark": "busbra", "fold": 1, "subset": None, "img_size": 32, "label_fraction": 1.0,
        "seed": 0, "epochs": 2, "batch_size": 8, "lr": 1e-3, "warmup_epochs": 1.0}
    assert "dice" in read_json(tmp_path / "small_unet" / "results.json")
    assert "small_unet on busbra/fold1/test: dice" in capsys.readouterr().out


def test_cli_skips_a_finished_run_and_refuses_to_replace_another(bench, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert cli(bench, out, "otsu") == 0
    path = os.path.join(out, "results.json")
    with open(path) as f:
        finished = json.load(f)
    finished["dice"] = -1.0  # a marker: a skipped run leaves the file alone
    with open(path, "w") as f:
        json.dump(finished, f)
    capsys.readouterr()
    assert cli(bench, out, "otsu") == 0
    assert read_json(path)["dice"] == -1.0 and "dice -1.0000" in capsys.readouterr().out
    assert cli(bench, out, "pixels_logreg") == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "holds a finished run with other settings" in error and "--overwrite" in error
    assert read_json(path)["dice"] == -1.0
    assert cli(bench, out, "pixels_logreg", "--overwrite") == 0
    assert read_json(path)["model"] == "pixels_logreg"


def test_cli_errors_are_one_line(bench, tmp_path, capsys, monkeypatch):
    assert cli(str(tmp_path / "missing"), str(tmp_path / "a"), "otsu") == 2
    error = capsys.readouterr().err.strip()
    assert error == f"python -m usf_mae_jax.study.baselines: input.data_dir {tmp_path / 'missing'} is not a directory"
    monkeypatch.setitem(sys.modules, "torch", None)
    assert cli(bench, str(tmp_path / "b"), "small_cnn") == 2
    assert capsys.readouterr().err.strip() == ("python -m usf_mae_jax.study.baselines: the small_cnn baseline needs "
                                               "torch: pip install torch==2.13.0")
    assert not os.path.exists(tmp_path / "a" / "results.json")
