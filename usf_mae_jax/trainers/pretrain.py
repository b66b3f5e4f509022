"""MAE pretraining as a task of the training loop.

    python launch.py --config=configs/pretrain.py:demo --workdir=runs/demo

The model is the reference masked autoencoder (models/mae.py, docs/mae_fidelity.md); the loss is its masked
patch MSE on the uint8 batch, patchified once and normalised on the device (`vit.normalized_patches`), with
the masking noise drawn from the step key's `MASK_STREAM`. Batches come from the grain pipeline over the
shards of `input.data_dir` (or synthetic images), whose position is part of every checkpoint.

`init` loads pretrained weights (a PyTorch `.pth` of the ImageNet MAE, as USF-MAE continues from it, an
interop import directory or another workdir) over the fresh model when the run starts; tensors the source
lacks (e.g. the decoder of an encoder-only release) keep their fresh initialisation, and the reconstruction
grids then say so. Every `vis_steps` a grid of reconstructions goes to `workdir/vis/` and TensorBoard.
With `model.fov_masking`, patches outside the scan sector are never visible and never targets
(models/fov.py); off, the step is the reference's. With `evals.sets`, ridge and k-NN probes of the encoder run
at step 0 and every `eval_steps` (evaluators/probes.py), so the curve of the representation sits next to the
loss.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from usf_mae_jax.cli import ConfigError
from usf_mae_jax.core import optim, sharding, trees
from usf_mae_jax.core.steps import StepPlan
from usf_mae_jax.data import pipeline
from usf_mae_jax.evaluators import probes, reconstruction
from usf_mae_jax.interop import weights
from usf_mae_jax.models import fov, vit
from usf_mae_jax.models.mae import MaskedAutoencoder, validate_mask_ratio
from usf_mae_jax.trainers.task import Task

log = logging.getLogger(__name__)

# Per-use streams folded into the step key.
MASK_STREAM, VIS_STREAM = 0, 1


def abstract_mae(model_config: vit.ModelConfig) -> tuple[Any, dict]:
    """(graphdef, params as ShapeDtypeStructs) of the MAE, without allocating it."""
    model = nnx.eval_shape(lambda: MaskedAutoencoder(model_config, rngs=nnx.Rngs(0)))
    graphdef, _ = nnx.split(model)
    return graphdef, nnx.to_pure_dict(nnx.state(model, nnx.Param))


def mae_loss(graphdef, model_config: vit.ModelConfig, mask_ratio: float, params: Any, images: jax.Array,
             key: jax.Array, fov_threshold: int | None = None) -> jax.Array:
    """The MAE loss of a uint8 batch; the shape check runs while tracing, before anything compiles.

    `fov_threshold` None is the reference loss; an int switches on field-of-view-aware masking with that
    threshold (models/fov.py), with the same masking noise drawn from the same key.
    """
    side = model_config.img_size
    if tuple(images.shape[1:3]) != (side, side):
        raise ValueError(f"batch images have shape {tuple(images.shape)} but the model takes {side}x{side} "
                         "images (model.img_size)")
    patches = vit.normalized_patches(images, model_config.patch_size, model_config.in_chans)
    model, mask_key = nnx.merge(graphdef, params), jax.random.fold_in(key, MASK_STREAM)
    if fov_threshold is None:
        loss, _, _ = model.forward_patches(patches, mask_ratio, rng=mask_key)
        return loss
    noise = jax.random.uniform(mask_key, patches.shape[:2], jnp.float32)  # the draw forward_patches makes
    in_view = fov.view_mask(images, model_config.patch_size, fov_threshold)
    return fov.masked_loss(model, patches, mask_ratio, noise, in_view)[0]


class PretrainTask(Task):
    name = "pretrain"

    def __init__(self, config: Any):
        super().__init__(config)
        self._model_config = vit.config_from_block(config.model)
        self.mask_ratio = float(config.model.mask_ratio)
        validate_mask_ratio(self.mask_ratio)
        self.fov_threshold = int(config.model.get("fov_threshold", 0)) if config.model.get("fov_masking") else None
        if self.fov_threshold is not None and not 0 <= self.fov_threshold < 255:
            raise ConfigError(f"model.fov_threshold must lie in [0, 255) (a uint8 level), got {self.fov_threshold}")
        self.graphdef, _ = abstract_mae(self._model_config)
        self.decoder_fresh = False
        self._vis_fn = None
        self._plan: StepPlan | None = None
        self._workdir = ""
        self._probes: probes.ProbeEvaluator | None = None
        self.evaluate_at_start = bool(probes.parse_sets(config.evals.sets))  # every curve has its baseline

    def prepare(self, mesh: Mesh, workdir: str) -> None:
        self._mesh, self._workdir = mesh, workdir
        self._examples = pipeline.images_per_epoch(self.config.input)
        self._init_params = None
        if self.config.init:  # read now, so that a missing or unsafe file fails before anything is written
            self._init_params, _ = weights.load_weights(self.config.init)
        elif self.config.get("preset") == "usf_mae":
            log.warning("the usf_mae recipe continues from the ImageNet MAE weights, but config.init is not set: "
                        "pretraining starts from random weights. Pass --config.init=mae_pretrain_vit_base_full.pth")
        if self.evaluate_at_start:
            self._probes = probes.ProbeEvaluator(self.config.evals, self.graphdef, self._model_config, mesh)

    def examples_per_epoch(self) -> int:
        return self._examples

    def model_config(self) -> vit.ModelConfig:
        return self._model_config

    def create_variables(self) -> dict:
        model = MaskedAutoencoder(self._model_config, rngs=nnx.Rngs(int(self.config.seed)))
        return {"params": nnx.to_pure_dict(nnx.state(model, nnx.Param)), "extra": {}}

    def initial_weights(self) -> dict[str, np.ndarray] | None:
        if self._init_params is None:
            return None
        weights = trees.flatten(self._init_params)
        _, shapes = abstract_mae(self._model_config)
        ours = set(trees.flatten(shapes))
        self.decoder_fresh = not any(n.startswith("decoder_") and n in ours for n in weights)
        return weights

    def make_optimizer(self, schedule, params, plan: StepPlan):
        return optim.make_optimizer(self.config.optimizer, schedule, params, grad_accum_steps=plan.grad_accum_steps)

    def loss_fn(self, params, extra, batch, key):
        loss = mae_loss(self.graphdef, self._model_config, self.mask_ratio, params, batch["image"], key,
                        self.fov_threshold)
        return loss, ({}, extra)

    def batches(self, plan: StepPlan, mesh: Mesh):
        self._plan = plan
        return pipeline.make_pretrain_iterator(self.config.input, global_batch_size=plan.batch_size,
                                               img_size=self._model_config.img_size, seed=int(self.config.seed),
                                               mesh=mesh)

    def evaluate(self, variables: dict, step: int) -> dict[str, float]:
        return self._probes(variables["params"]) if self._probes is not None else {}

    def close(self) -> None:
        if self._probes is not None:
            self._probes.close()

    def after_step(self, step: int, variables: dict, batch: dict, writer: Any) -> None:
        every = int(self.config.vis_steps)
        if not every or not (step % every == 0 or step == self._plan.total_steps):
            return
        if self._vis_fn is None:
            count, graphdef, ratio = int(self.config.vis_count), self.graphdef, self.mask_ratio
            self._vis_fn = jax.jit(lambda params, images, key: reconstruction.reconstruction_panels(
                nnx.merge(graphdef, params), images[:count], ratio, key),
                out_shardings=sharding.replicated(self._mesh))
        key = jax.random.fold_in(jax.random.key(int(self.config.seed)), VIS_STREAM)
        panels = self._vis_fn(variables["params"], batch["image"], key)
        if jax.process_index() == 0:
            note = "decoder freshly initialised: reconstructions are noise" if self.decoder_fresh else ""
            grid = reconstruction.save_grid(np.asarray(panels),
                                            os.path.join(self._workdir, "vis", f"step_{step:07d}.png"), note)
            writer.image(step, "reconstructions", grid)
