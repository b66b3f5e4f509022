"""Lesion segmentation fine-tuning as a task of the training loop.

    python launch.py --config=configs/segment.py:busbra,fold=1[,head=upernet|linear] --workdir W \
        --config.input.data_dir=OUT [--config.init=PATH]

What the task supplies to the loop (trainers/task.py), every value set in configs/segment.py:
  * data: a converted benchmark with masks (converter 1.1.0+) read into host memory, the masks as class maps
    at their stored size (data/segmentation.py); `classes=binary` folds the foreground classes into one;
  * model: `ViTSegmenter` (models/segmentation.py), a UperNet head on four block outputs (the MAE paper's
    protocol) or a linear head; the encoder and its position table come from `init` through
    `classifier.encoder_weights` (an MAE or fine-tuned workdir, an interop import directory or a `.pth`),
    the table resized bicubically to any `model.img_size`; BatchNorm statistics are the step's `extra`;
  * loss: pixel cross-entropy (optionally class-weighted, normalised by the weights' sum as torch's weighted
    CrossEntropyLoss) plus `loss.dice_weight` times the soft Dice loss, 1 - the (weighted) mean over the
    foreground classes of (2 sum(p g) + 1) / (sum(p) + sum(g) + 1) over the batch; the logits are upsampled
    bilinearly to the input size first;
  * optimizer: AdamW with layer-wise lr decay and the fine-tune weight-decay mask (core/optim.py); drop path
    on the blocks' linear schedule, dropout 0.1 before the classifier; step key streams for both;
  * batches: `EpochBatches` of jointly augmented (image, mask) pairs, a pure function of the step, so a killed
    run resumes exactly;
  * evaluation: every `eval_every` steps the validation Dice (per image, averaged over the foreground
    classes; `select_metric`), predicted at each mask's own resolution; the best state is tested once;
  * outputs: `results.json` (evaluators/segmentation.py: per-class and mean Dice, IoU, HD95, precision,
    recall, global values, n_test, split), `per_image_metrics.csv`, `test_overlays.png`, and the audit files
    `splits.json` and `provenance.json`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import cv2
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from usf_mae_jax.cli import ConfigError, DataError
from usf_mae_jax.core import sharding
from usf_mae_jax.core.steps import StepPlan
from usf_mae_jax.data import downstream
from usf_mae_jax.data import segmentation as segdata
from usf_mae_jax.evaluators import segmentation as metrics
from usf_mae_jax.models import classifier, vit
from usf_mae_jax.models.segmentation import ViTSegmenter, resize_bilinear
from usf_mae_jax.trainers import initialization
from usf_mae_jax.trainers.downstream import BenchmarkTask

log = logging.getLogger(__name__)

MODEL_STREAM = 0  # step-key stream of drop path and head dropout
DICE_SMOOTH = 1.0
OVERLAY_COUNT = 16
PER_IMAGE_FILE, OVERLAY_FILE = "per_image_metrics.csv", "test_overlays.png"


def segmentation_loss(logits: jax.Array, masks: jax.Array, class_weights: jax.Array,
                      dice_weight: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(cross-entropy + dice_weight * soft-Dice loss, the two terms) of (N, H, W, C) logits and (N, H, W) masks.

    Cross-entropy: per-pixel weight = its true class's weight, normalised by the weights' sum. Dice: batch-level
    soft Dice per foreground class (smooth 1), averaged with the foreground classes' weights.
    """
    num_classes = logits.shape[-1]
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    onehot = jax.nn.one_hot(masks, num_classes, dtype=jnp.float32)
    pixel_weights = class_weights[masks]
    ce = -(onehot * log_probs).sum(-1)
    ce = (ce * pixel_weights).sum() / jnp.maximum(pixel_weights.sum(), 1e-12)
    probs = jnp.exp(log_probs)
    intersection = (probs * onehot).sum(axis=(0, 1, 2))
    dice = (2 * intersection + DICE_SMOOTH) / (probs.sum(axis=(0, 1, 2)) + onehot.sum(axis=(0, 1, 2)) + DICE_SMOOTH)
    foreground = class_weights[1:]
    dice_loss = 1.0 - (dice[1:] * foreground).sum() / jnp.maximum(foreground.sum(), 1e-12)
    return ce + dice_weight * dice_loss, {"ce": ce, "dice_loss": dice_loss}


