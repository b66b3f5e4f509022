"""Orbax checkpoints of a run, auto-resume, and read-only loading of weights for `init`.

A training workdir holds `W/checkpoints/<step>/` with up to four items, saved together and asynchronously:

    state      {step, params, opt_state[, extra]}: everything the train step carries (extra: e.g. BatchNorm
               statistics of a probe head)
    data_iter  the position of the input pipeline, one JSON file per process (grain's checkpoint handler)
    loop       JSON: the loop's own record (evaluations so far, the best metric and its step)
    best       {params[, extra]} of the best evaluation so far, for runs that select by a metric

`Checkpointer` is the writer, owned by the training loop: it keeps the newest `keep` steps, resumes from the
newest step that restores, moves a corrupt or incomplete newest step aside (renamed `<step>.corrupt-<n>`,
one warning naming the step) so that a rerun never loops on it, and turns a failed save (a full disk,
permissions) into an error naming the step and the cause, raised at the next step boundary.

`load_params(workdir)` reads a workdir's params (its `best` params when the run selected by a metric, else
its newest state); `usf_mae_jax.interop.weights.load_weights` builds on it to read any init (a workdir, an
interop import directory, a PyTorch `.pth`/`.pt`/`.safetensors`). Readers open workdirs read-only: they create
nothing, clean nothing and lock nothing, so a reader next to a live run never disturbs it (docs/design.md,
"Checkpoints").
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from usf_mae_jax.cli import CheckpointError, MissingInputError
from usf_mae_jax.core import trees

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
READ_ATTEMPTS = 20  # reads of the newest step while a live run with keep-N deletes the one being read


class IncompatibleCheckpointError(CheckpointError):
    """The workdir holds a checkpoint of a differently shaped model."""


class CheckpointSaveError(CheckpointError):
    """Writing a checkpoint failed (e.g. the disk is full); training stopped, older checkpoints are intact."""


class FrozenIteratorState:
    """A snapshot of an iterator's state for grain's handler: the saved data position is the one of the step
    boundary, even though orbax writes it asynchronously while training goes on."""

    def __init__(self, state: bytes):
        self._state = state

    def get_state(self) -> bytes:
        return self._state


class _IteratorRestoreTarget:
    """What grain's checkpoint handler needs to restore into one of our batch iterators."""

    def __init__(self, iterator: Any):
        self._iterator = iterator

    def set_state(self, state) -> None:
        self._iterator.set_state(state)

    def start_prefetch(self) -> None:  # grain calls this on non-grain iterators after set_state
        pass


@dataclasses.dataclass
class Restored:
    step: int
    state: Any
    best: Any | None
    loop: dict


def _handlers() -> dict[str, Any]:
    return {"state": ocp.StandardCheckpointHandler(), "best": ocp.StandardCheckpointHandler(),
            "loop": ocp.JsonCheckpointHandler(), "data_iter": grain.checkpoint.CheckpointHandler()}


def _describe_error(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}"
    return text.splitlines()[0][:300] if text else type(err).__name__


