"""``build``: onnxruntime-genai's model builder on a Hugging Face folder for the CPU provider,
fp32 or int4, run with an interpreter that has torch, transformers and onnx_ir (a side environment).

int4 is the builder's weight-only quantization of every MatMul (MatMulNBits): its default
method, round to nearest in blocks of 32 weights along the input dimension, symmetric (4-bit
values with an implied zero point of 8 and one scale a block, the layout of GGUF's Q4_0), and
accuracy level 4 (MatMulNBits quantizes the activations per block to int8 and multiplies in
integers). Block size 32 and accuracy level 4 are the builder's defaults for the CPU; they are
passed all the same (``INT4_OPTIONS``, the option names of onnxruntime-genai 0.18's builder) so
that a later change of default does not change what is measured."""
from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

from sparseinfer.reference.errors import SparseInferError


PRECISIONS = ("fp32", "int4")
INT4_OPTIONS = ("accuracy_level=4", "block_size=32")      # the builder's --extra_options for int4


def builder_command(python: str, hf_dir, out, cache_dir=None, precision: str = "fp32") -> list[str]:
    """The builder's command line for the CPU provider: float32 weights, or int4 ones with
    ``INT4_OPTIONS``."""
    if precision not in PRECISIONS:
        raise SparseInferError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    cmd = [str(python), "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out),
           "-p", precision, "-e", "cpu"]
    cmd += ["-c", str(cache_dir)] if cache_dir else []
    return cmd + (["--extra_options", *INT4_OPTIONS] if precision == "int4" else [])


def run_builder(python, hf_dir, out, cache_dir=None, log=print, precision: str = "fp32") -> Path:
    """Run the builder into ``out`` (``builder_command``); ``log`` gets the command first. A
    failure is an error."""
    # absolute paths, run from the output's parent: with a checkout of this project as the
    # working directory, ``python -m`` puts its folders (``kernels``, ``tools``) first on
    # sys.path, where transformers' optional imports find them instead of the packages
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = builder_command(python, Path(hf_dir).resolve(), out, Path(cache_dir).resolve() if cache_dir else None,
                          precision)
    log(f"$ cd {shlex.quote(str(out.parent))} && " + shlex.join(cmd))
    proc = subprocess.run(cmd, cwd=out.parent)
    if proc.returncode:
        raise SparseInferError(f"the builder exited with {proc.returncode}")
    return out
