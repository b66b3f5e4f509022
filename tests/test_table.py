"""The real-data table driver (usf_mae_jax/study/table.py) on a mock benchmark and a 4-step pretraining: every
row runs with the same budgets, folds and seeds, the scratch row copies the init's architecture, the probes'
L2 is chosen on validation, the command resumes without training again, and finished tasks merge into one
markdown table."""

from __future__ import annotations

import json
import os

import pytest
from helpers import converted_busbra

from configs import pretrain as pretrain_config
from usf_mae_jax.cli import ConfigError
from usf_mae_jax.study import table
from usf_mae_jax.trainers import loop, registry


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("table")
    bench = converted_busbra(root / "busbra", patients=16, size=32, seed=3)
    pre = str(root / "pretrain")
    config = pretrain_config.get_config("demo,runlocal")  # mu, 32 px, patch 8, 4 steps
    loop.run(config, pre, registry.create(config))
    return bench, pre, root


def settings_for(bench: str, pre: str, config: str = "configs/finetune.py:busbra") -> table.Settings:
    return table.Settings(config, bench, pre, folds=(1,), seeds=(0,), budgets=(0.5, 1.0), epochs=1.0,
                          low_epochs=2.0, img_size=32, batch_size=8)


def test_classification_rows_share_budgets_and_architecture_and_resume(setup):
    bench, pre, root = setup
    out = str(root / "cls")
    rows = ["vit_scratch", "vit_pretrained", "linear_probe", "ridge_probe"]
    payload = table.run_table(settings_for(bench, pre), out, rows)
    assert sorted((r["row"], r["budget"]) for r in payload["runs"]) == sorted(
        (row, b) for row in rows for b in (0.5, 1.0))
    assert all(0.0 <= r["f1_macro"] <= 1.0 for r in payload["runs"])
    scratch = os.path.join(out, "runs", "vit_scratch", "50pct", "fold1_seed0")
    with open(os.path.join(scratch, "config.json")) as f:
        resolved = json.load(f)["resolved_model"]
    with open(os.path.join(pre, "config.json")) as f:
        pretrained = json.load(f)["resolved_model"]
    assert {k: resolved[k] for k in table.ARCHITECTURE} == {k: pretrained[k] for k in table.ARCHITECTURE}
    with open(os.path.join(scratch, "config.json")) as f:
        saved = json.load(f)
    assert saved["total_epochs"] == 2.0 and saved["label_fraction"] == 0.5 and saved["init"] is None
    with open(os.path.join(scratch, "splits.json")) as f:
        low = len(json.load(f)["train"]["ids"])
    with open(os.path.join(out, "runs", "vit_scratch", "100pct", "fold1_seed0", "splits.json")) as f:
        full = len(json.load(f)["train"]["ids"])
    assert abs(low - full / 2) <= 1
    with open(os.path.join(out, "runs", "ridge_probe", "50pct", "fold1_seed0.json")) as f:
        ridge = json.load(f)
    assert ridge["l2"] in table.RIDGE_GRID and ridge["pool"] in table.PROBE_POOLS and ridge["n_train"] == low
    assert 0.0 <= ridge["validation_f1_macro"] <= 1.0
    with open(os.path.join(out, "table.md")) as f:
        markdown = f.read()
    assert "| vit_pretrained |" in markdown and "f1_macro @ 50%" in markdown
    mtime = os.path.getmtime(os.path.join(scratch, "results.json"))
    again = table.run_table(settings_for(bench, pre), out, rows)  # everything finished: nothing retrained
    assert again["runs"] == payload["runs"] and os.path.getmtime(os.path.join(scratch, "results.json")) == mtime
    assert "### configs/finetune.py:busbra" in table.merged_markdown([out])


def test_segmentation_rows(setup):
    bench, pre, root = setup
    out = str(root / "seg")
    payload = table.run_table(settings_for(bench, pre, "configs/segment.py:busbra"), out,
                              ["vit_scratch", "vit_pretrained"])
    assert payload["kind"] == "segmentation"
    assert all(0.0 <= r["dice"] <= 1.0 for r in payload["runs"]) and len(payload["runs"]) == 4


def test_bad_rows_and_configs_are_one_line_errors(setup, tmp_path):
    bench, pre, _ = setup
    with pytest.raises(ConfigError, match="are not segmentation rows"):
        table.run_table(settings_for(bench, pre, "configs/segment.py:busbra"), str(tmp_path), ["ridge_probe"])
    with pytest.raises(ConfigError, match="must be a fine-tuning"):
        table.run_table(settings_for(bench, pre, "configs/finetune.py:busbra,mode=linear"), str(tmp_path))
    with pytest.raises(ConfigError, match=r"holds no table\.json"):
        table.merged_markdown([str(tmp_path)])
