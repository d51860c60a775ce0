"""Bytes a kernel touches: pure functions of shape, dtype and row counts, one per way of
reading, shared by the versions that read that way. Each version's record in ``registry.py``
names its function (``touched``); the benchmarks divide by time for GB/s and % of peak.

Every function takes ``(d, k, dtype, rows)``, ``rows`` = {"gate": …, "up": …, "down": …} the
rows a sparse step reads (``MLPTrace.rows``); a dense version reads all k whatever ``rows``
says. ``dtype`` is a float dtype's name, or a block format's (q8_0, q4_0, q4_1), whose row of d
weights is d / 32 whole blocks (:func:`row_bytes`). Counted: every weight byte read (only the
rows a version reads), sign words, x, masks / lists, and the float32 vectors written and read
back. L2 reuse is not modelled (x and x's sign words are counted once per kernel).
"""
from __future__ import annotations

from sparseinfer.reference.block_quant import FORMATS
from sparseinfer.reference.dtypes import itemsize
from sparseinfer.reference.order_contract import DOWN_ROW_CHUNK
from sparseinfer.reference.signs import BYTES_PER_WORD, words_per_row

from .ops import fused_parts

F32 = itemsize("fp32")
WORD = BYTES_PER_WORD
INDEX = 4
MASK = 1


def row_bytes(d: int, dtype: str) -> int:
    """Bytes of one weight row of d elements: d x the element size, or a block format's d / 32 blocks."""
    return FORMATS[dtype].row_bytes(d) if dtype in FORMATS else d * itemsize(dtype)


# --- sign packing and the predictor --------------------------------------------------------

def pack_x(d: int, k: int, dtype: str, rows: dict) -> int:
    """x read, its sign words written (the per-token packing)."""
    return d * F32 + words_per_row(d) * WORD


def pack_rows(d: int, k: int, dtype: str, rows: dict) -> int:
    """Every weight row read, its sign words written (W_gate's packing, at load time)."""
    return k * row_bytes(d, dtype) + k * words_per_row(d) * WORD


def predict(d: int, k: int, dtype: str, rows: dict) -> int:
    """Row sign words + x's words in, counts and mask out."""
    w = words_per_row(d)
    return k * w * WORD + w * WORD + k * (F32 + MASK)


def predict_compacted(d: int, k: int, dtype: str, rows: dict) -> int:
    """``predict``, then the mask read again and the ascending active list and its count written."""
    return predict(d, k, dtype, rows) + k * MASK + k * INDEX + INDEX


# --- gate + up -----------------------------------------------------------------------------

def _gate_up(d: int, k: int, dtype: str, weight_rows: int) -> int:
    """Weights of the rows read, x, h1 and h3 written."""
    return weight_rows * row_bytes(d, dtype) + d * F32 + 2 * k * F32


def gate_up_masked(d: int, k: int, dtype: str, rows: dict) -> int:
    """The gate and up rows read, and the predict kernel's mask."""
    return _gate_up(d, k, dtype, rows["gate"] + rows["up"]) + k * MASK


def gate_up_listed(d: int, k: int, dtype: str, rows: dict) -> int:
    """The gate and up rows read, and the compacted active list with its count."""
    return _gate_up(d, k, dtype, rows["gate"] + rows["up"]) + rows["gate"] * INDEX + INDEX


def gate_up_predicting(d: int, k: int, dtype: str, rows: dict) -> int:
    """The gate and up rows read, plus the predictor's reads and writes, inside the kernel."""
    return _gate_up(d, k, dtype, rows["gate"] + rows["up"]) + predict(d, k, dtype, rows)


def gate_up_paired(d: int, k: int, dtype: str, rows: dict) -> int:
    """``gate_up_predicting`` reading the up row of every row predicted active, with its gate
    row (+AS drops the sum, not the read)."""
    return _gate_up(d, k, dtype, 2 * rows["gate"]) + predict(d, k, dtype, rows)


def gate_up_dense(d: int, k: int, dtype: str, rows: dict) -> int:
    """Every gate and up row."""
    return _gate_up(d, k, dtype, 2 * k)


# --- down projection -------------------------------------------------------------------------

def _down_chunked(d: int, k: int, dtype: str, weight_rows: int) -> int:
    """Rows of W_down^T read, h3, the chunks' partial sums written and read back, out written."""
    n_chunks = -(-k // DOWN_ROW_CHUNK)
    return weight_rows * row_bytes(d, dtype) + k * F32 + 2 * n_chunks * d * F32 + d * F32


def down_chunked(d: int, k: int, dtype: str, rows: dict) -> int:
    return _down_chunked(d, k, dtype, rows["down"])


def down_chunked_dense(d: int, k: int, dtype: str, rows: dict) -> int:
    return _down_chunked(d, k, dtype, k)


def down_atomic(d: int, k: int, dtype: str, rows: dict) -> int:
    """Rows of W_down^T read, h3, the output (no partials)."""
    return rows["down"] * row_bytes(d, dtype) + k * F32 + d * F32


# --- whole MLPs in one version ----------------------------------------------------------------

def fused_scratch(d: int, k: int) -> int:
    """Bytes of mlp_fused's per-part sums q [parts, d] float32, written and read back: its traffic
    beyond the chunked down projection's (whose chunk partials it also writes and reads)."""
    return 2 * fused_parts(k)[1] * d * F32


def mlp_fused(d: int, k: int, dtype: str, rows: dict) -> int:
    """Predict, gate and up read as ``gate_up_paired`` does, the down rows as ``down_chunked``,
    plus the per-part sums."""
    return gate_up_paired(d, k, dtype, rows) + down_chunked(d, k, dtype, rows) + fused_scratch(d, k)


def strong_dense(d: int, k: int, dtype: str, rows: dict) -> int:
    """The strong dense baseline: the three matrices, x read, h1 and h3 written, h3 read back
    by the down GEMV, out written."""
    return 3 * k * row_bytes(d, dtype) + d * F32 + 3 * k * F32 + d * F32
