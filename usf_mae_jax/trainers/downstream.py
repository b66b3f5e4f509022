"""What the downstream tasks share on top of the loop.

`BenchmarkTask`, the base of every task on a converted benchmark (fine-tuning, linear probing,
segmentation): the resolved `config.init`, the host thread pool, the evaluation batch, the audit files
`splits.json` (the exact record ids of each split) and `provenance.json` (the init and the pretraining
manifests it came from), the epoch size, and the layer-decayed optimizer of the fine-tuning recipes.

`ClassificationTask`, the base of the classification tasks (full fine-tuning, linear probing): both read a
converted benchmark (`config.dataset`, `config.fold`, `config.subset` under `input.data_dir`) into memory
(keeping a class-stratified `config.label_fraction` of the training split, a label budget drawn with
`config.seed`), evaluate the validation split every `eval_every` steps with scikit-learn metrics, select the
state of the best validation macro-F1, and test it once into `results.json` and `confusion_matrix.png`
(evaluators/metrics.py). With `config.select_metric = "f1_macro_guarded"` a state that predicts a single
class for the whole validation split ranks below every state that does not, whatever its macro-F1: a
single-class collapse is never the tested state while another was seen (docs/real_data.md).

A subclass supplies `probabilities(variables, split) -> (N, C)` and the training parts of the task contract.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from jax.sharding import Mesh

from usf_mae_jax.cli import ConfigError
from usf_mae_jax.core import files, optim
from usf_mae_jax.core.steps import StepPlan
from usf_mae_jax.data import downstream
from usf_mae_jax.evaluators import metrics
from usf_mae_jax.trainers import initialization
from usf_mae_jax.trainers.task import Task

log = logging.getLogger(__name__)

SELECT_METRICS = ("f1_macro", "f1_macro_guarded")
COLLAPSE_PENALTY = 1.0  # f1_macro_guarded of a single-class state: below any state predicting two classes


class BenchmarkTask(Task):
    """Base of the tasks on a converted benchmark; see the module docstring. A subclass's `prepare` loads
    `data` (with `membership()` and `splits["train"]`) and hands it to `prepare_benchmark`."""

    def prepare_benchmark(self, mesh: Mesh, data: Any) -> None:
        config = self.config
        self.mesh, self.data = mesh, data
        self.init = initialization.resolve_init(config)
        self.pool = ThreadPoolExecutor(max(1, int(config.input.num_threads)))
        self.eval_batch = downstream.eval_batch_size(int(config.eval_batch_size), mesh)

    def membership(self) -> dict[str, Any]:
        """The contents of `splits.json`."""
        return self.data.membership()

    def start(self, workdir: str) -> None:
        files.write_json(os.path.join(workdir, "splits.json"), self.membership())
        files.write_json(os.path.join(workdir, "provenance.json"), self.init.provenance)

    def examples_per_epoch(self) -> int:
        return len(self.data.splits["train"])

    def model_config(self):
        return self.init.model_config

    def make_optimizer(self, schedule, params, plan: StepPlan):
        """The fine-tuning optimizer with layer-wise lr decay `self.decay` (set by the subclass's `prepare`)."""
        scales = optim.layer_decay_scales(params, self.init.model_config.depth, self.decay)
        return optim.make_optimizer(self.config.optimizer, schedule, params, layer_scales=scales,
                                    grad_accum_steps=plan.grad_accum_steps)

    def close(self) -> None:
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.shutdown()


class ClassificationTask(BenchmarkTask):
    """Base of the benchmark classification tasks; see the module docstring."""

    select_metric = "f1_macro"

    def __init__(self, config: Any):
        super().__init__(config)
        self.select_metric = str(config.get("select_metric") or "f1_macro")
        if self.select_metric not in SELECT_METRICS:
            raise ConfigError(f"select_metric must be one of {', '.join(SELECT_METRICS)}, got {self.select_metric!r}")

    def prepare(self, mesh: Mesh, workdir: str) -> None:
        config = self.config
        data = downstream.load_benchmark(config.input.data_dir, config.dataset, config.fold, config.subset)
        data.splits["train"] = downstream.label_subset(data.splits["train"], float(config.get("label_fraction", 1.0)),
                                                       int(config.seed))
        self.prepare_benchmark(mesh, data)
        self.num_classes = len(data.class_names)

    def describe(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "class_names": self.data.class_names}

    def probabilities(self, variables: dict, split: str) -> np.ndarray:
        """(N, C) class probabilities of a split under `variables`."""
        raise NotImplementedError

    def evaluate(self, variables: dict, step: int) -> dict[str, float]:
        split = self.data.splits["validation"]
        probabilities = self.probabilities(variables, "validation")
        result = metrics.classification_results(split.labels, probabilities, self.data.class_names, "validation")
        predicted = len(np.unique(probabilities.argmax(axis=1)))
        guard = 0.0 if predicted > 1 else COLLAPSE_PENALTY
        return {**{k: result[k] for k in metrics.SCALAR_KEYS if result[k] is not None},
                "predicted_classes": predicted, "f1_macro_guarded": result["f1_macro"] - guard}

    def test(self, variables: dict) -> dict[str, Any]:
        split = self.data.splits["test"]
        results = metrics.classification_results(split.labels, self.probabilities(variables, "test"),
                                                 self.data.class_names, self.data.split_name("test"))
        log.info("test: macro-F1 %.4f, accuracy %.4f (n=%d)", results["f1_macro"], results["accuracy"],
                 results["n_test"])
        return {k: results[k] for k in metrics.RESULT_KEYS}

    def write_outputs(self, workdir: str, results: dict[str, Any]) -> None:
        metrics.write_confusion_png(os.path.join(workdir, "confusion_matrix.png"),
                                    np.asarray(results["confusion_matrix"]), self.data.class_names,
                                    title=f"{results['split']}  n={results['n_test']}")
