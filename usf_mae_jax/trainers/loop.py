"""THE training loop: `run(config, workdir, task)` takes any task (task.py) from a config to a finished,
resumable run.

Order of work, so that every configuration error surfaces before anything is compiled:
  1. the task reads its data and init; the mesh and the step plan are resolved and validated;
  2. the state's shapes and shardings are derived (`jax.eval_shape`), and an existing checkpoint in the
     workdir is compared with them (another model shape fails here, with the differences listed);
  3. `config.json` and the task's audit files are written, the batches built, and the state restored from the
     newest good checkpoint, or created on the mesh (`jit(out_shardings=...)`, never on one device) with the
     task's pretrained weights loaded over it;
  4. the step is compiled ahead of time and its memory per device checked against the device's;
  5. the loop: metrics of step k are fetched while step k+1 runs, so the host never stalls the device; the
     loss, lr, grad norm and images/s go to the log, TensorBoard (flushed) and the progress bar; the task's
     evaluation runs every `eval_every` steps and at the end, and the best state by `task.select_metric` is
     kept; checkpoints of the state, the data position, the loop record and the best state are written every
     `ckpt_every` steps (at most a tenth of the run), every `ckpt_minutes` of wall time, at the end, and at
     the first step boundary after SIGTERM or a preemption notice;
  6. the task's test runs once, on the best (or final) state, into `results.json` and `history.json`.

Every evaluation is also a line of `evals.jsonl` (rewritten from the checkpoint's record on resume, so a
killed run's later evaluations never appear twice) and an `eval/...` TensorBoard scalar.

Randomness: the step key is `fold_in(key(seed), step)` with the step read from the state (docs/design.md,
"Randomness"); tasks fold in their own streams. A resumed run therefore draws exactly the masks, drop paths and
batches of an uninterrupted one.

Non-finite guard: a step whose loss or gradient norm is not finite leaves params, optimizer state and extra
state unchanged on the device and raises a flag; the loop then stops with the step number, the newest
checkpoint intact. On the CPU the guard is a `lax.cond` around the optimizer update, so the donated state is
updated in place (a `where(finite, new, old)` made XLA copy the whole state every step, docs/performance.md);
on GPUs and TPUs it is that select, fused into the update, because XLA:GPU would sync with the host on the
conditional's predicate every step (`make_train_step`, docs/accelerators.md).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from usf_mae_jax import accelerators
from usf_mae_jax.cli import ConfigError, UserError
from usf_mae_jax.core import checkpoint, files, optim, reporting, sharding, steps, trees
from usf_mae_jax.core.steps import StepPlan
from usf_mae_jax.trainers.task import Task

log = logging.getLogger(__name__)

RESULTS_FILE, HISTORY_FILE, CONFIG_FILE, EVALS_FILE = "results.json", "history.json", "config.json", "evals.jsonl"


class TrainingDivergedError(UserError, FloatingPointError):
    """The loss or the gradient norm became NaN/inf; the update was discarded and training stopped."""


class DeviceMemoryError(UserError, ValueError):
    """The compiled step needs more memory per device than the device has."""


@dataclasses.dataclass
class Setup:
    """Everything fixed for a run: the plan, the optimizer, shardings and the jitted functions."""

    mesh: Mesh
    plan: StepPlan
    schedule: optax.Schedule
    tx: optax.GradientTransformation
    abstract_state: dict
    state_shardings: dict
    has_extra: bool
    init: Any  # jitted () -> state, created directly in its sharded layout
    train_step: Any  # jitted (state, batch) -> (state, metrics), state donated
    snapshot: Any  # jitted (params, extra) -> a copy (the best state so far)

    def variables(self, state: dict) -> dict:
        return {"params": state["params"], "extra": state.get("extra", {})}

    @property
    def abstract_best(self) -> dict:
        best = {"params": self.abstract_state["params"]}
        if self.has_extra:
            best["extra"] = self.abstract_state["extra"]
        return best


GUARDS = ("auto", "cond", "select")


def make_train_step(task: Task, tx, schedule, *, seed: int, grad_accum_steps: int, has_extra: bool,
                    guard: str = "auto"):
    """The pure step: forward, backward, guarded optimizer update and metrics, all on the device.

    `guard` is how a non-finite step is kept from changing the state:
      cond    `lax.cond(finite, update, keep)`. XLA:CPU then updates the donated state in place; a select made
              it copy the whole state every step (docs/performance.md). XLA:GPU, however, evaluates a
              conditional's predicate on the host, which waits for the forward and backward pass to finish
              before it can launch the update: a host sync every step.
      select  the update is always computed and `where(finite, new, old)` picks per element. On GPUs and TPUs
              the select fuses into the optimizer's elementwise update, which then writes the donated buffers
              in place; nothing waits for the host.
      auto    cond on the CPU, select elsewhere (`lax.platform_dependent`: the branch is chosen when the step is
              lowered for its platform, so each compiler sees only its own). On the CPU it compiles to the same
              program as `cond`.
    Either way a non-finite step leaves params and optimizer state bit-for-bit unchanged.
    """
    if guard not in GUARDS:
        raise ValueError(f"guard must be one of {GUARDS}, got {guard!r}")

    def apply_update(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def keep_state(params, opt_state, grads):
        del grads
        return params, opt_state

    def guarded_update(finite, params, opt_state, grads):
        def by_cond(*operands):
            return jax.lax.cond(finite, apply_update, keep_state, *operands)

        def by_select(*operands):
            return jax.tree.map(lambda new, old: jnp.where(finite, new, old), apply_update(*operands),
                                keep_state(*operands))

        if guard == "cond":
            return by_cond(params, opt_state, grads)
        if guard == "select":
            return by_select(params, opt_state, grads)
        return jax.lax.platform_dependent(params, opt_state, grads, cpu=by_cond, default=by_select)

    def train_step(state, batch):
        step = state["step"]
        key = jax.random.fold_in(jax.random.key(seed), step)
        extra = state.get("extra", {})

        def objective(params):
            return task.loss_fn(params, extra, batch, key)

        (loss, (metrics, new_extra)), grads = jax.value_and_grad(objective, has_aux=True)(state["params"])
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        params, opt_state = guarded_update(finite, state["params"], state["opt_state"], grads)
        new_state = {"step": step + 1, "params": params, "opt_state": opt_state}
        if has_extra:
            new_state["extra"] = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_extra, extra)
        out = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(step // grad_accum_steps), "nonfinite": ~finite,
               **metrics}
        return new_state, out

    return train_step


def build(config: Any, task: Task, mesh: Mesh, *, guard: str = "auto") -> Setup:
    """Plan, optimizer, abstract state with its shardings, and the jitted init / step (nothing runs yet).

    `guard` chooses the non-finite guard (`make_train_step`); the step is compiled with the platform's XLA
    options (usf_mae_jax/accelerators.py).
    """
    plan = steps.plan(config, task.examples_per_epoch(), sharding.data_parallel_size(mesh), jax.process_count())
    variables = jax.eval_shape(task.create_variables)
    has_extra = bool(jax.tree.leaves(variables.get("extra", {})))
    schedule = optim.warmup_cosine(plan.peak_lr, plan.total_updates, plan.warmup_updates,
                                   float(config.optimizer.min_lr))
    tx = task.make_optimizer(schedule, variables["params"], plan)

    def init_state():
        fresh = task.create_variables()
        state = {"step": jnp.zeros((), jnp.int32), "params": fresh["params"], "opt_state": tx.init(fresh["params"])}
        if has_extra:
            state["extra"] = fresh["extra"]
        return state

    shapes = jax.eval_shape(init_state)
    state_shardings = sharding.tree_shardings(shapes, mesh, int(config.mesh.fsdp_min_size))
    # Abstract arrays carrying their target sharding: restoring onto them reshards a checkpoint written on any
    # other mesh (or number of processes) into this run's layout.
    abstract_state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                                  state_shardings)
    step_fn = make_train_step(task, tx, schedule, seed=int(config.seed), grad_accum_steps=plan.grad_accum_steps,
                              has_extra=has_extra, guard=guard)
    train_step = jax.jit(step_fn, in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                         out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=(0,),
                         compiler_options=accelerators.mesh_compiler_options(mesh))
    best_shardings = {"params": state_shardings["params"]}
    if has_extra:
        best_shardings["extra"] = state_shardings["extra"]
    snapshot = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree), out_shardings=best_shardings)
    return Setup(mesh, plan, schedule, tx, abstract_state, state_shardings, has_extra,
                 jax.jit(init_state, out_shardings=state_shardings), train_step, snapshot)


def compile_step(train_step, state: dict, batch: dict) -> tuple[Any, dict[str, float]]:
    """Ahead-of-time compiles the step and checks its memory per device before step 1.

    Returns the compiled step and a report in MiB: arguments, outputs, temporaries, and the device's limit
    when the runtime reports one (GPUs and TPUs do; the CPU does not).
    """
    compiled = train_step.lower(state, batch).compile()
    memory = compiled.memory_analysis()
    mib = 2.0**20
    report: dict[str, float] = {}
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


def load_initial_weights(state: dict, setup: Setup, weights: dict[str, Any], source: str) -> dict:
    """Overwrites fresh params with pretrained values, by '/'-path, in the params' shardings.

    A name the model does not have is reported and ignored; a shape that differs is a ConfigError.
    """
    flat_shardings = trees.flatten(setup.state_shardings["params"])
    used = []

    def pick(name: str, leaf):
        if name not in weights:
            return leaf
        value = jnp.asarray(weights[name], leaf.dtype)
        if value.shape != tuple(leaf.shape):
            raise ConfigError(f"init {source}: {name} has shape {tuple(value.shape)}, the model expects "
                              f"{tuple(leaf.shape)}; check the model variant and patch size")
        used.append(name)
        return jax.device_put(value, flat_shardings[name])

    params = trees.map_with_names(pick, state["params"])
    fresh = sorted(set(trees.flatten(params)) - set(used))
    ignored = sorted(set(weights) - set(used))
    log.info("init %s: loaded %d tensors; fresh init for %d %s; ignored %d %s", source, len(used), len(fresh),
             fresh[:6], len(ignored), ignored[:6])
    return {**state, "params": params}


def write_run_config(workdir: str, config: Any, task: Task, plan: StepPlan) -> None:
    """`workdir/config.json`: the config, the resolved model and plan, and the topology (process 0)."""
    if jax.process_index() != 0:
        return
    payload = json.loads(config.to_json_best_effort())
    model_config = task.model_config()
    if model_config is not None:
        payload["resolved_model"] = dataclasses.asdict(model_config)
    payload["resolved_plan"] = {**plan.as_dict(), **task.describe()}
    payload["device_count"], payload["process_count"] = jax.device_count(), jax.process_count()
    files.write_json(os.path.join(workdir, CONFIG_FILE), payload)


class PreemptionFlag:
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
        except ValueError:  # not the main thread: no handler
            self._previous = None
        return self

    def _handle(self, signum, frame):
        log.warning("SIGTERM received: saving at the next step boundary, then exiting")
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def sharding_report(config: Any, task: Task) -> list[str]:
    """Path, shape and partition spec of every state leaf (for `launch.py --print_sharding`)."""
    mesh = sharding.make_mesh(config.mesh)
    task.prepare(mesh, "")
    setup = build(config, task, mesh)
    return [f"mesh {dict(mesh.shape)}", *sharding.describe(setup.abstract_state, setup.state_shardings)]


def run(config: Any, workdir: str, task: Task) -> dict[str, Any]:
    """Runs (or resumes) `task` in `workdir`; returns a summary (status, steps, losses, state, results, ...)."""
    jax.config.update("jax_threefry_partitionable", True)
    mesh = sharding.make_mesh(config.mesh)
    task.prepare(mesh, workdir)
    setup = build(config, task, mesh)
    plan = setup.plan
    os.makedirs(workdir, exist_ok=True)
    ckpt = checkpoint.Checkpointer(workdir, keep=int(config.keep_ckpts))
    try:
        ckpt.check_compatible(setup.abstract_state["params"])
        write_run_config(workdir, config, task, plan)
        if jax.process_index() == 0:
            task.start(workdir)
        if jax.process_index() == 0:
            log.info("%s: %s params; mesh %s; plan %s", task.name, f"{trees.count(setup.abstract_state['params']):,}",
                     dict(mesh.shape), plan.as_dict())
        return _train(config, workdir, task, setup, ckpt)
    finally:
        task.close()
        ckpt.close()


def _train(config: Any, workdir: str, task: Task, setup: Setup, ckpt: checkpoint.Checkpointer) -> dict[str, Any]:
    plan = setup.plan
    data = task.batches(plan, setup.mesh)
    selecting = task.select_metric is not None
    restored = ckpt.restore_latest(setup.abstract_state, setup.abstract_best if selecting else None, data)
    if restored is not None:
        state, best, record, start_step = restored.state, restored.best, restored.loop, restored.step
        log.info("resumed from step %d in %s", start_step, ckpt.directory)
    else:
        state, best, record, start_step = setup.init(), None, {"evaluations": [], "best": None}, 0
        weights = task.initial_weights()
        if weights:
            state = load_initial_weights(state, setup, dict(weights), str(config.get("init")))
    writer = reporting.MetricWriter(workdir, resume_step=start_step or None)
    evals_path = os.path.join(workdir, EVALS_FILE)
    if jax.process_index() == 0 and (record["evaluations"] or os.path.exists(evals_path)):
        # The checkpoint's record is the truth: a killed run may have appended evaluations after it.
        files.write_text(evals_path, "".join(json.dumps(files.json_safe(e)) + "\n" for e in record["evaluations"]))
    progress = reporting.Progress(start_step, plan.total_steps)
    losses: list[float] = []
    window: list[float] = []
    clock = {"train_s": 0.0, "timed_steps": 0}
    pending = None
    status = "finished"
    save_clock = checkpoint.SaveClock(plan.ckpt_minutes, sync_every=plan.log_every)

    def absorb(step_done: int, metrics) -> None:
        values = jax.device_get(metrics)
        if bool(values["nonfinite"]):
            raise TrainingDivergedError(
                f"non-finite loss ({values['loss']}) or gradient norm ({values['grad_norm']}) at step {step_done}; "
                f"the update was discarded and the newest checkpoint in {ckpt.directory} is intact")
        loss = float(values["loss"])
        losses.append(loss)
        window.append(loss)
        progress.update(step_done, loss)
        if step_done % plan.log_every == 0 or step_done == plan.total_steps:
            extra = {k: float(v) for k, v in values.items() if k not in ("loss", "nonfinite")}
            writer.scalars(step_done, {"loss": sum(window) / len(window), **extra,
                                       "images_per_s": progress.images_per_second(step_done, plan.batch_size)})
            window.clear()

    def evaluate(step_done: int) -> None:
        nonlocal best
        metrics = task.evaluate(setup.variables(state), step_done)
        if not metrics:
            return
        record["evaluations"].append({"step": step_done, **metrics})
        if jax.process_index() == 0:
            with open(evals_path, "a") as f:
                f.write(json.dumps(files.json_safe(record["evaluations"][-1])) + "\n")
        writer.scalars(step_done, {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, int | float)})
        if selecting:
            value = float(metrics[task.select_metric])
            if record["best"] is None or value > record["best"]["value"]:
                record["best"] = {"step": step_done, "value": value}
                best = setup.snapshot({k: v for k, v in setup.variables(state).items()
                                       if k == "params" or setup.has_extra})

    with progress.logging(), PreemptionFlag() as preemption:
        try:
            if start_step == 0 and task.evaluate_at_start and not record["evaluations"]:
                evaluate(0)
            train_step = setup.train_step
            if start_step < plan.total_steps:
                batch = next(data)
                train_step, memory = compile_step(setup.train_step, state, batch)
                if jax.process_index() == 0:
                    log.info("compiled train step; memory per device (MiB): %s",
                             {k: round(v, 1) for k, v in memory.items()})
                progress.reset_meter(start_step)
            for step in range(start_step, plan.total_steps):
                started = time.perf_counter()
                if step > start_step:
                    batch = next(data)
                state, metrics = train_step(state, batch)
                if pending is not None:
                    absorb(*pending)
                pending = (step + 1, metrics)
                done = step + 1
                task.after_step(done, setup.variables(state), batch, writer)
                if step > start_step:  # the first step of an invocation carries compilation and warm-up
                    clock["train_s"] += time.perf_counter() - started
                    clock["timed_steps"] += 1
                stop = preemption.requested or ckpt.reached_preemption(done)
                evaluating = plan.eval_every and (done % plan.eval_every == 0 or done == plan.total_steps)
                saving = (done % plan.ckpt_every == 0 or done == plan.total_steps or stop
                          or save_clock.due(done))
                if evaluating or saving:
                    absorb(*pending)  # never evaluate or save a state whose step has not been checked
                    pending = None
                if evaluating:
                    evaluate(done)
                if saving:
                    ckpt.save(done, state, data.get_state(), record, best)
                    save_clock.saved()
                else:
                    ckpt.check_for_errors()
                if stop:
                    ckpt.wait()
                    status = "preempted"
                    log.warning("saved step %d after a preemption request; rerun the command to resume", done)
                    break
            if pending is not None:
                absorb(*pending)
            ckpt.wait()
        finally:
            data.close()
            progress.close()
            writer.close()
    final_step = int(jax.device_get(state["step"]))
    summary = {"status": status, "start_step": start_step, "final_step": final_step, "losses": losses,
               "state": state, "best": best, "record": record, "plan": plan, "results": None,
               "train_seconds": clock["train_s"],
               "images_per_s": (clock["timed_steps"] * plan.batch_size / clock["train_s"]
                                if clock["train_s"] > 0 else None)}
    if status == "finished":
        summary["results"] = _finish(workdir, task, setup, state, best, record, summary)
    return summary


def _finish(workdir: str, task: Task, setup: Setup, state: dict, best: Any, record: dict,
            summary: dict) -> dict | None:
    """The test of the selected state, `results.json`, the task's outputs and `history.json`."""
    results_path = os.path.join(workdir, RESULTS_FILE)
    if summary["start_step"] >= setup.plan.total_steps and os.path.isfile(results_path):
        log.info("the run in %s is already finished; results in %s", workdir, results_path)
        return files.read_json(results_path)
    chosen = setup.variables(state)
    if best is not None:
        chosen = {"params": best["params"], "extra": best.get("extra", chosen["extra"])}
    results = task.test(chosen)
    if jax.process_index() == 0:
        history = {"evaluations": record["evaluations"], "best": record["best"],
                   "train_seconds": summary["train_seconds"], "images_per_s": summary["images_per_s"],
                   "steps": summary["final_step"]}
        files.write_json(os.path.join(workdir, HISTORY_FILE), history)
        if results is not None:
            task.write_outputs(workdir, results)
            files.write_json(results_path, results, sort_keys=False)
    if results is not None and record["best"] is not None:
        log.info("best %s %.4f at step %d", task.select_metric, record["best"]["value"], record["best"]["step"])
    return results
