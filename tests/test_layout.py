"""The rules of the house (docs/design.md): the library imports neither data_prep nor configs, its modules
form no import cycle, and nothing in it edits sys.path or cites documents outside the repository."""

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
