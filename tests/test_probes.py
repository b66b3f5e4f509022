"""Probe evaluators during pretraining: ridge and k-NN against scikit-learn, the cadence with step 0, the log
files, and feature extraction sharded over 8 devices equal to one device."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from helpers import converted_busbra, read_events, scalar_steps
from sklearn.linear_model import Ridge
from sklearn.neighbors import KNeighborsClassifier

from configs import pretrain as pretrain_configs
from usf_mae_jax.cli import ConfigError
from usf_mae_jax.evaluators import probes
from usf_mae_jax.trainers import loop
from usf_mae_jax.trainers.pretrain import PretrainTask


def features(seed, n, d=16, classes=3):
    """Noisy points around three fixed class centres (the same centres for every seed)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    centres = np.random.default_rng(100).normal(size=(classes, d))
    return centres[labels] + rng.normal(scale=1.5, size=(n, d)), labels


def test_ridge_probe_equals_scikit_learn():
    (train_x, train_y), (test_x, test_y) = features(0, 120), features(1, 60)
    ours = probes.ridge_predict(train_x, train_y, test_x, 3, l2=1e-2)
    ridge = Ridge(alpha=1e-2 * len(train_x)).fit(train_x, np.eye(3)[train_y])
    np.testing.assert_array_equal(ours, ridge.predict(test_x).argmax(axis=1))
    assert (ours == test_y).mean() > 0.6  # it learned something


def test_knn_probe_equals_scikit_learn_with_cosine_distance():
    (train_x, train_y), (test_x, _) = features(2, 150), features(3, 80)
    ours = probes.knn_predict(train_x, train_y, test_x, 3, k=20)
    knn = KNeighborsClassifier(n_neighbors=20, metric="cosine", algorithm="brute").fit(train_x, train_y)
    np.testing.assert_array_equal(ours, knn.predict(test_x))
    assert probes.knn_predict(train_x[:5], train_y[:5], test_x, 3, k=20).shape == (80,)  # k capped at n


def test_probe_sets_are_parsed_and_checked():
    assert probes.parse_sets("busbra:1, gist514:0@raw,mmotu") == [("busbra", 1, None), ("gist514", 0, "raw"),
                                                                   ("mmotu", None, None)]
    assert probes.parse_sets("") == []
    with pytest.raises(ConfigError, match="is not DATASET"):
        probes.parse_sets("busbra:one")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return converted_busbra(tmp_path_factory.mktemp("probe_bench"), patients=12, size=32, seed=3)


def probe_config(bench, **fields):
    config = pretrain_configs.get_config("demo,runlocal")
    config.evals.update(sets="busbra:1", data_dir=bench, batch_size=8)
    config.update(total_steps=4, eval_steps=2, vis_steps=0, **fields)
    return config


def test_probes_run_at_step_0_and_every_eval_steps_into_tensorboard_and_evals_jsonl(bench, tmp_path):
    config = probe_config(bench)
    workdir = str(tmp_path / "run")
    loop.run(config, workdir, PretrainTask(config))
    with open(os.path.join(workdir, "evals.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    assert [e["step"] for e in lines] == [0, 2, 4]
    keys = {"busbra_fold1/ridge_accuracy", "busbra_fold1/ridge_f1_macro", "busbra_fold1/knn_accuracy",
            "busbra_fold1/knn_f1_macro"}
    assert all(keys <= set(e) and all(0.0 <= e[k] <= 1.0 for k in keys) for e in lines)
    events = read_events(next(os.path.join(workdir, "tensorboard", f)
                              for f in os.listdir(os.path.join(workdir, "tensorboard"))))
    assert scalar_steps(events, "eval/busbra_fold1/knn_accuracy") == [0, 2, 4]


def test_feature_extraction_sharded_over_8_devices_equals_one_device(bench, python_runner):
    out = python_runner(f"""
        import jax, numpy as np
        from flax import nnx
        from configs import pretrain as cfgs
        from usf_mae_jax.core import sharding
        from usf_mae_jax.evaluators import probes
        from usf_mae_jax.models import vit
        from usf_mae_jax.models.mae import MaskedAutoencoder
        config = cfgs.get_config("demo,runlocal")
        config.evals.update(sets="busbra:1", data_dir="{bench}", batch_size=8)
        model_config = vit.config_from_block(config.model)
        graphdef, params = nnx.split(MaskedAutoencoder(model_config, rngs=nnx.Rngs(0)))
        results = []
        for devices in (jax.devices()[:1], jax.devices()):
            config.mesh.update(data=-1, fsdp=1)
            mesh = sharding.make_mesh(config.mesh, devices)
            evaluator = probes.ProbeEvaluator(config.evals, graphdef, model_config, mesh)
            results.append(evaluator.features(params, evaluator.sets[0].score))
        assert len(jax.devices()) == 8 and results[0].shape[0] == len(evaluator.sets[0].score)
        np.testing.assert_allclose(results[0], results[1], rtol=1e-5, atol=1e-5)
        print("SAME", results[0].shape)
    """, devices=8)
    assert "SAME" in out
