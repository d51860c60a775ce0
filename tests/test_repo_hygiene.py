"""The README's two commands and CI stay in step; no generated files are tracked; the
product's folders import only downwards."""
import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands():
    blocks = re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S)
    return [b.strip() for b in blocks]


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    commands = _readme_commands()[:2]
    assert len(commands) == 2 and all("\n" not in c for c in commands)
    main_job, test_job = commands
    assert "sparseinfer" in main_job and "pytest" in test_job
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_job in ci.splitlines(), "'.ci/run' must run the README's test command verbatim"


def test_no_generated_files_tracked():
    try:
        files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    bad = [f for f in files.splitlines()
           if re.search(r"(^|/)(\.hypothesis|\.benchmarks|__pycache__|\.venv)/|\.(onnx|safetensors|gguf|npz|npy)$", f)]
    assert not bad, bad


# The product's folders, bottom-up: a module may import only folders of a lower rank (not its
# siblings'). kernels/ and sim/ both stand on reference/; model_export/ on those; benchmarks/
# on everything below tools/ (``sparseinfer bench`` in tools/ runs benchmarks/harness.py);
# evaluation/ (the lm-eval backend) on exports and benchmarks; tools/ on everything.
LAYERS = {"reference": 0, "kernels": 1, "sim": 1, "model_export": 2, "benchmarks": 3, "evaluation": 4, "tools": 5}


def _imported_folders(folder: str, source: str, filename: str = "<source>"):
    """(line, folder) for every import of another product folder in a module of ``folder``,
    in-function imports included; relative imports resolved against ``sparseinfer.<folder>``
    (modules sit directly in their folder)."""
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ["sparseinfer", folder][:max(0, 3 - node.level)] if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            names = [module] + ([f"{module}.{a.name}" for a in node.names] if module == "sparseinfer" else [])
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "sparseinfer" and len(parts) > 1 and parts[1] in LAYERS and parts[1] != folder:
                yield node.lineno, parts[1]


def _upward_imports(folder: str, source: str, filename: str = "<source>") -> list[str]:
    return [f"{filename}:{line} imports {target}/ (layer {LAYERS[target]}) from {folder}/ (layer {LAYERS[folder]})"
            for line, target in _imported_folders(folder, source, filename) if LAYERS[target] >= LAYERS[folder]]


def test_the_layering_check_finds_upward_imports():
    """On planted sources first, so that the check below cannot pass by finding nothing."""
    assert _upward_imports("reference", "from sparseinfer.sim.models import ModelShape\n")
    assert _upward_imports("sim", "def f():\n    from sparseinfer.model_export.checkpoint import load_checkpoint\n")
    assert _upward_imports("kernels", "import sparseinfer.sim.ops\n")            # siblings: neither way
    assert _upward_imports("sim", "from ..kernels import ops\n")
    assert _upward_imports("benchmarks", "from sparseinfer import tools\n")
    assert not _upward_imports("tools", "from sparseinfer.benchmarks.harness import verify_case\nfrom . import cli\n")
    assert not _upward_imports("model_export", "from ..reference.llama import LlamaWeights\nfrom .checkpoint import x\n")


def test_no_module_imports_an_upper_or_sibling_folder():
    bad, modules = [], 0
    for folder in LAYERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            modules += 1
            bad += _upward_imports(folder, path.read_text(), str(path.relative_to(ROOT)))
    assert modules > 40, modules                      # the folders were found
    assert not bad, "\n".join(bad)