class Checkpointer:
    """Saves and restores a run's checkpoints in `workdir/checkpoints` (module docstring)."""

    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
        if keep < 1:
            raise CheckpointError(f"keep_ckpts must be at least 1, got {keep}")
        self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               cleanup_tmp_directories=True, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=_handlers())
        self._pending_step: int | None = None

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def check_compatible(self, abstract_params: Any) -> None:
        """Raises IncompatibleCheckpointError when the newest checkpoint's params differ in shape.

        A step whose metadata cannot be read is left to `restore_latest`, which moves it aside.
        """
        step = self.manager.latest_step()
        if step is None:
            return
        try:
            saved = self.manager.item_metadata(step)["state"]["params"]
        except Exception as err:
            log.debug("metadata of checkpoint %d unreadable: %s", step, err)
            return
        ours, theirs = trees.shapes(abstract_params), trees.shapes(saved)
        problems = [f"{k}: checkpoint {theirs[k]}, config {ours[k]}" for k in sorted(ours.keys() & theirs.keys())
                    if ours[k] != theirs[k]]
        problems += [f"{k}: only in the checkpoint" for k in sorted(theirs.keys() - ours.keys())]
        problems += [f"{k}: only in the config" for k in sorted(ours.keys() - theirs.keys())]
        if problems:
            shown = "; ".join(problems[:8]) + (f"; ... and {len(problems) - 8} more" if len(problems) > 8 else "")
            raise IncompatibleCheckpointError(
                f"workdir {os.path.dirname(self.directory)} holds a checkpoint (step {step}) from an incompatible "
                f"config ({shown}); use a fresh --workdir, or the config it was made with")

    def save(self, step: int, state: Any, data_state: bytes | None, loop_record: dict,
             best: Any | None = None) -> None:
        """Starts an asynchronous save of step `step`; a failure is raised as CheckpointSaveError."""
        self._finish_pending()  # orbax allows one save in flight; a failure of it is named with its own step
        items = {"state": ocp.args.StandardSave(state), "loop": ocp.args.JsonSave(loop_record)}
        if best is not None:
            items["best"] = ocp.args.StandardSave(best)
        if data_state is not None:
            items["data_iter"] = grain.checkpoint.CheckpointSave(FrozenIteratorState(data_state))
        try:
            self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as err:
            raise self._save_failed(step, err) from err
        self._pending_step = step

    def _save_failed(self, step: int | None, err: BaseException) -> CheckpointSaveError:
        return CheckpointSaveError(f"saving the checkpoint of step {step} in {self.directory} failed: "
                                   f"{_describe_error(err)}; the older checkpoints are intact")

    def _finish_pending(self) -> None:
        """Waits for the save in flight; raises CheckpointSaveError naming its step if it failed."""
        if self._pending_step is None:
            return
        step, self._pending_step = self._pending_step, None
        try:
            self.manager.wait_until_finished()
        except Exception as err:
            raise self._save_failed(step, err) from err

    def check_for_errors(self) -> None:
        """Raises CheckpointSaveError as soon as the save in flight has failed (called at every step boundary).

        A save that is still being written is left alone, so the check never waits.
        """
        if self._pending_step is not None and not self.manager.is_saving_in_progress():
            self._finish_pending()

    def _move_aside(self, step: int, err: BaseException) -> None:
        source = os.path.join(self.directory, str(step))
        if jax.process_index() == 0 and os.path.isdir(source):
            index = 0
            while os.path.exists(f"{source}.corrupt-{index}"):
                index += 1
            os.rename(source, f"{source}.corrupt-{index}")
            log.warning("checkpoint step %d in %s is corrupt or incomplete (%s); moved aside to %d.corrupt-%d, "
                        "resuming from an older one", step, self.directory, _describe_error(err), step, index)
        _barrier(f"checkpoint_moved_aside_{step}")
        self.manager.reload()

    def restore_latest(self, abstract_state: Any, abstract_best: Any | None, iterator: Any | None
                       ) -> Restored | None:
        """Restores the newest restorable step onto the abstract trees' shardings; None if there is none."""
        for step in reversed(self.steps()):
            items: dict[str, Any] = {"state": ocp.args.StandardRestore(abstract_state), "loop": ocp.args.JsonRestore()}
            step_dir = os.path.join(self.directory, str(step))
            if abstract_best is not None and os.path.isdir(os.path.join(step_dir, "best")):
                items["best"] = ocp.args.StandardRestore(abstract_best)
            data_file = os.path.join(step_dir, "data_iter",
                                     f"process_{jax.process_index()}-of-{jax.process_count()}.json")
            if iterator is not None and os.path.exists(data_file):
                items["data_iter"] = grain.checkpoint.CheckpointRestore(_IteratorRestoreTarget(iterator))
            elif iterator is not None:
                log.warning("checkpoint step %d has no data position for %d processes (it was written by another "
                            "process count); restoring the train state only, the data order restarts", step,
                            jax.process_count())
            error = None
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(**items))
            except Exception as err:
                error = err
            if not _all_processes_agree(error is None):
                self._move_aside(step, error or RuntimeError("another process could not restore it"))
                continue
            best = restored["best"] if "best" in items else None
            return Restored(step, restored["state"], best, dict(restored["loop"] or {}))
        return None

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        """Blocks until the save in flight is written; raises CheckpointSaveError if it failed."""
        self._finish_pending()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()


