"""Device mesh and shardings, inferred from array shapes.

One code path for one CPU, eight GPUs and a TPU pod (docs/design.md, "Sharding"):
  * the mesh has axes ('data', 'fsdp'), with Auto axis types so XLA inserts the FSDP all-gathers;
  * batches are split over both axes;
  * a parameter (or optimizer moment) is sharded over 'fsdp' along its largest dimension divisible by the
    fsdp size, when it holds at least `fsdp_min_size` elements; everything else is replicated.
Because the rule only looks at shapes, Adam's moments get the same sharding as their parameters without any
per-optimizer plumbing, and the optimizer state is created directly in its sharded layout.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp")


def mesh_shape(data: int, fsdp: int, device_count: int) -> tuple[int, int]:
    """Resolves -1 entries so that data * fsdp == device_count, with clear errors otherwise."""
    sizes = [data, fsdp]
    if sizes.count(-1) > 1:
        raise ValueError("at most one mesh axis may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes must be positive or -1, got data={data}, fsdp={fsdp}")
    if -1 in sizes:
        if device_count % known:
            raise ValueError(f"{device_count} devices cannot be split into a mesh with an axis of size {known}")
        sizes[sizes.index(-1)] = device_count // known
    if sizes[0] * sizes[1] != device_count:
        raise ValueError(f"mesh data={sizes[0]} x fsdp={sizes[1]} does not cover the {device_count} devices")
    return sizes[0], sizes[1]


def make_mesh(mesh_cfg: Any, devices: list | None = None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(mesh_cfg.data, mesh_cfg.fsdp, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways the batch is split: over both mesh axes."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def partition_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int) -> PartitionSpec:
    """FSDP rule: shard the largest dimension divisible by fsdp_size, if the array is large enough."""
    if fsdp_size <= 1 or not shape or int(np.prod(shape)) < min_size:
        return PartitionSpec()
    candidates = [d for d in range(len(shape)) if shape[d] % fsdp_size == 0]
    if not candidates:
        return PartitionSpec()
    axis = max(candidates, key=lambda d: (shape[d], -d))
    spec = [None] * len(shape)
    spec[axis] = "fsdp"
    return PartitionSpec(*spec)


def tree_shardings(abstract_tree: Any, mesh: Mesh, min_size: int) -> Any:
    """NamedShardings for every leaf of a tree of arrays or ShapeDtypeStructs."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, partition_spec(tuple(x.shape), fsdp, min_size)),
                        abstract_tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches split along their first dimension over both mesh axes."""
    return NamedSharding(mesh, PartitionSpec(MESH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def to_global(host_batch: dict[str, Any], batch_sharded: NamedSharding) -> dict[str, jax.Array]:
    """This process's rows of a global batch -> global `jax.Array`s split over the mesh's batch axes.

    Every process passes its own rows (the global batch divided by the process count, in process order);
    the one place where host batches become device arrays, for every task.
    """
    return {name: jax.make_array_from_process_local_data(batch_sharded, np.asarray(rows))
            for name, rows in host_batch.items()}


def local_rows(global_batch: int) -> slice:
    """The rows of a global batch that this process materialises (process i holds the i-th block)."""
    count, index = jax.process_count(), jax.process_index()
    if global_batch % count:
        raise ValueError(f"batch size {global_batch} is not divisible by the {count} processes")
    local = global_batch // count
    return slice(index * local, (index + 1) * local)


def describe(abstract_tree: Any, shardings: Any) -> list[str]:
    """One line per leaf: path, shape and partition spec (for --print_sharding and logs)."""
    lines = []
    flat_shapes = jax.tree_util.tree_flatten_with_path(abstract_tree)[0]
    flat_specs = jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, NamedSharding))
    for (path, leaf), sharding in zip(flat_shapes, flat_specs):
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        lines.append(f"{name:70s} {tuple(leaf.shape)!s:22s} {sharding.spec}")
    return lines
