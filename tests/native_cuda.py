"""Builds of the op library's CUDA launcher (model_export/native/sparse_mlp_cuda.cu) for the tests.

* :func:`emulated_library`: the launcher compiled by g++ against kernels/cuda/cpu_emulation.h
  (``-DSPARSEINFER_CPU_EMULATION``), every kernel launch running on the CPU emulator, loaded
  with ctypes. The kernel sources come from kernels/cuda with each ``__shared__`` variable
  poisoned per block, as kernels/emulator.py does (copies in the build folder, found first
  on the include path), so the launcher's text is the one nvcc compiles. Cached under the
  temp folder, keyed by every source's text and the flags.
* :func:`call`: one call of the emulated launcher on NumPy arrays (outputs and scratch start
  as 0xFF bytes, as a GPU's stale memory), any field overridable.
* :func:`nvcc_command`: the command the op library's build runs on the launcher (sm_80,
  sm_90 and compute_90 PTX, the kernels' -D defines, no FMA contraction, no flush-to-zero).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sparseinfer.kernels import emulator
from sparseinfer.kernels.sources import SOURCES, raw_text
from sparseinfer.model_export.op_library import DEFINES, launcher_compile_command

ROOT = Path(__file__).resolve().parents[1]
NATIVE = ROOT / "model_export" / "native"
LAUNCHER = NATIVE / "sparse_mlp_cuda.cu"
HEADER = NATIVE / "sparse_mlp_cuda.h"
KERNEL_FILES = (*SOURCES, "common.cuh", "activation.h", "cpu_emulation.h")

# Every kernel a call of the launcher runs (spills in these fail the gate).
LAUNCHED_KERNELS = ("pack_signs_fp32", "gate_up_batched_fp32", "down_chunks_batched_fp32", "down_reduce_chunks",
                    "gate_up_mask_fp32", "down_chunks_fp32", "gate_up_batched_fp16", "down_chunks_batched_fp16",
                    "gate_up_mask_fp16", "down_chunks_fp16", "sparseinfer_computed_rows", "sparseinfer_zero_rows",
                    *(f"{kernel}_{fmt}" for kernel in ("gate_up_quant_paired", "gate_up_quant_mask",
                                                       "down_quant_chunks") for fmt in ("q8_0", "q4_0", "q4_1")))

# sparse_mlp_cuda.h's SPARSEINFER_WEIGHTS_* codes by lower-case name (fp32, fp16, q8_0, ...).
WEIGHTS = {m.group(1).lower(): int(m.group(2))
           for m in re.finditer(r"#define SPARSEINFER_WEIGHTS_(\w+) (\d+)", HEADER.read_text())}


def nvcc_command(nvcc: str, out: str | Path) -> list[str]:
    """The op library's nvcc call on the launcher (op_library.launcher_compile_command)."""
    return [str(c) for c in launcher_compile_command(nvcc, out)]


class SparseMlpCudaArgs(ctypes.Structure):
    """sparse_mlp_cuda.h's SparseMlpCudaArgs, field for field."""
    _fields_ = [("x", ctypes.c_void_p), ("w_gate", ctypes.c_void_p), ("w_up", ctypes.c_void_p),
                ("w_down_t", ctypes.c_void_p), ("w_signs", ctypes.c_void_p), ("sign_stride", ctypes.c_int64),
                ("n_tokens", ctypes.c_int), ("d", ctypes.c_int), ("k", ctypes.c_int), ("alpha_milli", ctypes.c_int),
                ("activation", ctypes.c_int), ("threshold", ctypes.c_float), ("out", ctypes.c_void_p),
                ("predicted_zero", ctypes.c_void_p), ("computed", ctypes.c_void_p), ("scratch", ctypes.c_void_p),
                ("actual_zero", ctypes.c_void_p), ("weight_dtype", ctypes.c_int), ("down_dtype", ctypes.c_int),
                ("dense", ctypes.c_int)]


