"""The cross-validation driver: one run per (fold, seed), resumable, and the mean ± std table."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from configs import finetune as finetune_config
from usf_mae_jax.evaluators import metrics
from usf_mae_jax.trainers import crossval


def fake_run(calls: list):
    """A stand-in for a fine-tune run that writes a results.json whose numbers depend on (fold, seed)."""
    def run(config, workdir):
        calls.append((config.fold, config.seed))
        value = 0.5 + 0.1 * config.fold + 0.01 * config.seed
        results = {k: value for k in metrics.SCALAR_KEYS}
        results.update(per_class={}, confusion_matrix=[[1, 0], [0, 1]], n_test=2, split=f"fold{config.fold}")
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(results, f)
    return run


def test_sweep_runs_every_fold_and_seed_and_tabulates_mean_and_std(tmp_path):
    config = finetune_config.get_config("busbra,mode=full")
    calls = []
    crossval.sweep(config, str(tmp_path), [1, 2, 3], [0, 1], run_fn=fake_run(calls))
    assert calls == [(1, 0), (1, 1), (2, 0), (2, 1), (3, 0), (3, 1)]
    assert sorted(os.listdir(tmp_path)) == ["crossval.json", "crossval.md", "fold1_seed0", "fold1_seed1",
                                            "fold2_seed0", "fold2_seed1", "fold3_seed0", "fold3_seed1"]
    values = np.array([0.5 + 0.1 * f + 0.01 * s for f in (1, 2, 3) for s in (0, 1)])
    mean, std = 100 * values.mean(), 100 * values.std(ddof=1)
    table = (tmp_path / "crossval.md").read_text()
    assert f"| mcc | {mean:.1f} ± {std:.1f} |" in table
    assert f"| f1_macro | {mean:.1f} ± {std:.1f} | 81.6 |" in table  # next to the paper's BUS-BRA F1
    assert "n=6" in table and "init: random" in table
    summary = json.loads((tmp_path / "crossval.json").read_text())
    assert len(summary["runs"]) == 6 and summary["runs"][3]["fold"] == 2 and summary["runs"][3]["seed"] == 1
    np.testing.assert_allclose(summary["summary"]["auc"], [values.mean(), values.std(ddof=1)])


def test_finished_runs_are_not_repeated(tmp_path):
    config = finetune_config.get_config("busbra")
    first, second = [], []
    crossval.sweep(config, str(tmp_path), [1, 2], [0], run_fn=fake_run(first))
    os.remove(tmp_path / "fold2_seed0" / "results.json")  # as if fold 2 had been interrupted
    crossval.sweep(config, str(tmp_path), [1, 2], [0], run_fn=fake_run(second))
    assert first == [(1, 0), (2, 0)] and second == [(2, 0)]


def test_config_is_not_mutated_and_lists_are_validated(tmp_path):
    config = finetune_config.get_config("gist514")
    crossval.sweep(config, str(tmp_path), [0, 4], [7], run_fn=fake_run([]))
    assert config.fold is None and config.seed == 0
    assert "| f1_macro |" in (tmp_path / "crossval.md").read_text()
    assert crossval.parse_int_list("1, 2,3", "folds") == [1, 2, 3]
    with pytest.raises(ValueError, match="--folds must be comma-separated integers"):
        crossval.parse_int_list("1,two", "folds")
    with pytest.raises(ValueError, match="--seeds repeats a value"):
        crossval.parse_int_list("0,0", "seeds")


@pytest.mark.slow
def test_command_line_runs_two_real_folds(tmp_path, python_runner):
    """The real CLI on a tiny mock BUS-BRA: two folds of the runlocal fine-tune, then the table."""
    out = python_runner(f"""
        import sys
        from data_prep.benchmarks import convert, mock
        mock.write_busbra_tree("{tmp_path}/raw", patients=12, size=32, seed=0)
        convert("busbra", "{tmp_path}/raw", "{tmp_path}/out")
        from absl import app
        from usf_mae_jax.trainers import crossval
        sys.argv = ["crossval", "--config=configs/finetune.py:busbra,runlocal", "--folds=1,2",
                    "--workdir={tmp_path}/cv", "--config.input.data_dir={tmp_path}/out"]
        try:
            app.run(crossval.main)
        except SystemExit as e:
            assert not e.code, e.code
        """)
    assert "| mcc |" in out and "n=2" in out
    for fold in (1, 2):
        splits = json.loads((tmp_path / "cv" / f"fold{fold}_seed0" / "splits.json").read_text())
        assert splits["fold"] == fold and splits["test"]["ids"]
