"""The package's import graph: no cycle between files and no import up the layers.

Every ``import`` statement is read from the source (function-level ones included, since a
cycle hidden inside a function is still a cycle), resolved to one of the package's files and
checked against the layers the README's map states:

    reference -> kernels, sim, methods -> model_export -> evaluation, benchmarks -> tools

A file may import files of its own folder, of a lower layer, and (within layer 1) sim from
methods; nothing else.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"reference": 0, "kernels": 1, "sim": 1, "methods": 1, "model_export": 2,
          "evaluation": 3, "benchmarks": 3, "tools": 4}
# Imports allowed between two folders of one layer (importer -> imported).
SIDEWAYS = {("methods", "sim")}


def _modules(root: Path) -> dict[str, Path]:
    mods = {}
    for top in LAYERS:
        for path in sorted((root / top).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods["sparseinfer." + ".".join(parts)] = path
    return mods


def _targets(name: str, path: Path, node, mods) -> list[str]:
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
            package = package[: len(package) - (node.level - 1)]
            base = ".".join(package + ([base] if base else []))
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in mods else base for alias in node.names]
    found = []
    for target in names:
        while target and target not in mods:
            target = target.rpartition(".")[0]
        if target and target != name:
            found.append(target)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    mods = _modules(root)
    graph = {name: set() for name in mods}
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[name].update(_targets(name, path, node, mods))
    return graph


def _folder(module: str) -> str:
    return module.split(".")[1]


def layer_violations(graph) -> list[str]:
    bad = []
    for src, targets in graph.items():
        for dst in targets:
            a, b = _folder(src), _folder(dst)
            if a == b or (a, b) in SIDEWAYS:
                continue
            if LAYERS[b] >= LAYERS[a]:
                bad.append(f"{src} -> {dst}")
    return sorted(bad)


def cycles(graph) -> list[list[str]]:
    """Strongly connected components of more than one file (Tarjan, iterative)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = 0
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
    return found


def test_the_graph_is_read_whole():
    graph = import_graph()
    # Non-trivial: many files, function-level imports seen (tools import the package lazily).
    assert len(graph) > 80
    assert "sparseinfer.reference.errors" in graph["sparseinfer.reference.files"] or any(
        "sparseinfer.reference.errors" in t for t in graph.values())


def test_no_import_cycle_between_files():
    assert cycles(import_graph()) == []


def test_no_import_goes_up_the_layers():
    assert layer_violations(import_graph()) == []


def test_the_checks_catch_a_planted_cycle_and_an_upward_import(tmp_path):
    for top in LAYERS:
        (tmp_path / top).mkdir()
        (tmp_path / top / "__init__.py").write_text("")
    (tmp_path / "reference" / "a.py").write_text("def f():\n    from . import b\n")
    (tmp_path / "reference" / "b.py").write_text("from sparseinfer.reference.a import f\n")
    (tmp_path / "kernels" / "c.py").write_text("def g():\n    from sparseinfer.tools import cli\n")
    (tmp_path / "tools" / "cli.py").write_text("from ..reference import a\n")
    graph = import_graph(tmp_path)
    assert cycles(graph) == [["sparseinfer.reference.a", "sparseinfer.reference.b"]]
    assert layer_violations(graph) == ["sparseinfer.kernels.c -> sparseinfer.tools.cli"]


def test_the_readme_map_names_every_top_folder():
    readme = (ROOT / "README.md").read_text()
    for top in LAYERS:
        if (ROOT / top).is_dir():
            assert f"`{top}/`" in readme, top
