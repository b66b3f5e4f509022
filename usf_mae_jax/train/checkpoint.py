"""Orbax checkpoints: the train state and the data-iterator position, saved together, resumed automatically.

Layout: `workdir/checkpoints/<step>/{state, data_iter}`. One `CheckpointManager` per workdir saves
asynchronously and keeps the newest `keep` steps. Running the same command again resumes from the newest
checkpoint that restores; a step directory left half-written by a crash is skipped (orbax only lists
committed steps, and a committed-looking directory that fails to restore makes us fall back to the previous
one, see jax_stack.md 2d). Before anything is compiled, the saved parameter shapes are compared with the
current model, so a workdir from another config fails with a message listing the differences.

Params-only initialisation (`init_from`) is a separate path from resuming: it loads weights, never the
optimizer state or the step.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from usf_mae_jax.data.pipeline import FrozenIteratorState

log = logging.getLogger(__name__)


class IncompatibleCheckpointError(ValueError):
    """The workdir holds a checkpoint of a differently shaped model."""


class _IteratorRestoreTarget:
    """What grain's checkpoint handler needs to restore into a GlobalBatchIterator."""

    def __init__(self, iterator: Any):
        self._iterator = iterator

    def set_state(self, state) -> None:
        self._iterator.set_state(state)

    def start_prefetch(self) -> None:  # grain calls this on non-grain iterators after set_state
        pass


def _path_shapes(tree: Any) -> dict[str, tuple]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p, simple=True, separator="/"): tuple(leaf.shape) for p, leaf in flat}


class Checkpointer:
    """Saves and restores {state, data_iter} in `workdir/checkpoints`."""

    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               cleanup_tmp_directories=True, create=True)
        handlers = {"state": ocp.StandardCheckpointHandler(), "data_iter": grain.checkpoint.CheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def check_compatible(self, abstract_params: Any) -> None:
        """Raises IncompatibleCheckpointError when the newest checkpoint's params differ in shape."""
        step = self.manager.latest_step()
        if step is None:
            return
        try:
            saved = self.manager.item_metadata(step)["state"]["params"]
        except (KeyError, TypeError, FileNotFoundError, ValueError) as err:
            log.warning("could not read the metadata of checkpoint %d (%s); relying on restore", step, err)
            return
        ours, theirs = _path_shapes(abstract_params), _path_shapes(saved)
        problems = [f"  {k}: checkpoint {theirs[k]}, config {ours[k]}" for k in sorted(ours.keys() & theirs.keys())
                    if ours[k] != theirs[k]]
        problems += [f"  {k}: only in the checkpoint" for k in sorted(theirs.keys() - ours.keys())]
        problems += [f"  {k}: only in the config" for k in sorted(ours.keys() - theirs.keys())]
        if problems:
            shown = "\n".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
            raise IncompatibleCheckpointError(
                f"workdir {os.path.dirname(self.directory)} holds a checkpoint (step {step}) from an incompatible "
                f"config; parameter differences:\n{shown}\nUse a fresh --workdir, or the config it was made with.")

    def save(self, step: int, state: Any, data_state: bytes | None, force: bool = False) -> bool:
        items = {"state": ocp.args.StandardSave(state)}
        if data_state is not None:
            items["data_iter"] = grain.checkpoint.CheckpointSave(FrozenIteratorState(data_state))
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore_latest(self, abstract_state: Any, iterator: Any | None) -> tuple[Any, int] | None:
        """Restores the newest restorable step onto `abstract_state`'s shardings; None if there is none."""
        for step in reversed(self.steps()):
            items = {"state": ocp.args.StandardRestore(abstract_state)}
            data_file = os.path.join(self.directory, str(step), "data_iter",
                                     f"process_{jax.process_index()}-of-{jax.process_count()}.json")
            if iterator is not None and os.path.exists(data_file):
                items["data_iter"] = grain.checkpoint.CheckpointRestore(_IteratorRestoreTarget(iterator))
            elif iterator is not None:
                log.warning("checkpoint step %d has no data position for %d processes (it was written by another "
                            "process count); restoring the train state only, the data order restarts", step,
                            jax.process_count())
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(**items))
            except (FileNotFoundError, ValueError, KeyError, OSError) as err:
                log.warning("checkpoint step %d in %s does not restore (%s); trying an older one",
                            step, self.directory, err)
                continue
            return restored["state"], step
        return None

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def load_init_params(path: str) -> tuple[dict, dict | None]:
    """Params for `init_from`: a pretraining workdir (its newest checkpoint), an interop import directory, or
    a PyTorch `.pth`/`.pt`/`.safetensors` file (through usf_mae_jax.interop). Returns (params, model fields)
    where model fields is the saved ModelConfig as a dict when known.
    """
    if os.path.isfile(path):
        from usf_mae_jax.interop import torch_mae  # local: the interop layer is only needed for torch files

        params, model_config, _ = torch_mae.load_pretrained(path)
        return params, _asdict(model_config)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        manager = Checkpointer(path).manager
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"{path} is a workdir without any complete checkpoint")
        # Restore onto this host's first device: the checkpoint may come from another mesh or process count.
        host = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=host),
                              manager.item_metadata(step)["state"])
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
        manager.close()
        params = jax.tree.map(np.asarray, restored["state"]["params"])
        config_path = os.path.join(path, "config.json")
        fields = None
        if os.path.exists(config_path):
            with open(config_path) as f:
                fields = json.load(f).get("resolved_model")
        return params, fields
    if os.path.isdir(path):
        from usf_mae_jax.interop import torch_mae

        params, model_config, _ = torch_mae.load_pretrained(path)
        return params, _asdict(model_config)
    raise FileNotFoundError(f"init_from path {path} does not exist")


def _asdict(model_config: Any) -> dict | None:
    import dataclasses

    return dataclasses.asdict(model_config) if dataclasses.is_dataclass(model_config) else None
