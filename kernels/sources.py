"""The CUDA C sources (package data under ``cuda/``) and the options they compile with.

One place for both, shared by the CuPy runtime (``device.py``) and the CPU compile gate
(``compile_check.py``), so the gate checks exactly what runs. ``#include "x.cuh"`` of a
local header is expanded here, so that the source-keyed module cache (``module_cache.py``) sees
header changes.
"""
from __future__ import annotations

import re
from importlib import resources

from sparseinfer.reference import order_contract as oc
from sparseinfer.reference.block_quant import FORMATS
from sparseinfer.reference.dtypes import SIGN_PACK_DTYPE_NAMES as SIGN_SUFFIXES
from sparseinfer.reference.dtypes import WEIGHT_DTYPE_NAMES as WEIGHT_SUFFIXES

# The files of cuda/ the kernels are built from: one module per .cu (its kernels in KERNELS), and
# down_rows.cuh, the row lists the down, fused and quant kernels share (common.cuh, included
# by all, and cpu_emulation.h are named where they are used).
SOURCES = ("signs.cu", "predict.cu", "gate_up.cu", "down.cu", "dense.cu", "fused.cu", "quant.cu", "down_rows.cuh")
# The block formats of quant.cu's kernels, as their names' suffixes (q8_0, q4_0, q4_1).
QUANT_SUFFIXES = tuple(FORMATS)
DOWN_THREADS = 128    # threads per column tile of the down projection (x DOWN_SUB_CHUNKS per block in v1)
# Threads per block of gate_up_batched: 2 warps, so that a block holding one long-lived
# active row keeps one other warp slot idle, not seven (at sparsity 0.92 about half of the
# 8-warp blocks hold an active row and stay resident while their other warps have exited).
GATE_UP_BATCHED_THREADS = 64
# The gate+up kernels that predict as they go (gate_up.cu's GATE_UP_PREDICTING), by kind.
GATE_UP_PREDICTING = ("fused", "persistent", "batched", "paired")
# down_chunks_narrow (down v5): threads per column tile (x DOWN_SUB_CHUNKS per block); v1-v4 take DOWN_THREADS.
DOWN_NARROW_THREADS = 64
# predict_rows_multi (predict v4): rows per warp, each on WARP_SIZE / PREDICT_ROWS_PER_WARP lanes.
PREDICT_ROWS_PER_WARP = 4
# mlp_fused (fused.cu): threads per block, 8 warps over a part's 128 neurons, then over its columns.
FUSED_THREADS = 256

# Products and sums rounded separately (no FMA contraction), subnormals kept (NVRTC's
# default is --ftz=false; no --use_fast_math). The contract's constants come in as defines.
COMPILE_OPTIONS = (
    "--fmad=false",
    "--ftz=false",
    "--prec-div=true",
    "--prec-sqrt=true",
    f"-DWARP_SIZE={oc.WARP_SIZE}",
    f"-DVECTOR_BYTES={oc.VECTOR_BYTES}",
    f"-DDOWN_ROW_CHUNK={oc.DOWN_ROW_CHUNK}",
    f"-DDOWN_SUB_CHUNKS={oc.DOWN_SUB_CHUNKS}",
    f"-DQ8_GROUP={oc.Q8_GROUP}",
    f"-DQ8_LANES={oc.Q8_LANES}",
    f"-DDOWN_THREADS={DOWN_THREADS}",
    f"-DGATE_UP_BATCHED_THREADS={GATE_UP_BATCHED_THREADS}",
    f"-DDOWN_NARROW_THREADS={DOWN_NARROW_THREADS}",
    f"-DPREDICT_ROWS_PER_WARP={PREDICT_ROWS_PER_WARP}",
    f"-DFUSED_THREADS={FUSED_THREADS}",
)

# The kernels each source defines (extern "C" names), and the hot ones whose register
# spills fail the compile gate (every kernel on the per-token path).
KERNELS = {
    "signs.cu": tuple(f"pack_signs_{s}" for s in SIGN_SUFFIXES),
    "predict.cu": ("predict_rows", "predict_rows_vec", "predict_rows_multi", "compact_active"),
    "gate_up.cu": tuple(f"gate_up_{v}_{s}" for v in ("mask", "list", *GATE_UP_PREDICTING)
                        for s in WEIGHT_SUFFIXES),
    "down.cu": tuple(f"down_{v}_{s}" for v in ("chunks", "chunks_batched", "chunks_narrow", "chunks_serial", "atomic")
                     for s in WEIGHT_SUFFIXES)
    + ("down_reduce_chunks",),
    # the strong dense baseline (not on the sparse path; `sparseinfer bench`'s baseline row)
    "dense.cu": tuple(f"dense_{v}_{s}" for v in ("gate_up", "rows") for s in WEIGHT_SUFFIXES),
    # predict + gate + up + down in one persistent launch
    "fused.cu": tuple(f"mlp_fused_{s}" for s in WEIGHT_SUFFIXES),
    # block-quantized weights: W_gate's sign words (load time), gate + up (masked or dense, and
    # predicting as it goes), the chunked down projection
    "quant.cu": tuple(f"{kernel}_{s}" for kernel in ("pack_signs_quant", "gate_up_quant_mask", "gate_up_quant_paired",
                                                     "down_quant_chunks") for s in QUANT_SUFFIXES),
}
HOT_KERNELS = frozenset(
    name for src in ("predict.cu", "gate_up.cu", "down.cu", "dense.cu", "fused.cu", "quant.cu") for name in KERNELS[src]
    if not name.startswith("pack_signs_quant")
) | {"pack_signs_fp32"}


def source_of(function: str) -> str:
    """The source in KERNELS that defines ``function`` (``{dtype}``: a dtype name, as in
    ``ops.Launch``)."""
    for src, names in KERNELS.items():
        if any(function.format(dtype=suffix) in names for suffix in (*SIGN_SUFFIXES, *QUANT_SUFFIXES)):
            return src
    raise KeyError(f"no kernel source defines {function!r}")


_INCLUDE = re.compile(r'^\s*#include\s+"([\w.]+)"\s*$', re.MULTILINE)


def raw_text(name: str) -> str:
    """One file of cuda/ as it is on disk (no include expansion)."""
    return resources.files("sparseinfer.kernels").joinpath("cuda", name).read_text()


def source(name: str) -> str:
    """The full text of a kernel source, local headers expanded (each once)."""
    seen: set[str] = set()

    def expand(text: str) -> str:
        def sub(m):
            header = m.group(1)
            if header in seen:
                return ""
            seen.add(header)
            return expand(raw_text(header).replace("#pragma once", ""))
        return _INCLUDE.sub(sub, text)

    return expand(raw_text(name))