class SaveClock:
    """Whether `minutes` have passed since the last save, with the same answer on every process.

    A save is collective (every process writes its part), so a wall-clock rule must not let the hosts'
    clocks disagree: with several processes, process 0's answer is broadcast, and only at `sync_every`
    steps so that the collective stays out of most steps. `minutes` <= 0 turns the rule off.
    """

    def __init__(self, minutes: float | None, sync_every: int = 1, now: Any = time.monotonic):
        self.seconds = 60.0 * float(minutes or 0.0)
        self.sync_every = max(int(sync_every), 1)
        self._now = now
        self._last = now()

    def due(self, step: int) -> bool:
        if self.seconds <= 0:
            return False
        if jax.process_count() == 1:
            return self._now() - self._last >= self.seconds
        if step % self.sync_every:
            return False
        from jax.experimental import multihost_utils

        late = np.asarray(self._now() - self._last >= self.seconds, np.int32)
        return bool(multihost_utils.broadcast_one_to_all(late))

    def saved(self) -> None:
        self._last = self._now()


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _all_processes_agree(ok: bool) -> bool:
    """True when `ok` holds on every process (a restore must succeed everywhere or be skipped everywhere)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


# ------------------------------------------------------------------------------------------ read-only


def workdir_steps(workdir: str) -> list[int]:
    """Committed checkpoint steps of a workdir, found without opening it for writing."""
    directory = os.path.join(workdir, CHECKPOINT_DIR)
    if not os.path.isdir(directory):
        return []
    steps = []
    for name in os.listdir(directory):
        full = os.path.join(directory, name)
        if name.isdigit() and os.path.isfile(os.path.join(full, "_CHECKPOINT_METADATA")):
            steps.append(int(name))
    return sorted(steps)


def _read_only_manager(workdir: str) -> ocp.CheckpointManager:
    """A manager that only reads: no folder created, no temporary cleaned, nothing locked or written."""
    handlers = {**_handlers(), "state": ocp.PyTreeCheckpointHandler(), "best": ocp.PyTreeCheckpointHandler()}
    absl_log = logging.getLogger("absl")
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)  # orbax warns that a read-only manager will not save; that is the point
    try:
        options = ocp.CheckpointManagerOptions(read_only=True, create=False, cleanup_tmp_directories=False,
                                               enable_async_checkpointing=False, save_root_metadata=False)
        return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR), options=options,
                                     item_handlers=handlers)
    finally:
        absl_log.setLevel(level)


def read_workdir_params(workdir: str, step: int | None = None) -> tuple[dict, int]:
    """(params as NumPy, step) from a workdir's checkpoint: the `best` item when present, else the state's.

    Read-only; `step` None takes the newest committed step. Only the params are read (not the optimizer). A
    live run may delete the step being read (keep-N) once it has saved newer ones; the newest step is then read
    again, up to READ_ATTEMPTS times. A step that fails while it is still the newest is an error.
    """
    for attempt in range(READ_ATTEMPTS):
        steps = workdir_steps(workdir)
        if not steps:
            raise MissingInputError(f"{workdir} is a workdir without any complete checkpoint")
        chosen = steps[-1] if step is None else step
        if chosen not in steps:
            raise MissingInputError(f"{workdir} has no checkpoint of step {step}; it has steps {steps}")
        try:
            return _read_step_params(workdir, chosen), chosen
        except CheckpointError:
            if step is not None or attempt == READ_ATTEMPTS - 1 or not _superseded(workdir, chosen):
                raise
            log.info("checkpoint step %d of %s was removed while it was read; reading the newest", chosen, workdir)
    raise AssertionError("unreachable")


def _superseded(workdir: str, step: int) -> bool:
    """True when a live run has moved past `step`: its folder is (being) removed or a newer step is committed."""
    steps = workdir_steps(workdir)
    return not os.path.isdir(os.path.join(workdir, CHECKPOINT_DIR, str(step))) or not steps or steps[-1] > step


def _read_step_params(workdir: str, step: int) -> dict:
    step_dir = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR, str(step))
    item = "best" if os.path.isdir(os.path.join(step_dir, "best")) else "state"
    try:
        # Opening the manager lists the steps, so a live run's keep-N deleting one meanwhile surfaces here too.
        manager = _read_only_manager(workdir)
    except Exception as err:
        raise CheckpointError(f"{workdir}: checkpoint step {step} cannot be read ({_describe_error(err)})") from err
    try:
        host = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        tree = manager.item_metadata(step)[item]
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=host), dict(tree)["params"])
        restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=host), target)
        restored = manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.PyTreeRestore(
            item={"params": target}, restore_args={"params": restore_args}, partial_restore=True)}))
    except Exception as err:
        raise CheckpointError(f"{workdir}: checkpoint step {step} cannot be read ({_describe_error(err)})") from err
    finally:
        manager.close()
    return jax.tree.map(np.asarray, restored[item]["params"])


def load_params(workdir: str, step: int | None = None) -> tuple[dict, dict | None]:
    """(params, model fields or None) of a training workdir, read-only (module docstring).

    The model fields are the `resolved_model` its config.json records. Weights in other forms (a PyTorch
    file, an interop import directory) are read one floor up, by `usf_mae_jax.interop.weights.load_weights`,
    which calls this for workdirs: core never imports the interop layer.
    """
    if not workdir:
        raise MissingInputError("no checkpoint path given")
    if not os.path.exists(workdir):
        raise MissingInputError(f"checkpoint path {workdir} does not exist")
    if not os.path.isdir(os.path.join(workdir, CHECKPOINT_DIR)):
        raise MissingInputError(f"{workdir} is not a training workdir (it has no {CHECKPOINT_DIR}/ folder)")
    params, _ = read_workdir_params(workdir, step)
    config_path = os.path.join(workdir, "config.json")
    fields = None
    if os.path.exists(config_path):
        with open(config_path) as f:
            fields = json.load(f).get("resolved_model")
    return params, fields


def is_workdir(path: str) -> bool:
    """True for a training workdir (a folder with a checkpoints/ folder), whatever its steps."""
    return os.path.isdir(os.path.join(path, CHECKPOINT_DIR))
