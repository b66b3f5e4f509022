"""Linear probing as a task of the training loop: frozen encoder, cached features, BN + Linear head, LARS.

    python launch.py --config=configs/finetune.py:busbra,mode=linear --workdir W \
        --config.input.data_dir=OUT --config.init=PATH

Reference behaviour (facebookresearch/mae `main_linprobe.py`; docs/usf_mae_recipe.md):
  * the encoder is frozen; its feature is the cls token after `norm` (`model.global_pool=False`, the
    default) or the mean patch token after `fc_norm`. Nothing upstream of the head trains, so the features of
    every split are computed once, with the evaluation transform, and kept in `W/features.npz`; the cached
    features are part of the run's resumable state, so a resumed probe reads them instead of recomputing;
  * the head is `LinearProbeHead`: BatchNorm without affine (eps 1e-6, PyTorch momentum 0.1) then a Linear
    initialised with trunc_normal(std 0.01); its running statistics are the step's `extra` state, guarded and
    checkpointed like the params;
  * LARS (momentum 0.9, weight decay 0, trust coefficient 0.001, no decay or trust ratio on 1-D parameters),
    lr = blr * batch / 256 with blr 0.1, linear warmup then cosine, per step (core/optim.py).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import jax
import numpy as np
from flax import nnx

from usf_mae_jax.cli import ConfigError
from usf_mae_jax.core import files, optim, sharding
from usf_mae_jax.core.steps import StepPlan
from usf_mae_jax.data import downstream
from usf_mae_jax.models import classifier, vit
from usf_mae_jax.trainers.downstream import ClassificationTask

log = logging.getLogger(__name__)

FEATURES_FILE = "features.npz"


class LinearProbeTask(ClassificationTask):
    name = "linear_probe"

    def __init__(self, config: Any):
        super().__init__(config)
        if config.class_balance not in ("none", "sampler"):
            raise ConfigError(f"class_balance for the linear probe is none or sampler, got {config.class_balance!r}")

    def prepare(self, mesh, workdir: str) -> None:
        super().prepare(mesh, workdir)
        self.features = self._cached_features(workdir)
        if self.features is None:
            self.features, self.extract_rate = self._extract(mesh)
            if workdir and jax.process_index() == 0:
                self._save_features(workdir)
        else:
            self.extract_rate = None
            log.info("linear probe: features read from %s", os.path.join(workdir, FEATURES_FILE))
        width = self.features["train"].shape[1]
        head = nnx.eval_shape(lambda: classifier.LinearProbeHead(width, self.num_classes, nnx.Rngs(0)))
        self.graphdef, _, _ = nnx.split(head, nnx.Param, nnx.BatchStat)
        graphdef = self.graphdef
        self._predict = jax.jit(lambda params, stats, x: jax.nn.softmax(_head(graphdef, params, stats, False)(x)),
                                out_shardings=sharding.replicated(mesh))

    # ------------------------------------------------------------------------------------------- features

    def _fingerprint(self) -> np.ndarray:
        provenance = self.init.provenance
        return np.asarray([str(provenance.get("init")), str(provenance.get("sha256", "")),
                           str(self.init.model_config.img_size), str(bool(self.config.model.global_pool))])

    def _cached_features(self, workdir: str) -> dict[str, np.ndarray] | None:
        """The features of an earlier attempt of this run, when they belong to the same init and splits."""
        path = os.path.join(workdir, FEATURES_FILE) if workdir else ""
        if not path or not os.path.isfile(path):
            return None
        with np.load(path) as cached:
            same = ("fingerprint" in cached and cached["fingerprint"].tolist() == self._fingerprint().tolist()
                    and all(cached[f"{k}_ids"].tolist() == s.ids for k, s in self.data.splits.items()))
            if not same:
                log.warning("%s belongs to another init or other splits; computing the features again", path)
                return None
            return {k: np.asarray(cached[f"{k}_features"]) for k in self.data.splits}

    def _save_features(self, workdir: str) -> None:
        files.write_npz(os.path.join(workdir, FEATURES_FILE), fingerprint=self._fingerprint(),
                        **{f"{k}_features": v for k, v in self.features.items()},
                        **{f"{k}_ids": np.asarray(s.ids) for k, s in self.data.splits.items()},
                        **{f"{k}_labels": s.labels for k, s in self.data.splits.items()})

    def _extract(self, mesh) -> tuple[dict[str, np.ndarray], float]:
        """{split: (N, D) float32} from the frozen encoder, and the rate in images/s (compilation excluded)."""
        model_config = self.init.model_config
        encoder = classifier.ViTClassifier(model_config, self.num_classes, nnx.Rngs(int(self.config.seed)),
                                           global_pool=bool(self.config.model.global_pool))
        if self.init.params is not None:
            classifier.load_encoder_params(encoder, self.init.params, self.init.source_img_size)
        graphdef, params = nnx.split(encoder)
        params = jax.device_put(params, sharding.replicated(mesh))
        in_chans = model_config.in_chans
        features_fn = jax.jit(lambda p, images: nnx.merge(graphdef, p).forward_features(
            vit.normalize_images(images, in_chans)), out_shardings=sharding.replicated(mesh))
        blank = np.zeros((self.eval_batch, model_config.img_size, model_config.img_size, self.data.channels),
                         np.uint8)[sharding.local_rows(self.eval_batch)]
        jax.block_until_ready(features_fn(params, sharding.to_global(
            {"image": blank}, sharding.batch_sharding(mesh))["image"]))  # compile off the clock
        started, count, features = time.perf_counter(), 0, {}
        for name, split in self.data.splits.items():
            features[name] = downstream.map_split(lambda x: features_fn(params, x), split, model_config.img_size,
                                                  mesh, self.eval_batch, self.pool)
            count += len(split)
        rate = count / max(time.perf_counter() - started, 1e-9)
        log.info("linear probe: features %s in %.1f images/s", {k: v.shape for k, v in features.items()}, rate)
        return features, rate

    # ---------------------------------------------------------------------------------------------- task

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "feature_images_per_s": self.extract_rate}

    def create_variables(self) -> dict:
        head = classifier.LinearProbeHead(self.features["train"].shape[1], self.num_classes,
                                          nnx.Rngs(int(self.config.seed)))
        _, params, stats = nnx.split(head, nnx.Param, nnx.BatchStat)
        return {"params": nnx.to_pure_dict(params), "extra": nnx.to_pure_dict(stats)}

    def make_optimizer(self, schedule, params, plan: StepPlan):
        return optim.make_optimizer(self.config.optimizer, schedule, params, grad_accum_steps=plan.grad_accum_steps)

    def loss_fn(self, params, extra, batch, key):
        del key
        model = _head(self.graphdef, params, extra, True)
        logits = model(batch["features"])
        smoothing = float(self.config.label_smoothing)
        targets = jax.nn.one_hot(batch["label"], self.num_classes) * (1 - smoothing) + smoothing / self.num_classes
        loss = -(targets * jax.nn.log_softmax(logits)).sum(-1).mean()
        return loss, ({}, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))

    def batches(self, plan: StepPlan, mesh):
        train = self.data.splits["train"]
        features = self.features["train"]

        def make_rows(indices: np.ndarray, epoch: int) -> dict[str, np.ndarray]:
            return {"features": features[indices], "label": train.labels[indices].astype(np.int32)}

        sampling = (downstream.class_probabilities(train.labels, self.num_classes)
                    if self.config.class_balance == "sampler" else None)
        return downstream.EpochBatches(len(train), plan.batch_size, plan.steps_per_epoch, int(self.config.seed),
                                       make_rows, mesh, sampling)

    def probabilities(self, variables: dict, split: str) -> np.ndarray:
        return np.asarray(self._predict(variables["params"], variables["extra"], self.features[split]))


def _head(graphdef, params, stats, training: bool) -> classifier.LinearProbeHead:
    model = nnx.merge(graphdef, params, stats)
    if training:
        model.train()
    else:
        model.eval()
    return model
