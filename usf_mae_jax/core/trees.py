"""Parameter trees as flat `{"a/b/c": leaf}` dicts, and back.

Params are nested dicts whose paths mirror the reference PyTorch keys (`blocks_0/attn/qkv/kernel`,
docs/mae_fidelity.md). Loading weights, comparing checkpoints, weight-decay masks and layer decay all work on
those '/'-joined paths; this module is the one place that turns a tree into paths and back.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax


def key_name(key: Any) -> str:
    """The plain name of one path entry (dict key, attribute or sequence index)."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_names(path: tuple) -> tuple[str, ...]:
    """A jax key path as a tuple of plain names, e.g. ("blocks_3", "attn", "qkv", "kernel")."""
    return tuple(key_name(k) for k in path)


def path_string(path: tuple) -> str:
    return "/".join(path_names(path))


def flatten(tree: Any) -> dict[str, Any]:
    """{"blocks_0/attn/qkv/kernel": leaf, ...} in the tree's leaf order."""
    return {path_string(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten(flat: Mapping[str, Any]) -> dict:
    """The nested dict of a flat '/'-path dict (the inverse of `flatten` for dict trees)."""
    nested: dict = {}
    for name, value in flat.items():
        node = nested
        *parents, leaf = name.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """{path: shape} of a tree of arrays, ShapeDtypeStructs or checkpoint metadata."""
    return {name: tuple(leaf.shape) for name, leaf in flatten(tree).items()}


def map_with_names(fn, tree: Any) -> Any:
    """`jax.tree.map` whose function receives the leaf's '/'-path first: fn(name, leaf)."""
    return jax.tree_util.tree_map_with_path(lambda p, leaf: fn(path_string(p), leaf), tree)


def count(tree: Any) -> int:
    """Number of scalars in a tree of arrays or ShapeDtypeStructs."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        size = 1
        for dim in leaf.shape:
            size *= int(dim)
        total += size
    return total
