"""Few-second probes of an encoder's features, run during pretraining so that a long run shows whether its
representation improves (the loss alone does not say it; big_vision's few-shot evaluators serve the same
purpose).

For each labelled set named in `config.evals.sets` (converted benchmarks or `labelled` datasets under
`config.evals.data_dir`, e.g. "busbra:1,gist514:0@raw"), the encoder's
features of a fitting split and a scoring split are extracted (sharded over the mesh, every process taking
its rows), then two closed-form probes are fitted on the host:

  * `ridge`: ridge regression of the features onto one-hot labels, bias unpenalised (features centred with
    the fitting split's mean), predicting the argmax; one linear solve;
  * `knn`: k-nearest neighbours by cosine similarity (k = 20 by default), majority vote, a tie going to the
    smallest class index, as scikit-learn's uniform KNeighborsClassifier decides it.

Each reports accuracy and macro-F1 on the scoring split. The feature is the mean of the patch tokens after the
encoder's final `norm` (`pool="mean"`), the cls token (`pool="cls"`, the reference linear-probe feature), or
every block's mean patch token averaged over the blocks, before the final norm (`pool="blocks"`): on real
ultrasound the MAE's intermediate blocks probe clearly better than its last one (docs/real_data.md).
"""

from __future__ import annotations

import dataclasses
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from sklearn import metrics as skm

from usf_mae_jax.cli import ConfigError
from usf_mae_jax.core import sharding
from usf_mae_jax.data import downstream
from usf_mae_jax.models import vit

log = logging.getLogger(__name__)

POOLS = ("mean", "cls", "blocks")


def ridge_predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, num_classes: int,
                  l2: float = 1e-3) -> np.ndarray:
    """Class predictions of ridge regression onto one-hot targets (the bias is fitted, not penalised).

    `l2` is scaled by the number of training examples, so the same value suits sets of any size.
    """
    x = np.asarray(train_x, np.float64)
    mean = x.mean(axis=0)
    x = x - mean
    targets = np.eye(num_classes)[np.asarray(train_y)]
    offset = targets.mean(axis=0)
    gram = x.T @ x + l2 * len(x) * np.eye(x.shape[1])
    weights = np.linalg.solve(gram, x.T @ (targets - offset))
    scores = (np.asarray(test_x, np.float64) - mean) @ weights + offset
    return scores.argmax(axis=1)


def knn_predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, num_classes: int,
                k: int = 20) -> np.ndarray:
    """Majority vote of the k most cosine-similar training examples; a tie goes to the smallest class."""
    def unit(a):
        a = np.asarray(a, np.float64)
        return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)

    k = min(k, len(train_x))
    similarity = unit(test_x) @ unit(train_x).T
    nearest = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    votes = np.zeros((len(test_x), num_classes))
    np.add.at(votes, (np.arange(len(test_x))[:, None], np.asarray(train_y)[nearest]), 1.0)
    return votes.argmax(axis=1)


def scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    return {"accuracy": float(skm.accuracy_score(y_true, y_pred)),
            "f1_macro": float(skm.f1_score(y_true, y_pred, average="macro", zero_division=0))}


@dataclasses.dataclass
class ProbeSet:
    """One labelled set held in memory for the probes: its name, the fitting and scoring splits."""

    name: str
    fit: downstream.SplitData
    score: downstream.SplitData
    num_classes: int


def parse_sets(text: str) -> list[tuple[str, int | None, str | None]]:
    """`evals.sets` "busbra:1,gist514:0@raw,mmotu" -> [(dataset, fold or None, subset or None), ...]."""
    parsed = []
    for item in filter(None, (t.strip() for t in str(text or "").split(","))):
        name, _, subset = item.partition("@")
        name, _, fold = name.partition(":")
        if not name or (fold and not fold.lstrip("-").isdigit()):
            raise ConfigError(f"evals.sets entry {item!r} is not DATASET[:FOLD][@SUBSET], e.g. busbra:1 or "
                              "gist514:0@raw")
        parsed.append((name, int(fold) if fold else None, subset or None))
    return parsed


def load_probe_sets(evals_cfg: Any) -> list[ProbeSet]:
    """The labelled sets named by `evals.sets` under `evals.data_dir`, their fitting and scoring splits."""
    sets = []
    for dataset, fold, subset in parse_sets(evals_cfg.sets):
        data = downstream.load_benchmark(evals_cfg.data_dir, dataset, fold, subset)
        fit, score = evals_cfg.fit_split, evals_cfg.score_split
        if fit not in data.splits or score not in data.splits or fit == score:
            raise ConfigError(f"evals.fit_split and evals.score_split must be two of {sorted(data.splits)}, got "
                              f"{fit!r} and {score!r}")
        name = dataset + (f"_{subset}" if subset else "") + (f"_fold{fold}" if fold is not None else "")
        sets.append(ProbeSet(name, data.splits[fit], data.splits[score], len(data.class_names)))
    return sets


class ProbeEvaluator:
    """Extracts encoder features of every probe set and fits the ridge and k-NN probes (module docstring)."""

    def __init__(self, evals_cfg: Any, graphdef, model_config: vit.ModelConfig, mesh: Mesh):
        if evals_cfg.pool not in POOLS:
            raise ConfigError(f"evals.pool must be one of {POOLS}, got {evals_cfg.pool!r}")
        self.cfg, self.mesh, self.model_config = evals_cfg, mesh, model_config
        self.sets = load_probe_sets(evals_cfg)
        self.batch = downstream.eval_batch_size(int(evals_cfg.batch_size), mesh)
        self.pool = ThreadPoolExecutor(2)
        pool, in_chans = evals_cfg.pool, model_config.in_chans

        def features(params, images):
            model, normalized = nnx.merge(graphdef, params), vit.normalize_images(images, in_chans)
            if pool == "blocks":
                return model.encode_block_average(normalized)
            tokens = model.encode(normalized)
            return tokens[:, 0] if pool == "cls" else jnp.mean(tokens[:, 1:], axis=1)

        self._features = jax.jit(features, out_shardings=sharding.replicated(mesh))

    def features(self, params: Any, split: downstream.SplitData) -> np.ndarray:
        return downstream.map_split(lambda images: self._features(params, images), split,
                                    self.model_config.img_size, self.mesh, self.batch, self.pool)

    def __call__(self, params: Any) -> dict[str, float]:
        """{"<set>/ridge_accuracy": ..., "<set>/ridge_f1_macro": ..., "<set>/knn_accuracy": ..., ...}."""
        results = {}
        for probe_set in self.sets:
            fit_x, score_x = self.features(params, probe_set.fit), self.features(params, probe_set.score)
            fit_y, score_y = probe_set.fit.labels, probe_set.score.labels
            predictions = {
                "ridge": ridge_predict(fit_x, fit_y, score_x, probe_set.num_classes, float(self.cfg.ridge_l2)),
                "knn": knn_predict(fit_x, fit_y, score_x, probe_set.num_classes, int(self.cfg.knn_k))}
            for probe, predicted in predictions.items():
                for metric, value in scores(score_y, predicted).items():
                    results[f"{probe_set.name}/{probe}_{metric}"] = value
        return results

    def close(self) -> None:
        self.pool.shutdown()
