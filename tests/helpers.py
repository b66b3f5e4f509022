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


def read_events(path) -> list:
    """The `Event` protos of one TensorBoard event file (TFRecord framing: length, crc, data, crc)."""
    import struct

    from tensorboardX.proto import event_pb2

    events = []
    with open(path, "rb") as f:
        while header := f.read(12):
            (length,) = struct.unpack("<Q", header[:8])
            data = f.read(length)
            f.read(4)
            event = event_pb2.Event()
            event.ParseFromString(data)
            events.append(event)
    return events


def scalar_steps(events, tag: str) -> list[int]:
    return [e.step for e in events if e.HasField("summary") and any(v.tag == tag for v in e.summary.value)]


def converted_busbra(root, patients: int, size: int, seed: int, **tree_options) -> str:
    """A synthetic BUS-BRA-layout tree (`mock.write_busbra_tree` with `tree_options`, e.g. fat_lobules=True)
    converted with the benchmark builder; returns the --out_dir."""
    from data_prep.benchmarks import convert, mock

    mock.write_busbra_tree(str(root / "raw"), patients=patients, size=size, seed=seed, **tree_options)
    convert("busbra", str(root / "raw"), str(root / "out"))
    return str(root / "out")


def set_fields(config, fields: dict, separator: str = "."):
    """Sets nested config fields named by paths ("model.width" or "model__width"); returns the config."""
    for key, value in fields.items():
        node = config
        *path, last = key.split(separator)
        for part in path:
            node = node[part]
        node[last] = value
    return config


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