def _sources_for_emulation(folder: Path) -> None:
    """kernels/cuda's files in ``folder``, each ``__shared__`` declaration poisoned per block."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in KERNEL_FILES:
        text = raw_text(name)
        (folder / name).write_text(emulator.poison_shared_declarations(text) if name in SOURCES else text)


@functools.lru_cache(maxsize=None)
def emulated_library() -> ctypes.CDLL:
    """The launcher built for the CPU emulator (raises SparseInferError where g++ is missing)."""
    reason = emulator.unavailable_reason()
    if reason:
        from sparseinfer.reference.errors import SparseInferError
        raise SparseInferError(reason)
    flags = (*emulator.CXX_FLAGS, *emulator._sanitize_flags(), "-DSPARSEINFER_CPU_EMULATION=1", *DEFINES)
    texts = [LAUNCHER.read_text(), HEADER.read_text(), *(raw_text(n) for n in KERNEL_FILES), " ".join(flags)]
    key = hashlib.sha256("\0".join(texts).encode()).hexdigest()[:16]
    build = Path(tempfile.gettempdir()) / "sparseinfer-native-cuda-emulated" / key
    lib = build / "sparse_mlp_cuda_emulated.so"
    if not lib.is_file():
        kernels = build / "kernels"
        _sources_for_emulation(kernels)
        tmp = build / f"lib.{id(texts)}.tmp"
        cmd = ["g++", *flags, "-I", str(kernels), "-I", str(ROOT / "kernels" / "cuda"), "-I", str(NATIVE),
               "-x", "c++", str(LAUNCHER), "-o", str(tmp)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise AssertionError(f"the emulated launcher does not compile:\n{' '.join(cmd)}\n{r.stderr[-4000:]}")
        tmp.replace(lib)                       # atomic: a concurrent worker never loads half a file
    dll = ctypes.CDLL(str(lib))
    dll.sparseinfer_cuda_scratch_bytes.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    dll.sparseinfer_cuda_scratch_bytes.restype = ctypes.c_size_t
    dll.sparseinfer_cuda_sparse_mlp.argtypes = [ctypes.POINTER(SparseMlpCudaArgs), ctypes.c_void_p]
    dll.sparseinfer_cuda_sparse_mlp.restype = ctypes.c_int
    dll.sparseinfer_cuda_error_string.argtypes = [ctypes.c_int]
    dll.sparseinfer_cuda_error_string.restype = ctypes.c_char_p
    dll.sparseinfer_cuda_emulation_order.argtypes = [ctypes.c_int]
    dll.sparseinfer_cuda_emulation_order.restype = None
    return dll


UNWRITTEN = 0xFF     # what every output and the scratch hold before a call (NaN, -1), as a GPU's stale memory


def poisoned(shape, dtype, align: int = 256) -> np.ndarray:
    """An array whose data starts ``align``-aligned, filled with 0xFF bytes."""
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.full(n + align, UNWRITTEN, dtype=np.uint8)
    start = -raw.ctypes.data % align
    return raw[start:start + n].view(dtype).reshape(shape)


def ptr(a: np.ndarray | None) -> int | None:
    if a is None:
        return None
    assert a.flags.c_contiguous
    return a.ctypes.data


def find_nvcc() -> str | None:
    from sparseinfer.model_export.op_library import find_nvcc as found

    nvcc = found()
    return str(nvcc) if nvcc else None


@dataclass
class Result:
    rc: int
    out: np.ndarray
    predicted_zero: np.ndarray | None
    computed: np.ndarray | None
    actual_zero: np.ndarray | None


def call(x: np.ndarray, w_gate: np.ndarray, w_up: np.ndarray, w_down_t: np.ndarray, w_signs: np.ndarray, d: int,
         k: int, activation, alpha_milli: int, weights: str, down: str | None = None, masks: bool = True,
         scratch_buf: np.ndarray | None = None, override: dict | None = None) -> Result:
    """One call of the emulated launcher: x [n_tokens, d], the weights as the header describes them
    (``weights`` and ``down``: names of WEIGHTS; ``down`` defaults to ``weights``), w_signs uint32
    [k, stride]. Outputs (masks when ``masks``) and the scratch start as 0xFF bytes; ``override``
    replaces fields of the arguments by name (a NULL pointer, a bad value)."""
    from sparseinfer.reference.activations import Activation

    lib = emulated_library()
    n = x.shape[0]
    act = Activation.parse(activation)
    out = poisoned((n, d), np.float32)
    pz, computed, actual = ((poisoned(k, np.uint8) for _ in range(3)) if masks else (None, None, None))
    scratch = scratch_buf if scratch_buf is not None else poisoned(lib.sparseinfer_cuda_scratch_bytes(n, d, k),
                                                                   np.uint8)
    fields = dict(x=ptr(x), w_gate=ptr(w_gate), w_up=ptr(w_up), w_down_t=ptr(w_down_t), w_signs=ptr(w_signs),
                  sign_stride=w_signs.shape[1], n_tokens=n, d=d, k=k, alpha_milli=alpha_milli, activation=act.code,
                  threshold=act.threshold, out=ptr(out), predicted_zero=ptr(pz), computed=ptr(computed),
                  scratch=ptr(scratch), actual_zero=ptr(actual), weight_dtype=WEIGHTS[weights],
                  down_dtype=WEIGHTS[down or weights], dense=0)
    fields.update(override or {})
    rc = lib.sparseinfer_cuda_sparse_mlp(ctypes.byref(SparseMlpCudaArgs(**fields)), None)
    return Result(rc, out, pz, computed, actual)


@contextlib.contextmanager
def emulation_order(reverse: bool):
    """The emulator's threads last-to-first between barriers while inside (a result that changes is a race)."""
    lib = emulated_library()
    lib.sparseinfer_cuda_emulation_order(int(reverse))
    try:
        yield
    finally:
        lib.sparseinfer_cuda_emulation_order(0)


def error_text(rc: int) -> str:
    return emulated_library().sparseinfer_cuda_error_string(rc).decode()
