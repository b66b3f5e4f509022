"""The training loop's guarantees, tested once with a toy task (tests/toy_task.py) for every task:
exact resume after a crash and after kill -9, SIGTERM, the non-finite guard, best-by-metric selection,
and the results and history files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import toy_task
from conftest import CACHE_DIR, ROOT
from helpers import assert_trees_equal, data_dependent_conditionals, read_json, read_text

from usf_mae_jax.core import checkpoint
from usf_mae_jax.trainers import loop

TOY = os.path.join(ROOT, "tests", "toy_task.py")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 12-step run: evaluations at 4, 8, 12 score 0.1, 0.9, 0.4."""
    workdir = str(tmp_path_factory.mktemp("reference") / "run")
    return workdir, toy_task.run(workdir)


def test_selects_the_best_evaluation_and_tests_it(reference):
    workdir, summary = reference
    assert summary["status"] == "finished" and summary["final_step"] == 12 and len(summary["losses"]) == 12
    history = read_json(os.path.join(workdir, "history.json"))
    assert [e["step"] for e in history["evaluations"]] == [4, 8, 12]
    assert history["best"] == {"step": 8, "value": 0.9}
    results = read_json(os.path.join(workdir, "results.json"))
    # The tested state is the one evaluated at step 8, not the final one.
    assert results["w"][0] == pytest.approx(history["evaluations"][1]["w0"], abs=0)
    assert results["w"][0] != pytest.approx(float(summary["state"]["params"]["w"][0]))
    # The workdir is an init: its best params, read-only.
    params, _ = checkpoint.load_params(workdir)
    np.testing.assert_array_equal(params["w"], np.asarray(results["w"], np.float32))
    assert summary["images_per_s"] > 0 and history["train_seconds"] > 0


def test_rerunning_a_finished_run_changes_nothing(reference):
    workdir, _ = reference
    before = read_text(os.path.join(workdir, "results.json"))
    again = toy_task.run(workdir)
    assert again["start_step"] == 12 and again["losses"] == []
    assert read_text(os.path.join(workdir, "results.json")) == before


