"""Helpers shared by the tests: the pretraining step of a config on a given mesh, and tree comparisons."""

from __future__ import annotations

import json

import jax
import numpy as np


def pretrain_setup(config, mesh, **build_options):
    """The training loop's `Setup` (jitted init and step) of a pretraining config on `mesh`; `build_options` go to
    `loop.build` (e.g. guard="select")."""
    from usf_mae_jax.trainers import loop
    from usf_mae_jax.trainers.pretrain import PretrainTask

    task = PretrainTask(config)
    task.prepare(mesh, "")
    return loop.build(config, task, mesh, **build_options)


def assert_trees_equal(a, b):
    flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
    flat_b = jax.tree.leaves(b)
    assert len(flat_a) == len(flat_b)
    for (path, x), y in zip(flat_a, flat_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def read_text(path) -> str:
    with open(path) as f:
        return f.read()


def read_json(path):
    with open(path) as f:
        return json.load(f)
