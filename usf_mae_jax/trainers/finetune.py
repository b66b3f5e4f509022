"""Full fine-tuning of a ViT classifier on a downstream benchmark, as a task of the training loop.

    python launch.py --config=configs/finetune.py:busbra,fold=1 --workdir W \
        --config.input.data_dir=OUT [--config.init=PATH]

The recipe is the reference MAE fine-tune (docs/usf_mae_recipe.md, "Reference MAE recipes"), every value set
in configs/finetune.py:
  * `ViTClassifier` (global pool + fc_norm, or the cls token), drop path on the blocks' linear schedule;
  * the position table is a learned parameter initialised from the init's table (the fixed sin-cos table of
    an MAE), resized bicubically when the init was trained at another image size;
  * AdamW (betas 0.9/0.999, wd 0.05 without 1-D params, biases, pos_embed, cls_token), layer-wise lr decay
    applied to the lr and the decoupled decay together, linear warmup then cosine to `min_lr`, per step;
  * soft-target cross-entropy with label smoothing; optional mixup/cutmix (off by default) and class
    balancing (loss weights or sampling);
  * the step key is `fold_in(key(seed), step)`, split into drop-path and mixup streams.

The loop evaluates the validation split every `eval_every` steps (one epoch by default), keeps the state of
the best validation macro-F1 and tests it once (trainers/downstream.py). A killed run resumes where it
stopped: the batches are a pure function of the step (data/downstream.py `EpochBatches`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from usf_mae_jax.cli import ConfigError
from usf_mae_jax.core import sharding
from usf_mae_jax.core.steps import StepPlan
from usf_mae_jax.data import downstream
from usf_mae_jax.models import classifier, vit
from usf_mae_jax.trainers import initialization
from usf_mae_jax.trainers.downstream import ClassificationTask

DROP_PATH_STREAM, MIX_STREAM = 0, 1
CLASS_BALANCE = ("none", "loss", "sampler")


# ------------------------------------------------------------------------------------------ loss and mixing


def soft_targets(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
    """One-hot targets with label smoothing: 1 - s + s/C on the label, s/C elsewhere (timm's convention)."""
    off = smoothing / num_classes
    return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def mix_batch(images: jax.Array, targets: jax.Array, key: jax.Array,
              mix_cfg: Any) -> tuple[jax.Array, jax.Array]:
    """Batch-level mixup / cutmix with the batch's reverse as partner (timm `Mixup`, mode 'batch').

    With probability `prob` a mix happens; when both alphas are positive, cutmix is picked with
    probability `switch_prob`. Cutmix's lambda is corrected to the pasted box's true area.
    """
    mixup_alpha, cutmix_alpha = float(mix_cfg.mixup_alpha), float(mix_cfg.cutmix_alpha)
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return images, targets
    k_apply, k_switch, k_mix, k_cut, k_y, k_x = jax.random.split(key, 6)
    apply = jax.random.bernoulli(k_apply, float(mix_cfg.prob))
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = jax.random.bernoulli(k_switch, float(mix_cfg.switch_prob))
    else:
        use_cutmix = jnp.asarray(cutmix_alpha > 0)
    lam_mix = jax.random.beta(k_mix, max(mixup_alpha, 1e-3), max(mixup_alpha, 1e-3))
    lam_cut = jax.random.beta(k_cut, max(cutmix_alpha, 1e-3), max(cutmix_alpha, 1e-3))
    height, width = images.shape[1:3]
    ratio = jnp.sqrt(1.0 - lam_cut)
    cut_h, cut_w = (ratio * height).astype(jnp.int32), (ratio * width).astype(jnp.int32)
    cy = jax.random.randint(k_y, (), 0, height)
    cx = jax.random.randint(k_x, (), 0, width)
    y0, y1 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
    x0, x1 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
    rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
    box = ((rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1))[None, :, :, None]
    lam_box = 1.0 - ((y1 - y0) * (x1 - x0)) / (height * width)
    partner = images[::-1]
    mixed = jnp.where(use_cutmix, jnp.where(box, partner, images), lam_mix * images + (1 - lam_mix) * partner)
    lam = jnp.where(apply, jnp.where(use_cutmix, lam_box, lam_mix), 1.0)
    images = jnp.where(apply, mixed, images)
    return images, lam * targets + (1.0 - lam) * targets[::-1]


def weighted_cross_entropy(logits: jax.Array, targets: jax.Array, class_weights: jax.Array) -> jax.Array:
    """Mean soft-target cross-entropy; each example weighted by its target's class weight (1 when balanced
    weights are off), normalised by the weights' sum as torch's weighted CrossEntropyLoss does."""
    per_example = -(targets * jax.nn.log_softmax(logits.astype(jnp.float32))).sum(-1)
    weights = targets @ class_weights
    return (per_example * weights).sum() / jnp.maximum(weights.sum(), 1e-12)


class FinetuneTask(ClassificationTask):
    name = "finetune"

    def __init__(self, config: Any):
        super().__init__(config)
        if config.class_balance not in CLASS_BALANCE:
            raise ConfigError(f"class_balance must be one of {', '.join(CLASS_BALANCE)}, got {config.class_balance!r}")
        self.smoothing = float(config.label_smoothing)
        if not 0.0 <= self.smoothing < 1.0:
            raise ConfigError(f"label_smoothing must lie in [0, 1), got {self.smoothing}")

    def _new_model(self, seed: int) -> classifier.ViTClassifier:
        return classifier.ViTClassifier(self.init.model_config, self.num_classes, nnx.Rngs(seed),
                                        global_pool=bool(self.config.model.global_pool),
                                        drop_path_rate=float(self.config.model.drop_path))

    def prepare(self, mesh, workdir: str) -> None:
        super().prepare(mesh, workdir)
        self.graphdef, _ = nnx.split(nnx.eval_shape(lambda: self._new_model(0)))
        self.decay = initialization.layer_decay_for(self.config.optimizer, self.init.model_config,
                                                    pretrained=self.init.params is not None)
        train = self.data.splits["train"]
        self.class_weights = (downstream.class_loss_weights(train.labels, self.num_classes)
                              if self.config.class_balance == "loss" else np.ones(self.num_classes, np.float32))
        in_chans = self.init.model_config.in_chans
        graphdef = self.graphdef
        self._predict = jax.jit(lambda params, images: jax.nn.softmax(
            nnx.merge(graphdef, params)(vit.normalize_images(images, in_chans))),
            out_shardings=sharding.replicated(mesh))

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "layer_decay": self.decay}

    def create_variables(self) -> dict:
        model = self._new_model(int(self.config.seed))
        return {"params": nnx.to_pure_dict(nnx.state(model, nnx.Param)), "extra": {}}

    def initial_weights(self):
        if self.init.params is None:
            return None
        weights, _ = classifier.encoder_weights(nnx.eval_shape(lambda: self._new_model(0)), self.init.params,
                                                self.init.source_img_size)
        return weights

    def loss_fn(self, params, extra, batch, key):
        images = vit.normalize_images(batch["image"], self.init.model_config.in_chans)
        targets = soft_targets(batch["label"], self.num_classes, self.smoothing)
        images, targets = mix_batch(images, targets, jax.random.fold_in(key, MIX_STREAM), self.config.mixup)
        logits = nnx.merge(self.graphdef, params)(images, rng=jax.random.fold_in(key, DROP_PATH_STREAM))
        loss = weighted_cross_entropy(logits, targets, jnp.asarray(self.class_weights))
        return loss, ({}, extra)

    def batches(self, plan: StepPlan, mesh):
        train = self.data.splits["train"]
        transform = downstream.make_train_augment(self.config.input, self.init.model_config.img_size)
        seed = int(self.config.seed)

        def make_rows(indices: np.ndarray, epoch: int) -> dict[str, np.ndarray]:
            return {"image": downstream.augmented_images(train.images, indices, transform, seed, epoch, self.pool),
                    "label": train.labels[indices].astype(np.int32)}

        sampling = (downstream.class_probabilities(train.labels, self.num_classes)
                    if self.config.class_balance == "sampler" else None)
        return downstream.EpochBatches(len(train), plan.batch_size, plan.steps_per_epoch, seed, make_rows, mesh,
                                       sampling)

    def probabilities(self, variables: dict, split: str) -> np.ndarray:
        params = variables["params"]
        return downstream.map_split(lambda images: self._predict(params, images), self.data.splits[split],
                                    self.init.model_config.img_size, self.mesh, self.eval_batch, self.pool)
