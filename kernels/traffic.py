"""Bytes each kernel version touches: a pure function of shape, dtype and row counts.

Used by the benchmarks for GB/s and % of peak bandwidth. Counted: every weight byte
read (only the rows a version reads), sign words, x, masks / lists, and the float32
vectors written and read back. L2 reuse is not modelled (x and x's sign words are
counted once per kernel).
"""
from __future__ import annotations

from sparseinfer.reference.dtypes import itemsize
from sparseinfer.reference.order_contract import DOWN_ROW_CHUNK
from sparseinfer.reference.signs import BYTES_PER_WORD, words_per_row

F32 = itemsize("fp32")
WORD = BYTES_PER_WORD
INDEX = 4
MASK = 1


def pack_x_bytes(d: int) -> int:
    return d * F32 + words_per_row(d) * WORD


def predict_bytes(version: str, d: int, k: int) -> int:
    """Row sign words + x's words in, counts and mask out (v2: + the compaction)."""
    w = words_per_row(d)
    base = k * w * WORD + w * WORD + k * (F32 + MASK)
    return base + (k * MASK + k * INDEX + INDEX if version == "v2" else 0)


def gate_up_bytes(version: str, d: int, k: int, dtype: str, rows_gate: int, rows_up: int) -> int:
    """Weights of the rows read, x, h1 and h3 written; plus what each version reads to decide."""
    # v6_paired reads the up row of every row predicted active, with its gate row (+AS drops the sum)
    rows = 2 * k if version == "dense" else (2 * rows_gate if version == "v6_paired" else rows_gate + rows_up)
    common = rows * d * itemsize(dtype) + d * F32 + 2 * k * F32
    if version == "dense":
        return common
    if version == "v1_mask":
        return common + k * MASK
    if version == "v2_list":
        return common + rows_gate * INDEX + INDEX
    # the predictor's reads and writes, inside the kernel
    if version in ("v3_fused", "v4_persistent", "v5_batched", "v6_paired"):
        return common + predict_bytes("v1", d, k)
    raise ValueError(f"unknown gate_up version {version!r}")


def down_bytes(version: str, d: int, k: int, dtype: str, rows_down: int) -> int:
    """Rows of W_down^T read, h3, and the partial sums (v1) or the output (v2)."""
    rows = k if version == "dense" else rows_down
    weights = rows * d * itemsize(dtype)
    if version in ("v1_chunks", "v4_batched", "v5_narrow", "v3_serial", "dense"):
        n_chunks = -(-k // DOWN_ROW_CHUNK)
        return weights + k * F32 + 2 * n_chunks * d * F32 + d * F32
    if version == "v2_atomic":
        return weights + k * F32 + d * F32
    raise ValueError(f"unknown down version {version!r}")


def mlp_bytes(gate_up: str, down: str, d: int, k: int, dtype: str, rows: dict) -> int:
    """A pipeline: pack x, (predict when gate_up reads its result), gate_up, down.

    ``rows`` = {"gate": …, "up": …, "down": …} as in ``MLPTrace.rows``.
    """
    total = pack_x_bytes(d) + gate_up_bytes(gate_up, d, k, dtype, rows["gate"], rows["up"])
    if gate_up in ("v1_mask", "v2_list"):
        total += predict_bytes("v2" if gate_up == "v2_list" else "v1", d, k)
    return total + down_bytes(down, d, k, dtype, rows["down"])


def strong_dense_bytes(d: int, k: int, dtype: str) -> int:
    """The strong dense baseline (kernels' ``dense_gemv_mlp``): the three matrices, x read,
    h1 and h3 written, h3 read back by the down GEMV, out written."""
    return 3 * k * d * itemsize(dtype) + d * F32 + 3 * k * F32 + d * F32


def dense_mlp_bytes(d: int, k: int, dtype: str) -> int:
    """The three dense GEMVs' weights (cuBLAS baseline)."""
    return 3 * k * d * itemsize(dtype)
