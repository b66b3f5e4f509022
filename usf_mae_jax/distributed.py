"""Multi-process initialisation: JAX's own multi-controller runtime, detected from the environment.

`python launch.py ...` runs unchanged on one machine, on every host of a Cloud TPU pod slice and on every
task of a SLURM job. `jax.distributed.initialize()` is called only when the environment is multi-process:
  * explicit `--coordinator_address/--num_processes/--process_id` flags (any cluster);
  * SLURM with more than one task (JAX reads SLURM_* itself);
  * a multi-host Cloud TPU slice (JAX reads the TPU metadata itself).
A single process does nothing extra.

GPU recipes run one process per GPU (docs/accelerators.md). JAX then restricts each process to one GPU: the one
named by JAX_LOCAL_DEVICE_IDS (scripts/multi_gpu.sh sets it), or under SLURM the task's SLURM_LOCALID, which
assumes every task sees all of the node's GPUs. Where SLURM already bound each task to its own GPU (its
CUDA_VISIBLE_DEVICES lists one), that GPU is local device 0 (`slurm_local_device_ids`).
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)


def detected_environment(env: dict | None = None) -> str | None:
    """'slurm', 'tpu_pod' or None for a single-process environment."""
    env = os.environ if env is None else env
    if int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")) or 1) > 1 and "SLURM_JOB_ID" in env:
        return "slurm"
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1:
        return "tpu_pod"
    return None


def slurm_local_device_ids(env: dict | None = None) -> list[int] | None:
    """[0] for a SLURM task bound to a single GPU, else None (JAX's default: GPU SLURM_LOCALID of all visible)."""
    env = os.environ if env is None else env
    if "JAX_LOCAL_DEVICE_IDS" in env:
        return None
    visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return [0] if len(visible) == 1 else None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> str:
    """Initialises the distributed runtime when needed; returns how ('explicit', 'slurm', 'tpu_pod', 'single')."""
    explicit = [coordinator_address, num_processes, process_id]
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise ValueError("--coordinator_address, --num_processes and --process_id must be given together")
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
        return "explicit"
    kind = detected_environment()
    if kind is None:
        return "single"
    jax.distributed.initialize(local_device_ids=slurm_local_device_ids() if kind == "slurm" else None)
    return kind


def describe() -> str:
    """One line on processes and devices, logged by process 0."""
    local, devices = jax.local_devices(), jax.devices()
    return (f"process {jax.process_index()} of {jax.process_count()}; {len(local)} local and {len(devices)} global "
            f"devices ({devices[0].platform}: {devices[0].device_kind})")
