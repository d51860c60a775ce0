"""``build``: onnxruntime-genai's model builder on a Hugging Face folder, fp32 for the CPU
provider, run with an interpreter that has torch and transformers (a side environment)."""
from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

from sparseinfer.reference.errors import SparseInferError


def builder_command(python: str, hf_dir, out, cache_dir=None) -> list[str]:
    """The builder's command line: float32 weights for the CPU provider."""
    cmd = [str(python), "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out),
           "-p", "fp32", "-e", "cpu"]
    return cmd + (["-c", str(cache_dir)] if cache_dir else [])


def run_builder(python, hf_dir, out, cache_dir=None, log=print) -> Path:
    """Run the builder into ``out``; ``log`` gets the command first. A failure is an error."""
    # absolute paths, run from the output's parent: with a checkout of this project as the
    # working directory, ``python -m`` puts its folders (``kernels``, ``tools``) first on
    # sys.path, where transformers' optional imports find them instead of the packages
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = builder_command(python, Path(hf_dir).resolve(), out, Path(cache_dir).resolve() if cache_dir else None)
    log(f"$ cd {shlex.quote(str(out.parent))} && " + shlex.join(cmd))
    proc = subprocess.run(cmd, cwd=out.parent)
    if proc.returncode:
        raise SparseInferError(f"the builder exited with {proc.returncode}")
    return out
