"""Python wrappers of the block-quantized kernels (``cuda/quant.cu``): check, allocate, launch.

As ``ops.py``'s wrappers, on weights held as :class:`device.DeviceBlocks` (rows of Q8_0, Q4_0 or
Q4_1 blocks); the launch's ``{dtype}`` is the format's name (``gate_up_quant_paired_{dtype}``
launches ``gate_up_quant_paired_q4_0`` on Q4_0 weights). Launches go through ``ops.kernel`` and
``ops.cupy``, the seams the emulator and the CPU tests replace.
"""
from __future__ import annotations

import numpy as np

from sparseinfer.reference.activations import Activation
from sparseinfer.reference.block_quant import BLOCK
from sparseinfer.reference.errors import SparseInferError
from sparseinfer.reference.order_contract import DOWN_ROW_CHUNK, DOWN_SUB_CHUNKS

from . import ops
from .device import DeviceBlocks
from .ops import CHUNK_SUM, Launch

# Columns a thread of down_quant_chunks owns (QUANT_DOWN_COLS in quant.cu): a quarter of a block.
DOWN_COLUMNS_PER_THREAD = 8


def check_blocks_matrix(name: str, m, cols: int | None = None) -> None:
    if not isinstance(m, DeviceBlocks):
        raise SparseInferError(f"{name} must be DeviceBlocks (DeviceBlocks.from_host), got {type(m).__name__}")
    if cols is not None and m.cols != cols:
        raise SparseInferError(f"{name} has shape {m.shape}; expected {cols} columns")


def check_blocks_pair(w_gate: DeviceBlocks, w_up: DeviceBlocks, d: int) -> None:
    check_blocks_matrix("w_gate", w_gate, d)
    check_blocks_matrix("w_up", w_up, d)
    if w_up.shape != w_gate.shape or w_up.fmt is not w_gate.fmt or w_up.ld != w_gate.ld:
        raise SparseInferError(f"w_up {w_up.shape} {w_up.dtype_name} does not match w_gate "
                               f"{w_gate.shape} {w_gate.dtype_name}")


def pack_signs(m: DeviceBlocks, launch: Launch):
    """uint32 sign words [rows, cols / 32] of the dequantized weights (one word a block)."""
    check_blocks_matrix("pack_signs input", m)
    n_words = m.cols // BLOCK
    words = ops.cupy().empty((m.rows, n_words), dtype=np.uint32)
    ops.kernel(launch.name(m.dtype_name))(ops._warp_grid(m.rows * n_words, launch.threads), (launch.threads,),
                                          (m.data, words, np.int32(m.rows), np.int32(m.cols), np.int64(m.ld)))
    return words


def gate_up_mask(x, w_gate: DeviceBlocks, w_up: DeviceBlocks, activation, zero=None, *, launch: Launch):
    """(h1, h3) [k]: warp per row over all rows; ``zero`` (uint8 mask) skips rows, None = dense."""
    d = ops.check_vector("x", x)
    check_blocks_pair(w_gate, w_up, d)
    k = w_gate.rows
    if zero is not None:
        ops.check_vector("zero mask", zero, k, np.uint8)
    h1, h3 = ops._gate_up_outputs(k, zeroed=False)
    ops.kernel(launch.name(w_gate.dtype_name))(
        ops._warp_grid(k, launch.threads), (launch.threads,),
        (x, w_gate.data, w_up.data, np.int64(w_gate.ld), np.int32(d), np.int32(k),
         ops._NULL if zero is None else zero, *ops._act_args(Activation.parse(activation)), h1, h3))
    return h1, h3


def gate_up_paired(x, x_signs, w_signs, w_gate: DeviceBlocks, w_up: DeviceBlocks, activation, alpha_milli: int, *,
                   launch: Launch):
    """(counts, zero, h1, h3): predict + gate + up in one launch, warp per row, the gate and up
    rows of a predicted-active row read together."""
    d = ops.check_vector("x", x)
    check_blocks_pair(w_gate, w_up, d)
    k = ops._check_signs(w_signs, x_signs, d)
    if k != w_gate.rows:
        raise SparseInferError(f"w_signs has {k} rows but w_gate has {w_gate.rows}")
    act = Activation.parse(activation)
    alpha_milli = ops.check_alpha_milli(alpha_milli)
    cp = ops.cupy()
    counts = cp.empty(k, dtype=np.int32)
    zero = cp.empty(k, dtype=np.uint8)
    h1, h3 = ops._gate_up_outputs(k, zeroed=False)
    ops.kernel(launch.name(w_gate.dtype_name))(
        ops._warp_grid(k, launch.threads), (launch.threads,),
        (x, x_signs, w_signs, np.int64(w_signs.shape[1]), w_gate.data, w_up.data, np.int64(w_gate.ld), np.int32(d),
         np.int32(k), np.int32(alpha_milli), *ops._act_args(act), counts, zero, h1, h3))
    return counts, zero, h1, h3


def down_chunks(h3, w_down_t: DeviceBlocks, dense: bool = False, *, launch: Launch, chunk_sum: Launch = CHUNK_SUM):
    """out [d] in the contract's order on W_down^T's block rows: sub-chunk sums, per-chunk partials
    (a block of ``launch``: a column tile of ``launch.threads / DOWN_SUB_CHUNKS`` threads, each a
    quarter of a block's columns, times the sub-chunks of one chunk), then ``chunk_sum`` adds the
    chunks in order. ``dense``: every row, not only those with h3 != 0."""
    check_blocks_matrix("w_down_t", w_down_t)
    ops.check_vector("h3", h3, w_down_t.rows)
    k, d = w_down_t.shape
    cp = ops.cupy()
    n_chunks = -(-k // DOWN_ROW_CHUNK)
    partial = cp.empty((n_chunks, d), dtype=np.float32)
    out = cp.empty(d, dtype=np.float32)
    tile = launch.threads // DOWN_SUB_CHUNKS
    ops.kernel(launch.name(w_down_t.dtype_name))(
        (-(-d // (tile * DOWN_COLUMNS_PER_THREAD)), n_chunks), (launch.threads,),
        (h3, w_down_t.data, np.int64(w_down_t.ld), np.int32(k), np.int32(d), np.int32(bool(dense)), partial))
    ops.kernel(chunk_sum.name())((-(-d // chunk_sum.threads),), (chunk_sum.threads,),
                                 (partial, np.int32(n_chunks), np.int32(d), out))
    return out
