"""Checkpoints under faults, with the toy task: a corrupt or incomplete newest step is moved aside and the run
resumes from the newest good one (never looping, never needing a manual delete); a failed save (a full disk)
stops the run with one line naming the step and the cause, the older checkpoints intact; readers never write.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import subprocess
import sys

import orbax.checkpoint as ocp
import pytest
import toy_task
from conftest import CACHE_DIR, ROOT
from helpers import assert_trees_equal

from usf_mae_jax.core import checkpoint

TOY = os.path.join(ROOT, "tests", "toy_task.py")
# 40 steps, so that the checkpoint every ckpt_steps=4 is also the one per tenth of the run the loop guarantees:
# the steps saved are 4, 8, 12, ... as the faults below expect.
LONG = {"total_steps": 40}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("reference") / "run")
    return toy_task.run(workdir, **LONG)


def crashed_after_step_8(workdir: str) -> None:
    """A run that crashed during step 11, leaving checkpoints 4 and 8."""
    with pytest.raises(RuntimeError, match="simulated crash"):
        toy_task.run(workdir, fail_after_batches=10, **LONG)
    assert checkpoint.workdir_steps(workdir) == [4, 8]


def data_files(step_dir: str) -> list[str]:
    """The state's array data, as OCDBT stores it once a save is finalised."""
    return sorted(glob.glob(os.path.join(step_dir, "state", "d", "*")))


def delete_a_data_file(step_dir: str) -> None:
    os.remove(data_files(step_dir)[0])


def delete_the_metadata(step_dir: str) -> None:
    os.remove(os.path.join(step_dir, "state", "_METADATA"))


def truncate_an_array_file(step_dir: str) -> None:
    largest = max(data_files(step_dir), key=os.path.getsize)
    with open(largest, "r+b") as f:
        f.truncate(os.path.getsize(largest) // 2)


def resume_in_a_new_process(workdir: str) -> tuple[dict, list[str]]:
    """Runs the toy in a fresh interpreter (nothing cached from the writing process); (summary, stderr lines)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": CACHE_DIR}
    proc = subprocess.run([sys.executable, TOY, workdir, json.dumps(LONG)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr.splitlines()


@pytest.mark.parametrize("damage", [delete_a_data_file, delete_the_metadata, truncate_an_array_file])
def test_a_corrupt_newest_checkpoint_is_moved_aside_and_the_run_resumes(reference, tmp_path, damage):
    workdir = str(tmp_path / "run")
    crashed_after_step_8(workdir)
    damage(os.path.join(workdir, "checkpoints", "8"))
    resumed, log_lines = resume_in_a_new_process(workdir)
    warnings = [line for line in log_lines if "moved aside" in line]
    assert len(warnings) == 1 and "checkpoint step 8" in warnings[0], log_lines[-20:]
    assert resumed["start_step"] == 4 and resumed["final_step"] == 40
    assert resumed["results"] == reference["results"]
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "8.corrupt-0"))
    again = toy_task.run(workdir, **LONG)  # finished: no loop, no second warning, no error
    assert again["start_step"] == 40 and again["results"] == reference["results"]


class _FullDisk:
    """A commit future that fails as a write to a full disk does."""

    def result(self, timeout=None):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/run/checkpoints/8/state/d/0001")


def test_a_failed_save_stops_the_run_naming_the_step_and_keeps_older_checkpoints(reference, tmp_path,
                                                                                 monkeypatch):
    original = ocp.StandardCheckpointHandler.async_save

    async def fail_step_8(self, directory, *args, **kwargs):
        futures = await original(self, directory, *args, **kwargs)
        if os.sep + "8." in str(directory):
            futures = [*futures, _FullDisk()]
        return futures

    monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", fail_step_8)
    workdir = str(tmp_path / "run")
    with pytest.raises(checkpoint.CheckpointSaveError) as raised:
        toy_task.run(workdir, seconds_per_batch=0.05, **LONG)
    message = str(raised.value)
    assert "saving the checkpoint of step 8" in message and "No space left on device" in message
    assert "\n" not in message and "older checkpoints are intact" in message
    assert checkpoint.workdir_steps(workdir) == [4]
    monkeypatch.undo()
    resumed = toy_task.run(workdir, **LONG)
    assert resumed["start_step"] == 4
    assert_trees_equal(toy_task.params_of(resumed), toy_task.params_of(reference))


def test_readers_create_clean_and_lock_nothing(reference, tmp_path):
    workdir = str(tmp_path / "run")
    crashed_after_step_8(workdir)
    in_flight = os.path.join(workdir, "checkpoints", "12.orbax-checkpoint-tmp")  # a save in progress
    os.makedirs(os.path.join(in_flight, "state"))
    before = sorted(os.path.relpath(p, workdir) for p in glob.glob(os.path.join(workdir, "**"), recursive=True))
    mtimes = {p: os.path.getmtime(os.path.join(workdir, p)) for p in before}
    params, _ = checkpoint.load_params(workdir)  # the best state of step 8
    assert params["w"].shape == (4,)
    params_4, _ = checkpoint.read_workdir_params(workdir, step=4)
    assert params_4["w"].shape == (4,)
    after = sorted(os.path.relpath(p, workdir) for p in glob.glob(os.path.join(workdir, "**"), recursive=True))
    assert after == before
    assert all(os.path.getmtime(os.path.join(workdir, p)) == mtimes[p] for p in before)
    with pytest.raises(FileNotFoundError, match="has no checkpoint of step 5; it has steps \\[4, 8\\]"):
        checkpoint.read_workdir_params(workdir, step=5)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoint.load_params(str(tmp_path / "nothing"))
    assert not os.path.exists(tmp_path / "nothing")


def test_a_reader_whose_step_is_deleted_by_a_live_run_reads_the_newer_one(tmp_path, monkeypatch):
    workdir = str(tmp_path / "run")
    crashed_after_step_8(workdir)
    expected, _ = checkpoint.read_workdir_params(workdir, step=8)  # step 12 will be a copy of step 8
    steps_dir = os.path.join(workdir, "checkpoints")
    read_step = checkpoint._read_step_params
    calls = []

    def keep_n_strikes_during_the_first_read(path, step):
        calls.append(step)
        if len(calls) == 1:  # meanwhile the run commits step 12 and starts deleting step 8
            shutil.copytree(os.path.join(steps_dir, "8"), os.path.join(steps_dir, "12"))
            for item in os.listdir(os.path.join(steps_dir, "8")):
                if os.path.isdir(os.path.join(steps_dir, "8", item)):
                    shutil.rmtree(os.path.join(steps_dir, "8", item))
            raise checkpoint.CheckpointError(f"{path}: checkpoint step {step} cannot be read (deleted)")
        return read_step(path, step)

    monkeypatch.setattr(checkpoint, "_read_step_params", keep_n_strikes_during_the_first_read)
    params, step = checkpoint.read_workdir_params(workdir)
    assert (calls, step) == ([8, 12], 12)
    assert_trees_equal(params, expected)


def test_a_newest_step_that_cannot_be_read_is_an_error_not_a_retry(tmp_path, monkeypatch):
    workdir = str(tmp_path / "run")
    crashed_after_step_8(workdir)
    calls = []

    def unreadable(path, step):
        calls.append(step)
        raise checkpoint.CheckpointError(f"{path}: checkpoint step {step} cannot be read (damaged)")

    monkeypatch.setattr(checkpoint, "_read_step_params", unreadable)
    with pytest.raises(checkpoint.CheckpointError, match="step 8 cannot be read"):
        checkpoint.read_workdir_params(workdir)
    assert calls == [8]
