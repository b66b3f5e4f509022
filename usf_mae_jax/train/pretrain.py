"""The MAE pretraining loop: `train(config, workdir)`.

Order of work, so that every configuration error surfaces before anything is compiled:
  1. resolve the model config, mesh, batch split and step counts, and validate them;
  2. compare an existing checkpoint in the workdir with the model (incompatible shapes fail here);
  3. write `workdir/config.json`, build the input iterator, create or restore the sharded state;
  4. run the jitted step; metrics of step k are fetched while step k+1 runs, so the host never stalls the
     device, and the loss, lr, grad norm and images/s go to stdout, TensorBoard and the progress bar;
  5. checkpoint every `ckpt_steps`, at the end, and at the first step boundary after SIGTERM or an orbax
     preemption notice (then wait for the write and return `status='preempted'`).
"""

from __future__ import annotations

import json
import logging
import os
import signal
from typing import Any

import jax
import numpy as np
from flax import nnx

from configs import common
from usf_mae_jax.data import pipeline
from usf_mae_jax.models.mae import validate_mask_ratio
from usf_mae_jax.train import checkpoint, optim, reporting, sharding
from usf_mae_jax.train.state import VIS_STREAM, build_model_config, compile_step, create_train_setup

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradient norm became NaN/inf; training stopped."""


class _PreemptionFlag:
    """Set by SIGTERM in a single-process run; the loop checks it at step boundaries.

    With several processes, JAX's distributed runtime owns SIGTERM: its preemption service makes every process
    agree on one step, which orbax's `reached_preemption(step)` reports, so no Python handler is installed.
    """

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if jax.process_count() > 1:
            return self
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. inside some test runners): no handler
            self._previous = None
        return self

    def _handle(self, signum, frame):
        log.warning("SIGTERM received: saving at the next step boundary, then exiting")
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def plan_steps(config: Any, mesh) -> dict[str, Any]:
    """Validated step counts and learning rate; raises ValueError with a clear message on bad settings."""
    dp = sharding.data_parallel_size(mesh)
    if config.batch_size % dp:
        raise ValueError(f"global batch size {config.batch_size} is not divisible by the data-parallel size {dp} "
                         f"(mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']})")
    if config.batch_size % jax.process_count():
        raise ValueError(f"global batch size {config.batch_size} is not divisible by the "
                         f"{jax.process_count()} processes")
    accum = int(config.grad_accum_steps)
    if accum < 1:
        raise ValueError(f"grad_accum_steps must be >= 1, got {accum}")
    validate_mask_ratio(config.model.mask_ratio)
    steps_per_epoch = max(pipeline.images_per_epoch(config.input) // config.batch_size, 1)
    total_steps = common.resolve_steps(config, "total", steps_per_epoch)
    if total_steps % accum:
        total_steps -= total_steps % accum
    total_updates = max(total_steps // accum, 1)
    warmup_updates = common.resolve_steps(config, "warmup", max(steps_per_epoch // accum, 1), total_updates)
    effective_batch = config.batch_size * accum
    return dict(steps_per_epoch=steps_per_epoch, total_steps=total_steps, total_updates=total_updates,
                warmup_updates=min(warmup_updates, total_updates), effective_batch=effective_batch,
                peak_lr=optim.peak_learning_rate(config.optimizer, effective_batch))


def write_config(workdir: str, config: Any, model_config, plan: dict) -> None:
    if jax.process_index() != 0:
        return
    import dataclasses

    payload = json.loads(config.to_json_best_effort())
    payload["resolved_model"] = dataclasses.asdict(model_config)
    payload["resolved_plan"] = plan
    payload["device_count"], payload["process_count"] = jax.device_count(), jax.process_count()
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)


def _flat(tree: Any) -> dict[str, Any]:
    return {jax.tree_util.keystr(p, simple=True, separator="/"): leaf
            for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _apply_init_from(state: dict, setup, path: str) -> tuple[dict, bool]:
    """Loads params-only weights into a fresh state; returns (state, decoder_was_loaded).

    Tensors missing from the source (e.g. the decoder of an encoder-only release) keep their fresh init;
    a tensor with another shape means another architecture and is an error.
    """
    loaded = _flat(checkpoint.load_init_params(path)[0])
    used, fresh = [], []

    def pick(path_, leaf, leaf_sharding):
        name = jax.tree_util.keystr(path_, simple=True, separator="/")
        if name not in loaded:
            fresh.append(name)
            return leaf
        value = np.asarray(loaded[name], np.float32)
        if value.shape != tuple(leaf.shape):
            raise ValueError(f"init_from {path}: {name} has shape {value.shape}, the model expects "
                             f"{tuple(leaf.shape)}; check the model variant and patch size")
        used.append(name)
        return jax.device_put(value, leaf_sharding)

    params = jax.tree_util.tree_map_with_path(pick, state["params"], setup.state_shardings["params"])
    extra = sorted(set(loaded) - set(used))
    log.info("init_from %s: loaded %d tensors; fresh init for %d %s; ignored %d not in the MAE %s", path,
             len(used), len(fresh), fresh[:6], len(extra), extra[:6])
    return {**state, "params": params}, any(name.startswith("decoder_") for name in used)


def _setup_for(config: Any):
    model_config = build_model_config(config.model)
    mesh = sharding.make_mesh(config.mesh)
    plan = plan_steps(config, mesh)
    setup = create_train_setup(model_config, config.optimizer, mesh, seed=config.seed,
                               mask_ratio=config.model.mask_ratio, peak_lr=plan["peak_lr"],
                               total_updates=plan["total_updates"], warmup_updates=plan["warmup_updates"],
                               grad_accum_steps=config.grad_accum_steps,
                               fsdp_min_size=config.mesh.fsdp_min_size)
    return model_config, mesh, plan, setup


def sharding_report(config: Any) -> list[str]:
    """Path, shape and partition spec of every parameter and optimizer leaf (for --print_sharding)."""
    _, mesh, _, setup = _setup_for(config)
    return [f"mesh {dict(mesh.shape)}", *sharding.describe(setup.abstract_state, setup.state_shardings)]


def train(config: Any, workdir: str) -> dict[str, Any]:
    """Runs (or resumes) pretraining in `workdir`; returns a summary with the per-step loss history."""
    jax.config.update("jax_threefry_partitionable", True)
    model_config, mesh, plan, setup = _setup_for(config)
    os.makedirs(workdir, exist_ok=True)
    ckpt = checkpoint.Checkpointer(workdir, keep=config.keep_ckpts)
    ckpt.check_compatible(setup.abstract_state["params"])
    write_config(workdir, config, model_config, plan)
    if jax.process_index() == 0:
        log.info("model %s: %s params; mesh %s; plan %s", config.model.variant,
                 f"{sum(int(np.prod(x.shape)) for x in jax.tree.leaves(setup.abstract_state['params'])):,}",
                 dict(mesh.shape), plan)

    data = pipeline.make_pretrain_iterator(config.input, global_batch_size=config.batch_size,
                                           img_size=model_config.img_size, seed=config.seed, mesh=mesh)
    restored = ckpt.restore_latest(setup.abstract_state, data)
    decoder_fresh = False
    if restored is not None:
        state, start_step = restored
        log.info("resumed from step %d in %s", start_step, ckpt.directory)
    else:
        state, start_step = setup.init(), 0
        if config.init_from:
            state, decoder_loaded = _apply_init_from(state, setup, config.init_from)
            decoder_fresh = not decoder_loaded

    batch = next(data) if start_step < plan["total_steps"] else None
    train_step = setup.train_step
    if batch is not None:
        train_step, memory = compile_step(setup.train_step, state, batch)
        if jax.process_index() == 0:
            log.info("compiled train step; memory per device (MiB): %s",
                     {k: round(v, 1) for k, v in memory.items()})
    writer = reporting.MetricWriter(workdir)
    progress = reporting.Progress(start_step, plan["total_steps"])
    vis_fn = jax.jit(lambda params, images, key: reporting.reconstruction_panels(
        nnx.merge(setup.graphdef, params), images[:config.vis_count], config.model.mask_ratio, key),
        out_shardings=sharding.replicated(mesh))
    history: list[float] = []
    window: list[float] = []
    pending = None
    status = "finished"

    def absorb(step_done: int, metrics) -> None:
        values = jax.device_get(metrics)
        if bool(values["nonfinite"]):
            raise NonFiniteLossError(
                f"non-finite loss ({values['loss']}) or gradient norm ({values['grad_norm']}) at step "
                f"{step_done}; the update was discarded and the newest checkpoint in {ckpt.directory} is intact")
        history.append(float(values["loss"]))
        window.append(float(values["loss"]))
        progress.update(step_done, float(values["loss"]))
        if step_done % config.log_steps == 0 or step_done == plan["total_steps"]:
            writer.scalars(step_done, {"loss": float(np.mean(window)), "lr": values["lr"],
                                       "grad_norm": values["grad_norm"],
                                       "images_per_s": progress.images_per_second(step_done, config.batch_size)})
            window.clear()

    try:
        with _PreemptionFlag() as preemption:
            for step in range(start_step, plan["total_steps"]):
                if step > start_step:
                    batch = next(data)
                state, metrics = train_step(state, batch)
                if pending is not None:
                    absorb(*pending)
                pending = (step + 1, metrics)
                done = step + 1
                if config.vis_steps and (done % config.vis_steps == 0 or done == plan["total_steps"]):
                    panels = vis_fn(state["params"], batch["image"],
                                    jax.random.fold_in(jax.random.key(config.seed), VIS_STREAM))
                    if jax.process_index() == 0:
                        note = "decoder freshly initialised: reconstructions are noise" if decoder_fresh else ""
                        grid = reporting.save_grid(np.asarray(panels),
                                                   os.path.join(workdir, "vis", f"step_{done:07d}.png"), note)
                        writer.image(done, "reconstructions", grid)
                stop = preemption.requested or ckpt.reached_preemption(done)
                if done % config.ckpt_steps == 0 or done == plan["total_steps"] or stop:
                    absorb(*pending)  # never save a state whose step has not been checked
                    pending = None
                    ckpt.save(done, state, data.get_state(), force=True)
                if stop:
                    ckpt.wait()
                    status = "preempted"
                    log.warning("saved step %d after a preemption request; rerun the command to resume", done)
                    break
            if pending is not None:
                absorb(*pending)
    finally:
        ckpt.close()
        progress.close()
        writer.close()
    final_step = int(jax.device_get(state["step"]))
    return {"status": status, "start_step": start_step, "final_step": final_step, "losses": history,
            "state": state, "plan": plan}
