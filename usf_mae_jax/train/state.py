"""The MAE train state and the jitted, sharded train step, shared by the pretraining loop and the benchmark.

The state is a plain dict `{step, params, opt_state}`: params are the model's pure parameter dict (stable,
reference-mirroring names), so checkpoints are readable without our classes and the weight-decay mask can be
computed from paths. The model is rebuilt inside the traced step with `nnx.merge(graphdef, params)`, which
costs nothing at run time.

Randomness: the step key is `fold_in(key(seed), step)` with the step read from the state, then split per use
(DESIGN.md, "Randomness"). A resumed run therefore draws exactly the masks of an uninterrupted one, and the
noise does not depend on how the batch is sharded (threefry is partitionable).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from usf_mae_jax.models import vit
from usf_mae_jax.models.mae import MaskedAutoencoder, validate_mask_ratio
from usf_mae_jax.train import optim, sharding

# Per-use streams folded into the step key.
MASK_STREAM, VIS_STREAM = 0, 1


def build_model_config(model_cfg: Any) -> vit.ModelConfig:
    """ModelConfig from the config's `model` block: the variant's sizes, overridden by every field set."""
    fields = {f.name for f in dataclasses.fields(vit.ModelConfig)}
    overrides = {k: model_cfg[k] for k in fields if k in model_cfg and model_cfg[k] is not None}
    return vit.model_config(model_cfg.variant, **overrides)


@dataclasses.dataclass
class TrainSetup:
    """Everything fixed for a run: model structure, optimizer, shardings and the jitted functions."""

    model_config: vit.ModelConfig
    mesh: Mesh
    graphdef: Any
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    abstract_state: dict
    state_shardings: dict
    init: Any  # jitted () -> state, created directly in its sharded layout
    train_step: Any  # jitted (state, batch) -> (state, metrics), state donated


def abstract_params(model_config: vit.ModelConfig) -> tuple[Any, dict]:
    abstract_model = nnx.eval_shape(lambda: MaskedAutoencoder(model_config, rngs=nnx.Rngs(0)))
    graphdef, _ = nnx.split(abstract_model)
    return graphdef, nnx.to_pure_dict(nnx.state(abstract_model, nnx.Param))


def create_train_setup(model_config: vit.ModelConfig, opt_cfg: Any, mesh: Mesh, *, seed: int,
                       mask_ratio: float, peak_lr: float, total_updates: int, warmup_updates: int,
                       grad_accum_steps: int = 1, fsdp_min_size: int = 2**18) -> TrainSetup:
    validate_mask_ratio(mask_ratio)
    graphdef, params_shape = abstract_params(model_config)
    schedule = optim.warmup_cosine(peak_lr, total_updates, warmup_updates, opt_cfg.min_lr)
    tx = optim.make_optimizer(opt_cfg, schedule, params_shape, grad_accum_steps)

    def init_state():
        model = MaskedAutoencoder(model_config, rngs=nnx.Rngs(seed))
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

    shapes = jax.eval_shape(init_state)
    state_shardings = sharding.tree_shardings(shapes, mesh, fsdp_min_size)
    # Abstract arrays that carry their target sharding: restoring onto them reshards a checkpoint written on
    # any other mesh (or number of processes) into this run's layout.
    abstract_state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                                  state_shardings)
    init = jax.jit(init_state, out_shardings=state_shardings)
    step_fn = make_train_step(graphdef, model_config, tx, schedule, seed=seed, mask_ratio=mask_ratio,
                              grad_accum_steps=grad_accum_steps)
    train_step = jax.jit(step_fn, in_shardings=(state_shardings, {"image": sharding.batch_sharding(mesh)}),
                         out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=(0,))
    return TrainSetup(model_config, mesh, graphdef, tx, schedule, abstract_state, state_shardings, init,
                      train_step)


def make_train_step(graphdef, model_config: vit.ModelConfig, tx, schedule, *, seed: int, mask_ratio: float,
                    grad_accum_steps: int = 1):
    """Returns the pure step function: forward, backward, optimizer update and metrics, all on device.

    A non-finite loss or gradient norm leaves the state unchanged (the update is discarded on device) and
    raises the `nonfinite` flag; the loop stops with the step number and the last good checkpoint intact.
    The guard is a `lax.cond` around the optimizer update rather than a `where(finite, new, old)` over the
    result: with `where`, the old params and moments stay live after the new ones are written, so XLA copied
    the whole donated state every step (~360 copies, 25 MiB more scratch, ~3% of a tiny CPU step).
    """

    def loss_fn(params, patches, key):
        model = nnx.merge(graphdef, params)
        loss, _, _ = model.forward_patches(patches, mask_ratio, rng=key)
        return loss

    def apply_update(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def keep_state(params, opt_state, grads):
        del grads
        return params, opt_state

    def train_step(state, batch):
        step = state["step"]
        key = jax.random.fold_in(jax.random.key(seed), step)
        side = model_config.img_size
        if tuple(batch["image"].shape[1:3]) != (side, side):  # checked while tracing, before any compile
            raise ValueError(f"batch images have shape {tuple(batch['image'].shape)} but the model takes "
                             f"{side}x{side} images (model.img_size)")
        patches = vit.normalized_patches(batch["image"], model_config.patch_size, model_config.in_chans)
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], patches,
                                                  jax.random.fold_in(key, MASK_STREAM))
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        params, opt_state = jax.lax.cond(finite, apply_update, keep_state,
                                         state["params"], state["opt_state"], grads)
        new_state = {"step": step + 1, "params": params, "opt_state": opt_state}
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(step // grad_accum_steps),
                   "nonfinite": ~finite}
        return new_state, metrics

    return train_step


class DeviceMemoryError(ValueError):
    """The compiled step needs more memory per device than the device has."""


def compile_step(train_step, state: dict, batch: dict) -> tuple[Any, dict[str, float]]:
    """Ahead-of-time compiles the step and checks its memory per device before step 1.

    Returns the compiled step and a report in MiB: arguments (params, optimizer state, batch), outputs,
    temporaries, and the device's limit when the runtime reports one (GPUs and TPUs do; the CPU does not).
    """
    compiled = train_step.lower(state, batch).compile()
    memory = compiled.memory_analysis()
    mib = 2.0**20
    report = {}
    if memory is not None:
        report = {"arguments_mib": memory.argument_size_in_bytes / mib,
                  "outputs_mib": memory.output_size_in_bytes / mib,
                  "temp_mib": memory.temp_size_in_bytes / mib,
                  "aliased_mib": memory.alias_size_in_bytes / mib}
        report["total_mib"] = (report["arguments_mib"] + report["outputs_mib"] + report["temp_mib"]
                               - report["aliased_mib"])
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" in stats and report:
        report["device_limit_mib"] = stats["bytes_limit"] / mib
        if report["total_mib"] > report["device_limit_mib"]:
            raise DeviceMemoryError(
                f"the train step needs {report['total_mib']:,.0f} MiB per device but "
                f"{jax.local_devices()[0].device_kind} has {report['device_limit_mib']:,.0f} MiB: shard the params "
                f"and optimizer state with --config.mesh.fsdp=N, lower batch_size (with grad_accum_steps to keep "
                f"the effective batch), or use --config.model.dtype=bfloat16")
    return compiled, report
