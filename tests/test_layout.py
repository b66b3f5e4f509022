"""The rules of the house (docs/design.md): the library imports neither data_prep nor configs, its modules
form no import cycle and no upward import between floors, and nothing in it edits sys.path or cites documents
outside the repository."""

from __future__ import annotations

import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "usf_mae_jax"


def library_modules() -> dict[str, str]:
    """{dotted module name: file path} of every module in the package."""
    modules = {}
    for folder, _, names in os.walk(os.path.join(ROOT, PACKAGE)):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                modules[dotted.removesuffix(".__init__")] = path
    return modules


def imported_names(path: str) -> list[str]:
    """Every module a file imports, at any depth of the file (function-level imports count too)."""
    with open(path) as f:
        tree = ast.parse(f.read())
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def import_graph() -> dict[str, set[str]]:
    modules = library_modules()
    graph = {}
    for module, path in modules.items():
        targets = {name for name in imported_names(path) if name in modules and name != module}
        # A package's __init__ is not an edge to its children (importing a.b runs a/__init__ first anyway).
        graph[module] = {t for t in targets if not module.startswith(t + ".")}
    return graph


# docs/design.md, "Layout": the floors, lowest first. A module may import its own floor and the ones below.
FLOORS = (
    ("cli", "accelerators", "distributed", "host_memory"),
    ("core",),
    ("models", "data", "torch_reference"),
    ("evaluators", "interop", "embed"),
    ("trainers",),
    ("study", "bench", "attention_bench", "torch_bench"),
)


def floor_of(module: str) -> int:
    """The floor of a library module, from its first name below the package (`usf_mae_jax.core.x` -> core)."""
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else ""
    for level, names in enumerate(FLOORS):
        if top in names:
            return level
    raise KeyError(f"{module} is on no floor: add {top!r} to FLOORS in tests/test_layout.py and docs/design.md")


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import of a module from a higher floor, as 'importer -> imported (floor a -> floor b)'."""
    return sorted(f"{source} -> {target} (floor {floor_of(source)} -> {floor_of(target)})"
                  for source, targets in graph.items() for target in targets
                  if source != PACKAGE and floor_of(target) > floor_of(source))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_the_library_imports_neither_data_prep_nor_configs():
    offenders = {module: sorted(n for n in imported_names(path) if n.split(".")[0] in ("data_prep", "configs"))
                 for module, path in library_modules().items()}
    assert {m: n for m, n in offenders.items() if n} == {}


def test_no_import_cycles():
    graph = import_graph()
    assert "usf_mae_jax.trainers.loop" in graph and "usf_mae_jax.core.sharding" in graph["usf_mae_jax.trainers.loop"]
    assert cycles(graph) == []


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_module_is_on_a_floor_and_none_imports_upward():
    graph = import_graph()
    for module in graph:
        if module != PACKAGE:
            floor_of(module)
    assert upward_imports(graph) == []


def test_the_floor_check_finds_an_upward_import():
    graph = {"usf_mae_jax.core.checkpoint": {"usf_mae_jax.interop.torch_mae", "usf_mae_jax.cli"},
             "usf_mae_jax.evaluators.crossval": {"usf_mae_jax.trainers.loop", "usf_mae_jax.models.vit"},
             "usf_mae_jax.embed": {"usf_mae_jax.interop.weights"}}
    assert upward_imports(graph) == [
        "usf_mae_jax.core.checkpoint -> usf_mae_jax.interop.torch_mae (floor 1 -> 3)",
        "usf_mae_jax.evaluators.crossval -> usf_mae_jax.trainers.loop (floor 3 -> 4)"]


def test_no_sys_path_edits_and_no_citations_outside_the_repository():
    docs = set(os.listdir(os.path.join(ROOT, "docs")))
    problems = []
    for module, path in library_modules().items():
        with open(path) as f:
            text = f.read()
        if "sys.path" in text:
            problems.append(f"{module}: edits sys.path")
        for cited in re.findall(r"[\w./-]*\.md\b", text):
            name = os.path.basename(cited)
            if "shared/" in cited or (cited.startswith("docs/") and name not in docs):
                problems.append(f"{module}: cites {cited}")
    assert problems == []