def parse_class_weights(text: str, num_classes: int) -> np.ndarray:
    """`loss.class_weights`: '' (all 1) or one non-negative float per class, background first."""
    if not text:
        return np.ones(num_classes, np.float32)
    try:
        weights = np.asarray([float(v) for v in text.split(",")], np.float32)
    except ValueError:
        raise ConfigError(f"loss.class_weights must be comma-separated numbers, got {text!r}") from None
    if weights.shape != (num_classes,) or (weights < 0).any() or not weights[1:].any():
        raise ConfigError(f"loss.class_weights needs {num_classes} non-negative values (background first, a "
                          f"positive foreground), got {text!r}")
    return weights


class SegmentTask(BenchmarkTask):
    name = "segment"
    select_metric = "dice"

    def _new_model(self, seed: int) -> ViTSegmenter:
        return ViTSegmenter(self.init.model_config, self.num_classes, nnx.Rngs(seed), head=self.config.model.head,
                            channels=int(self.config.model.head_channels),
                            drop_path_rate=float(self.config.model.drop_path))

    # ------------------------------------------------------------------------------------------- setup

    def prepare(self, mesh: Mesh, workdir: str) -> None:
        config = self.config
        data = segdata.load_segmentation(config.input.data_dir, config.dataset, config.fold, config.subset,
                                         config.classes)
        data.splits["train"] = segdata.label_subset(data.splits["train"], float(config.get("label_fraction", 1.0)),
                                                    int(config.seed))
        if not any(mask.any() for mask in data.splits["validation"].masks):
            raise DataError(f"{data.version_dir}: no validation mask of fold {config.fold} has a foreground "
                            "pixel, so validation Dice, which selects the tested state, is undefined")
        self.prepare_benchmark(mesh, data)
        self.num_classes = len(data.mask_class_names)
        self.class_weights = parse_class_weights(config.loss.class_weights, self.num_classes)
        self.decay = initialization.layer_decay_for(config.optimizer, self.init.model_config,
                                                    pretrained=self.init.params is not None)
        self.graphdef, _, _ = nnx.split(nnx.eval_shape(lambda: self._new_model(0)), nnx.Param, nnx.BatchStat)
        graphdef, in_chans = self.graphdef, self.init.model_config.in_chans

        def logits(params, extra, images):
            model = nnx.merge(graphdef, params, extra)
            model.eval()
            return model(vit.normalize_images(images, in_chans))

        self._logits = jax.jit(logits, out_shardings=sharding.replicated(mesh))
        self._test_rows: list[dict] = []
        self._overlays: list[tuple[np.ndarray, np.ndarray, np.ndarray, str]] = []

    def membership(self) -> dict[str, Any]:
        return {**self.data.membership(), "mask_class_names": self.data.mask_class_names}

    def describe(self) -> dict[str, Any]:
        model = nnx.eval_shape(lambda: self._new_model(0))
        return {"mask_class_names": self.data.mask_class_names, "classes": self.config.classes,
                "head": self.config.model.head, "out_indices": list(model.indices), "layer_decay": self.decay,
                "class_weights": self.class_weights.tolist()}

    def create_variables(self) -> dict:
        _, params, stats = nnx.split(self._new_model(int(self.config.seed)), nnx.Param, nnx.BatchStat)
        return {"params": nnx.to_pure_dict(params), "extra": nnx.to_pure_dict(stats)}

    def initial_weights(self):
        if self.init.params is None:
            return None
        weights, report = classifier.encoder_weights(nnx.eval_shape(lambda: self._new_model(0)), self.init.params,
                                                     self.init.source_img_size)
        log.info("segmentation init: encoder %d tensors, head fresh (%d tensors)", len(report["loaded"]),
                 len(report["fresh"]))
        return weights

    # -------------------------------------------------------------------------------------------- step

    def loss_fn(self, params, extra, batch, key):
        model = nnx.merge(self.graphdef, params, extra)
        model.train()
        images = vit.normalize_images(batch["image"], self.init.model_config.in_chans)
        logits = model(images, rng=jax.random.fold_in(key, MODEL_STREAM))
        logits = resize_bilinear(logits, *images.shape[1:3])
        loss, terms = segmentation_loss(logits, batch["mask"], jnp.asarray(self.class_weights),
                                        float(self.config.loss.dice_weight))
        return loss, (terms, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))

    def batches(self, plan: StepPlan, mesh):
        train = self.data.splits["train"]
        transform = segdata.make_train_transform(self.config.input, self.init.model_config.img_size)
        seed = int(self.config.seed)

        def make_rows(indices: np.ndarray, epoch: int) -> dict[str, np.ndarray]:
            return segdata.augmented_pairs(train, indices, transform, seed, epoch, self.pool)

        return downstream.EpochBatches(len(train), plan.batch_size, plan.steps_per_epoch, seed, make_rows, mesh)

    # -------------------------------------------------------------------------------- evaluation, outputs

    def predictions(self, variables: dict, split: str) -> list[np.ndarray]:
        """uint8 class maps of a split, each at its mask's stored size."""
        params, extra = variables["params"], variables["extra"]
        return segdata.predict_split(lambda images: self._logits(params, extra, images), self.data.splits[split],
                                     self.init.model_config.img_size, self.mesh, self.eval_batch, self.pool)

    def evaluate(self, variables: dict, step: int) -> dict[str, float]:
        split = self.data.splits["validation"]
        results, _ = metrics.segmentation_results(self.predictions(variables, "validation"), split.masks, split.ids,
                                                  self.data.mask_class_names, "validation", distances=False)
        return {k: results[k] for k in ("dice", "iou", "dice_global", "iou_global") if results[k] is not None}

    def test(self, variables: dict) -> dict[str, Any]:
        split = self.data.splits["test"]
        preds = self.predictions(variables, "test")
        results, rows = metrics.segmentation_results(preds, split.masks, split.ids, self.data.mask_class_names,
                                                     self.data.split_name("test"))
        self._test_rows = rows
        dice_of = {}
        for row in rows:
            if row["dice"] is not None:
                dice_of.setdefault(row["id"], []).append(row["dice"])
        shown = np.unique(np.linspace(0, len(split) - 1, min(OVERLAY_COUNT, len(split))).round().astype(int))
        self._overlays = [(split.images[i], split.masks[i], preds[i],
                           f"{os.path.basename(split.ids[i])} {np.mean(dice_of.get(split.ids[i], [np.nan])):.2f}")
                          for i in shown]
        log.info("test: Dice %.4f, IoU %.4f, HD95 %s px (n=%d)", results["dice"] or 0.0, results["iou"] or 0.0,
                 f"{results['hd95']:.1f}" if results["hd95"] is not None else "n/a", results["n_test"])
        return results

    def write_outputs(self, workdir: str, results: dict[str, Any]) -> None:
        metrics.write_per_image_csv(os.path.join(workdir, PER_IMAGE_FILE), self._test_rows)
        images, truths, preds, captions = zip(*self._overlays)
        grid = metrics.overlay_grid(images, truths, preds, captions)
        if not cv2.imwrite(os.path.join(workdir, OVERLAY_FILE), grid):
            raise OSError(f"could not write {os.path.join(workdir, OVERLAY_FILE)}")