def test_resume_after_a_crash_is_exact(reference, tmp_path):
    _, uninterrupted = reference
    workdir = str(tmp_path / "crashed")
    with pytest.raises(RuntimeError, match="simulated crash"):
        # 12 steps with ckpt_steps 4: checkpoints every 2 steps (a tenth of the run, rounded up); the crash comes
        # after the step-8 checkpoint and evaluation, before the step-10 one.
        toy_task.run(workdir, fail_after_batches=9)
    resumed = toy_task.run(workdir)
    assert resumed["start_step"] == 8 and resumed["final_step"] == 12
    assert_trees_equal(toy_task.params_of(resumed), toy_task.params_of(uninterrupted))
    assert_trees_equal(resumed["state"]["extra"], uninterrupted["state"]["extra"])
    np.testing.assert_array_equal(resumed["losses"], uninterrupted["losses"][8:])
    assert resumed["results"] == uninterrupted["results"]  # the best (step 8) survived in the checkpoint
    # evals.jsonl holds each evaluation once, as the checkpoint's record says, even after the crash.
    with open(os.path.join(workdir, "evals.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    assert lines == read_json(os.path.join(workdir, "history.json"))["evaluations"]
    assert [e["step"] for e in lines] == [4, 8, 12]


def test_sigterm_saves_at_the_next_step_and_resumes_exactly(reference, tmp_path, monkeypatch):
    _, uninterrupted = reference
    workdir = str(tmp_path / "preempted")
    real = toy_task.ToyTask.after_step

    def sigterm_at_step_5(self, step, variables, batch, writer):
        if step == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        real(self, step, variables, batch, writer)

    monkeypatch.setattr(toy_task.ToyTask, "after_step", sigterm_at_step_5)
    preempted = toy_task.run(workdir)
    assert preempted["status"] == "preempted" and preempted["final_step"] == 5
    assert checkpoint.workdir_steps(workdir) == [2, 4, 5]  # every 2 steps (a tenth of 12, rounded up), keep 3
    assert not os.path.exists(os.path.join(workdir, "results.json"))
    monkeypatch.undo()
    resumed = toy_task.run(workdir)
    assert resumed["start_step"] == 5
    assert_trees_equal(toy_task.params_of(resumed), toy_task.params_of(uninterrupted))
    assert resumed["results"] == uninterrupted["results"]


def test_kill_9_then_rerun_ends_equal_to_an_uninterrupted_run(tmp_path):
    overrides = {"total_steps": 300, "ckpt_steps": 30, "eval_steps": 60, "seconds_per_batch": 0.01,
                 "scores": [0.5, 0.2, 0.8, 0.1, 0.3]}
    uninterrupted = toy_task.run(str(tmp_path / "reference"), **overrides)
    workdir = str(tmp_path / "killed")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": CACHE_DIR}
    command = [sys.executable, TOY, workdir, json.dumps(overrides)]
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while checkpoint.workdir_steps(workdir)[-1:] < [180]:  # about 60% of the way
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline, "no checkpoint at step 180 in time"
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    killed_at = checkpoint.workdir_steps(workdir)[-1]
    assert killed_at < 300
    rerun = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert 180 <= summary["start_step"] < 300 and summary["final_step"] == 300
    assert summary["results"] == uninterrupted["results"]
    params, _ = checkpoint.read_workdir_params(workdir, step=300)
    final, _ = checkpoint.read_workdir_params(str(tmp_path / "reference"), step=300)
    assert_trees_equal(params, final)


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path):
    workdir = str(tmp_path / "nan")
    with pytest.raises(loop.TrainingDivergedError, match=r"non-finite loss \(nan\).* at step 7; the update was "
                                                          r"discarded"):
        toy_task.run(workdir, poison_step=6)  # the 7th step is the first with a NaN loss
    assert checkpoint.workdir_steps(workdir) == [2, 4, 6]  # the step-8 save never happens
    params, _ = checkpoint.read_workdir_params(workdir)
    assert np.all(np.isfinite(params["w"]))


def test_checkpoints_come_at_least_every_tenth_of_the_run_and_every_ckpt_minutes(tmp_path):
    # ckpt_steps 1000 in a 40-step run: the tenth rule saves every 4 steps (keep 3).
    toy_task.run(str(tmp_path / "tenth"), total_steps=40, ckpt_steps=1000, eval_steps=None)
    assert checkpoint.workdir_steps(str(tmp_path / "tenth")) == [32, 36, 40]
    # Steps of 30 ms with ckpt_minutes = 0.03 s: the clock, not the step count, asks for most saves.
    workdir = str(tmp_path / "timed")
    toy_task.run(workdir, total_steps=40, ckpt_steps=1000, eval_steps=None, ckpt_minutes=0.0005,
                 seconds_per_batch=0.03)
    steps = checkpoint.workdir_steps(workdir)
    assert steps[-1] == 40 and any(s % 4 for s in steps), steps


def test_save_clock_counts_wall_time_since_the_last_save():
    now = [100.0]
    clock = checkpoint.SaveClock(2.0, now=lambda: now[0])
    assert not clock.due(1)
    now[0] += 119.0
    assert not clock.due(2)
    now[0] += 1.0
    assert clock.due(3)
    clock.saved()
    assert not clock.due(4)
    assert not checkpoint.SaveClock(0.0, now=lambda: now[0] + 1e9).due(5)  # 0: off


def toy_setup(guard: str, **overrides):
    config = toy_task.toy_config(**overrides)
    task = toy_task.ToyTask(config)
    mesh = jax.make_mesh((1, 1), ("data", "fsdp"), devices=jax.devices()[:1],
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    task.prepare(mesh, "")
    return task, loop.build(config, task, mesh, guard=guard)


@pytest.mark.parametrize("guard", loop.GUARDS)
def test_the_guard_leaves_params_optimizer_and_extra_state_unchanged(guard):
    task, setup = toy_setup(guard, poison_step=1)
    batch = {"x": task.x[:8], "y": task.y[:8]}
    first, metrics = setup.train_step(setup.init(), batch)  # step 0: finite
    assert not bool(metrics["nonfinite"])
    snapshot = jax.tree.map(np.asarray, first)
    second, metrics = setup.train_step(first, batch)  # extra["seen"] == 1: the loss is NaN
    assert bool(metrics["nonfinite"]) and int(second["step"]) == 2
    for name in ("params", "opt_state", "extra"):
        assert_trees_equal(second[name], snapshot[name])


@pytest.mark.parametrize("guard, on_cpu, elsewhere", [("auto", 1, 0), ("cond", 1, 1), ("select", 0, 0)])
def test_the_guard_is_a_conditional_on_the_cpu_and_a_select_elsewhere(guard, on_cpu, elsewhere):
    """'auto' keeps the CPU's in-place conditional and gives GPUs and TPUs a select, so that XLA:GPU never waits
    on the host for a predicate; the compiled CPU program keeps the conditional."""
    _, setup = toy_setup(guard)
    batch = {"x": jax.ShapeDtypeStruct((8, toy_task.FEATURES), np.float32),
             "y": jax.ShapeDtypeStruct((8,), np.float32)}
    traced = setup.train_step.trace(setup.abstract_state, batch)
    counts = {platform: data_dependent_conditionals(traced.lower(lowering_platforms=(platform,)).as_text())
              for platform in ("cpu", "cuda", "tpu")}
    assert counts == {"cpu": on_cpu, "cuda": elsewhere, "tpu": elsewhere}
    assert traced.lower().compile().as_text().count(" conditional(") == on_cpu


def test_an_unknown_guard_is_refused():
    with pytest.raises(ValueError, match="guard must be one of"):
        toy_setup("maybe")


def test_config_errors_come_before_anything_is_written(tmp_path):
    from usf_mae_jax.cli import ConfigError

    for overrides, message in (({"total_steps": -5}, "total_steps must not be negative"),
                               ({"batch_size": 0}, "batch_size must be a positive integer"),
                               ({"warmup_steps": 50}, r"the warmup \(50 updates\) is longer than the run"),
                               ({"eval_epochs": 1.0}, "set only one of eval_steps / eval_epochs"),
                               ({"log_steps": 0}, "log_steps must be a positive integer")):
        with pytest.raises(ConfigError, match=message):
            toy_task.run(str(tmp_path / "w"), **overrides)
        assert not os.path.exists(tmp_path / "w")
