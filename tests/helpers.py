"""Helpers shared by the tests: the pretraining step of a config on a given mesh, tree comparisons, and the
conditionals of a lowered program."""

from __future__ import annotations

import json
import re

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


def data_dependent_conditionals(stablehlo: str) -> int:
    """`stablehlo.case`/`if` ops whose branch index is computed from data; `lax.platform_dependent` leaves cases on
    a constant platform index (or on a case of one), which the compiler folds away. SSA names are per function."""
    count = stablehlo.count("stablehlo.if")
    for function in stablehlo.split("func.func")[1:]:
        definitions, indices = {}, {}
        for name, op in re.findall(r"^\s*(%[\w#]+)(?::\d+)? = \"?([\w.]+)", function, re.MULTILINE):
            definitions.setdefault(name, op)
        for name, index in re.findall(r"^\s*(%[\w#]+)(?::\d+)? = \"stablehlo.case\"\((%[\w#]+)\)", function,
                                      re.MULTILINE):
            indices.setdefault(name, index)

        cases = re.findall(r"\"stablehlo.case\"\((%[\w#]+)\)", function)
        count += sum(not _constant_index(index, definitions, indices) for index in cases)
    return count


def _constant_index(name: str, definitions: dict, indices: dict) -> bool:
    op = definitions.get(name, "")
    return op == "stablehlo.constant" or (op == "stablehlo.case" and
                                          _constant_index(indices[name], definitions, indices))
