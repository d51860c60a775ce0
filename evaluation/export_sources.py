"""The source files a cached export depends on, found from the code itself.

Starting at ``ROOTS`` (the export folder's writer, and ``evaluation.exports``, which edits
the weights of ``random`` rows), every ``sparseinfer`` module they import — at the top or
inside a function, absolute or relative — and every module those import, read from the
files (nothing is imported). Besides these Python files: the C++ and CUDA sources under the
folders of the subpackages they belong to (``model_export/native``, ``kernels/cuda``: the op
library an export carries is built from them). ``source_hash`` changes when any of them does.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
from pathlib import Path
from typing import Callable

PACKAGE = "sparseinfer"
ROOTS = ("sparseinfer.model_export.export_folder", "sparseinfer.evaluation.exports")
NATIVE_SUFFIXES = (".cc", ".cpp", ".h", ".hpp", ".cu", ".cuh")


def installed_folder(subpackage: str) -> Path | None:
    """The folder of the installed ``sparseinfer.<subpackage>`` (None if there is none)."""
    try:
        spec = importlib.util.find_spec(f"{PACKAGE}.{subpackage}")
    except ModuleNotFoundError:
        return None
    locations = list(spec.submodule_search_locations or []) if spec else []
    return Path(locations[0]) if locations else None


def module_file(module: str, folder_of: Callable[[str], Path | None]) -> Path | None:
    """The file of ``sparseinfer.<subpackage>[.<module>...]``, if it is a module of the package."""
    parts = module.split(".")
    if parts[0] != PACKAGE or len(parts) < 2:
        return None
    base = folder_of(parts[1])
    if base is None:
        return None
    path = base.joinpath(*parts[2:])
    for candidate in (path.with_name(path.name + ".py") if parts[2:] else None, path / "__init__.py"):
        if candidate is not None and candidate.is_file():
            return candidate
    return None


def imported_modules(module: str, path: Path) -> set[str]:
    """Every module name ``path`` (the module ``module``) imports, anywhere in it; for
    ``from X import y`` both ``X`` and ``X.y`` (``y`` may be a module)."""
    return _imports(module if path.name == "__init__.py" else module.rpartition(".")[0], path.read_bytes())


@functools.lru_cache(maxsize=1024)
def _imports(package: str, source: bytes) -> frozenset[str]:
    """``imported_modules`` of a module of ``package`` whose text is ``source`` (parsed once)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                source_name = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                source_name = node.module or ""
            found.add(source_name)
            found.update(f"{source_name}.{alias.name}" for alias in node.names)
    names = set()
    for name in found:                       # a module's packages run first: their __init__ too
        parts = name.split(".")
        names.update(".".join(parts[:i]) for i in range(2, len(parts) + 1))
    return frozenset(names)


def exporter_files(folder_of: Callable[[str], Path | None] = installed_folder) -> dict[str, Path]:
    """The Python files of ``ROOTS`` and of the modules they import, transitively, and the
    native sources under their subpackages' folders, by their names in the package
    ('model_export/export.py'), sorted. ``folder_of``: a subpackage's folder."""
    seen: dict[str, Path] = {}
    todo = list(ROOTS)
    while todo:
        module = todo.pop()
        path = module_file(module, folder_of)
        if path is None or module in seen:
            continue
        seen[module] = path
        todo.extend(imported_modules(module, path) - set(seen))
    files = {}
    for subpackage in {m.split(".")[1] for m in seen}:
        folder = folder_of(subpackage)
        native = [p for p in folder.rglob("*") if p.suffix in NATIVE_SUFFIXES and p.is_file()]
        python = [p for m, p in seen.items() if m.split(".")[1] == subpackage]
        files.update({f"{subpackage}/{p.relative_to(folder).as_posix()}": p for p in native + python})
    return dict(sorted(files.items()))


def source_hash(folder_of: Callable[[str], Path | None] = installed_folder) -> str:
    """A hash of the names and bytes of ``exporter_files``."""
    h = hashlib.sha256()
    for name, path in exporter_files(folder_of).items():
        h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]
