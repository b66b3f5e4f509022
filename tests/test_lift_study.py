"""The transfer study (usf_mae_jax/study/lift.py): a smoke run at the tiny size writes lift.md, lift.json and
lift.png from real runs of the loop and resumes without training again; the label budget draws a stratified,
seeded subset; bad arms and budgets are one-line errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from configs import finetune as finetune_configs
from configs import pretrain as pretrain_configs
from usf_mae_jax.cli import ConfigError
from usf_mae_jax.data import downstream
from usf_mae_jax.study import lift


def test_label_subset_is_stratified_seeded_and_whole_at_one():
    labels = np.array([0] * 60 + [1] * 40)
    split = downstream.SplitData("train", [np.full((4, 4, 1), i, np.uint8) for i in range(100)], labels,
                                 [f"id{i}" for i in range(100)])
    subset = downstream.label_subset(split, 0.05, seed=3)
    assert np.bincount(subset.labels).tolist() == [3, 2] and len(subset.images) == 5
    assert all(int(image[0, 0, 0]) == int(i[2:]) for image, i in zip(subset.images, subset.ids))  # rows stay paired
    assert subset.ids == downstream.label_subset(split, 0.05, seed=3).ids
    assert subset.ids != downstream.label_subset(split, 0.05, seed=4).ids
    assert downstream.label_subset(split, 1.0, seed=3) is split
    assert np.bincount(downstream.label_subset(split, 0.001, seed=0).labels).tolist() == [1, 1]  # one per class
    with pytest.raises(ConfigError, match="label_fraction must lie in"):
        downstream.label_subset(split, 0.0, seed=0)


def test_arms_and_budgets_are_checked():
    assert lift.parse_arm("plain") == () and lift.parse_arm("fov+normpix") == ("fov", "normpix")
    for bad in ("fov+fov", "colour", ""):
        with pytest.raises(ConfigError, match="is not 'plain'"):
            lift.parse_arm(bad)
    configs = (pretrain_configs.get_config("demo"), finetune_configs.get_config("busbra"))
    with pytest.raises(ConfigError, match="must start with 'plain'"):
        lift.run_study("unused", "tiny", *configs, 1, [0], ["normpix"], [1.0])
    with pytest.raises(ConfigError, match="--budgets must be fractions"):
        lift.run_study("unused", "tiny", *configs, 1, [0], ["plain"], [0.0])
    with pytest.raises(ConfigError, match="--scale must be one of"):
        lift.run_study("unused", "huge", *configs, 1, [0], ["plain"], [1.0])


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    """The tiny study on its synthetic data: (output folder, payload of the first run)."""
    out = str(tmp_path_factory.mktemp("lift") / "study")
    configs = (pretrain_configs.get_config("demo"), finetune_configs.get_config("busbra"))
    return out, lift.run_study(out, "tiny", *configs, num_folds=1, seeds=[0], arms=["plain"], budgets=[0.5, 1.0])


def test_tiny_study_writes_the_report_and_resumes(tiny_study):
    out, payload = tiny_study
    configs = (pretrain_configs.get_config("demo"), finetune_configs.get_config("busbra"))
    for name in ("lift.md", "lift.json", "lift.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    with open(os.path.join(out, "lift.json")) as f:
        saved = json.load(f)
    # scratch and plain x fine-tune and linear probe x two budgets, one fold, one seed: 8 runs of the loop.
    assert sorted((r["init"], r["mode"], r["budget"]) for r in saved["runs"]) == sorted(
        (i, m, b) for i in ("scratch", "plain") for m in ("full", "linear") for b in (0.5, 1.0))
    assert all(0.0 <= r["f1_macro"] <= 1.0 for r in saved["runs"])
    assert saved["probes"]["plain"]["steps"] == [0, 2, 4]  # the probes ran at step 0 and every eval_steps
    assert len(saved["probes"]["plain"]["ridge_f1_macro"][0]) == 1  # one value per fold
    assert "| fine-tune | 50% |" in payload["markdown"] and "ridge_probe_lift" in payload["markdown"]
    for init in ("scratch", "plain"):
        counts = []
        for budget in ("50pct", "100pct"):
            with open(os.path.join(out, "runs", init, f"full_{budget}", "fold1_seed0", "splits.json")) as f:
                counts.append(len(json.load(f)["train"]["ids"]))
        assert abs(counts[0] - counts[1] / 2) <= 1  # the 50% label budget was applied
    again = lift.run_study(out, "tiny", *configs, num_folds=1, seeds=[0], arms=["plain"], budgets=[0.5, 1.0])
    assert again["timing"]["pretrain_plain_s"] == 0.0
    assert again["runs"] == saved["runs"]


def test_the_study_runs_on_given_shards_and_a_given_benchmark_and_names_them(tiny_study, tmp_path):
    """--pool and --labelled replace the synthetic data (here: the tiny study's own folders, standing in for real
    ones); nothing is generated, and the report names the folders, their records and the benchmark's folds."""
    first, _ = tiny_study
    pool, labelled = os.path.join(first, "data", "pool", "pool"), os.path.join(first, "data", "labelled")
    out = str(tmp_path / "given")
    configs = (pretrain_configs.get_config("demo"), finetune_configs.get_config("busbra"))
    payload = lift.run_study(out, "tiny", *configs, num_folds=2, seeds=[0], arms=["plain"], budgets=[1.0],
                             pool=pool, labelled=labelled)
    assert not os.path.exists(os.path.join(out, "data"))  # no synthetic data was written
    with open(os.path.join(out, "lift.json")) as f:
        settings = json.load(f)["settings"]
    assert settings["folds"] == [1, 2] and not settings["synthetic_pool"] and not settings["synthetic_labelled"]
    assert settings["data"]["pool"] == [{"folder": pool, "dataset": "pool", "records": 48}]
    assert settings["data"]["labelled"].startswith(labelled) and settings["data"]["benchmark"] == "busbra"
    assert "48 real unlabelled frames from `pool` (48)" in payload["markdown"]
    assert f"Labelled set: `busbra` at `{settings['data']['labelled']}`" in payload["markdown"]
    with pytest.raises(ConfigError, match=r"--folds 6: busbra under .* has 5 folds"):
        lift.run_study(out, "tiny", *configs, num_folds=6, seeds=[0], arms=["plain"], budgets=[1.0], pool=pool,
                       labelled=labelled)
