"""The sparse MLP on the host CPU, compiled with numba, bit-exact with the reference.

The GPU kernels' twin for the CPU: the same steps (sign predictor, sparse gate+up with
+AS, deterministic down projection on W_down^T) in the same float32 order, the one
defined in :mod:`sparseinfer.reference.order_contract`, so that its outputs equal
``reference.mlp.mlp_sparse(..., mode="predicted+actual")`` bit for bit (tested). It is
what the ONNX exports run on onnxruntime's CPU execution provider when the decoder
registers native kernels (``model_export/native_mlp.py``).

* Row dot products: one "warp" of 32 lane accumulators per row, each lane adding its
  V = 16 bytes of weights per iteration in order, then the butterfly reduction. The 32
  independent lane chains are what the compiler turns into SIMD, so the order contract
  costs nothing here. Rows are spread over threads (``prange``).
* Down projection: columns are cut into blocks, one per task; inside a block the rows run
  in the contract's chunk / sub-chunk order, so every column sees exactly the reference's
  sequence of roundings.
* The kept rows are scattered, so the hardware prefetcher restarts at each of them; the
  kernels prefetch the next row (into the outer caches) while they work on the current
  one. On the 7B shape at 0.9 sparsity (2-core EPYC VM) the whole 4-layer MLP went from
  about 18-21 to 12 ms per token with that, wider down blocks and row pairs in the down step.
* Weights are float32 (what the ONNX exports hold); products and sums are rounded
  separately (numba does not contract them into FMAs without ``fastmath``).
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
import numba
from numba import njit, prange, types
from numba.extending import intrinsic

from sparseinfer.reference import order_contract as oc
from sparseinfer.reference.activations import Activation
from sparseinfer.reference.errors import SparseInferError
from sparseinfer.reference.signs import pack_signs, tail_mask, zero_rows_from_counts

_F32 = np.float32
LANES = oc.WARP_SIZE
V = oc.vector_width(_F32)                 # weights per lane per iteration (fp32: 4)
STEP = LANES * V                          # elements per warp iteration
CACHE_LINE = 64                           # bytes (x86-64, Arm Neoverse)
SUB_ROWS = oc.DOWN_ROW_CHUNK // oc.DOWN_SUB_CHUNKS
SUBS = oc.DOWN_SUB_CHUNKS
DOWN_MAX_COLUMNS = 2048                   # columns per down task at most: 8 KiB of accumulators per level
assert oc.BUTTERFLY_OFFSETS == tuple(LANES >> s for s in range(1, LANES.bit_length())), "butterfly below assumes 16..1"


@intrinsic
def _popcount(typingctx, x):
    """LLVM's ctpop on an unsigned integer: one POPCNT instruction on x86-64."""
    sig = x(x)

    def codegen(context, builder, signature, args):
        fn = builder.module.declare_intrinsic("llvm.ctpop", [args[0].type])
        return builder.call(fn, args)
    return sig, codegen


@intrinsic
def _prefetch(typingctx, address):
    """LLVM's prefetch of the line holding an integer address: read, locality 1 (the outer
    caches; PREFETCHT2 on x86-64). Measured on the 7B gate rows kept at 0.9 sparsity, 2
    threads: 17 GB/s without, 27 GB/s with locality 1; locality 3 (into L1) gained nothing.
    """
    sig = types.void(address)

    def codegen(context, builder, signature, args):
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = builder.module.declare_intrinsic("llvm.prefetch", [i8p], fnty)
        builder.call(fn, [builder.inttoptr(args[0], i8p), i32(0), i32(1), i32(1)])
        return context.get_dummy_value()
    return sig, codegen


@njit(parallel=True, cache=True, boundscheck=False)
def _negative_counts(w_signs, x_signs, tail_mask):
    k, n = w_signs.shape
    out = np.empty(k, np.int32)
    for i in prange(k):
        c = 0
        for j in range(n - 1):
            c += _popcount(w_signs[i, j] ^ x_signs[j])
        c += _popcount((w_signs[i, n - 1] ^ x_signs[n - 1]) & tail_mask)
        out[i] = c
    return out


def negative_counts(w_signs: np.ndarray, x_signs: np.ndarray, tail_mask) -> np.ndarray:
    """N_neg per row: popcount(w XOR x) over the row's uint32 words, the last word masked.

    Rows with an even number of words are read as uint64 pairs (little-endian: the last
    uint32 word is the high half of the last uint64 word), half the instructions.
    """
    if w_signs.shape[1] % 2 == 0:
        mask64 = np.uint64((int(tail_mask) << 32) | 0xFFFFFFFF)
        return _negative_counts(w_signs.view(np.uint64), x_signs.view(np.uint64), mask64)
    return _negative_counts(w_signs, x_signs, np.uint32(tail_mask))


@njit(inline="always", boundscheck=False)
def _prefetch_span(address, nbytes):
    """Prefetch every cache line of ``nbytes`` from ``address`` (an integer)."""
    for line in range((nbytes + CACHE_LINE - 1) // CACHE_LINE):
        _prefetch(address + line * CACHE_LINE)


@njit(inline="always", boundscheck=False)
def _row_address(base, row_bytes, rows, r):
    """Address of the row ``rows[r]`` (the last listed row past the end of the list)."""
    return base + rows[min(r, rows.size - 1)] * row_bytes


def _make_dot_rows(tail: bool):
    """``z[r] = w[rows[r]] . x`` in the order contract; ``tail``: d is not a multiple of STEP.

    Two compiled versions rather than one with a runtime test: the tail loop in the same
    function stops LLVM from keeping the lane accumulators in vector registers (measured
    2-3x slower on the whole row). The accumulator array is allocated per row for the same
    reason (a slice of a shared scratch array may alias the weights). The butterfly is
    computed in place for lanes below each offset: lane 0 only ever reads ``acc[l] +
    acc[l ^ off]`` with ``l < off``, so its value is the contract's, bit for bit.
    While a row is summed, the next row of the list is prefetched at the same offset: the
    rows kept are scattered, and the hardware prefetcher restarts at each of them.
    """
    @njit(parallel=True, cache=True, boundscheck=False)
    def dot_rows(w, rows, x):
        out = np.empty(rows.size, np.float32)
        base, row_bytes = w.ctypes.data, w.strides[0]
        for r in prange(rows.size):
            i = rows[r]
            d = x.size
            full = d // STEP
            ahead = _row_address(base, row_bytes, rows, r + 1)
            acc = np.zeros(LANES, np.float32)
            for t in range(full):
                _prefetch_span(ahead + t * STEP * 4, STEP * 4)
                for lane in range(LANES):
                    b = t * STEP + lane * V
                    a = acc[lane]
                    for v in range(V):
                        a = a + w[i, b + v] * x[b + v]
                    acc[lane] = a
            if tail:                                    # elements past d add nothing
                for lane in range(LANES):
                    b = full * STEP + lane * V
                    a = acc[lane]
                    for v in range(V):
                        if b + v < d:
                            a = a + w[i, b + v] * x[b + v]
                    acc[lane] = a
            off = LANES // 2
            while off >= 1:
                for lane in range(off):
                    acc[lane] = acc[lane] + acc[lane + off]
                off //= 2
            out[r] = acc[0]
        return out
    return dot_rows


_dot_rows_whole, _dot_rows_tail = _make_dot_rows(False), _make_dot_rows(True)


def dot_rows(w: np.ndarray, rows: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``z[r] = w[rows[r]] . x`` (float32 w [k, d], int64 rows, float32 x [d]) in the contract's order."""
    return (_dot_rows_tail if x.size % STEP else _dot_rows_whole)(w, rows, x)


def down_column_block(d: int, threads: int) -> int:
    """Columns per down task: as few tasks as keep every thread busy, at most DOWN_MAX_COLUMNS.

    Every task walks all the kept rows, so wider tasks read longer runs of each row
    (measured on the 7B shape, 2 threads: 2048 columns 12 % faster than 512). Whole
    cache lines per task; the block never changes the result (each column's order is
    the contract's whatever the block).
    """
    def ceil_div(a, b):
        return -(-a // b)
    threads, line = max(threads, 1), CACHE_LINE // 4
    tasks = threads * ceil_div(ceil_div(d, DOWN_MAX_COLUMNS), threads)
    return ceil_div(ceil_div(d, tasks), line) * line


@njit(parallel=True, cache=True, boundscheck=False)
def down_rows(h3, rows, w_down_t, col_block):
    """``out = sum_r h3[r] * w_down_t[rows[r]]`` in the contract's chunk order; rows ascending.

    Within a sub-chunk, rows are added two at a time, ``q = (q + h0 * s0) + h1 * s1``:
    the same roundings in the same order as one at a time, with half the loads and
    stores of q. Each task prefetches the next rows' segments of its columns while it
    adds the current ones. Measured on the 7B shape, 2 threads, 10 % of rows: 18 GB/s
    one row at a time, 20 with the prefetch, 23 with pairs.
    """
    d = w_down_t.shape[1]
    out = np.zeros(d, np.float32)
    n = rows.size
    base, row_bytes = w_down_t.ctypes.data, w_down_t.strides[0]
    for b in prange((d + col_block - 1) // col_block):
        j0 = b * col_block
        j1 = min(d, j0 + col_block)
        m = j1 - j0
        total = np.zeros(m, np.float32)
        part = np.empty(m, np.float32)
        q = np.empty(m, np.float32)
        r = 0
        while r < n:
            chunk = rows[r] // (SUB_ROWS * SUBS)
            part[:] = 0
            for s in range(SUBS):
                q[:] = 0
                end = chunk * SUBS + s + 1          # first sub-chunk index past this one
                while r < n and rows[r] // SUB_ROWS < end:
                    if r + 1 < n and rows[r + 1] // SUB_ROWS < end:
                        _prefetch_span(_row_address(base, row_bytes, rows, r + 2) + j0 * 4, m * 4)
                        _prefetch_span(_row_address(base, row_bytes, rows, r + 3) + j0 * 4, m * 4)
                        h0, h1 = h3[r], h3[r + 1]
                        s0, s1 = w_down_t[rows[r], j0:j1], w_down_t[rows[r + 1], j0:j1]
                        for j in range(m):
                            q[j] = (q[j] + h0 * s0[j]) + h1 * s1[j]
                        r += 2
                    else:
                        _prefetch_span(_row_address(base, row_bytes, rows, r + 1) + j0 * 4, m * 4)
                        h, src = h3[r], w_down_t[rows[r], j0:j1]
                        for j in range(m):
                            q[j] = q[j] + h * src[j]
                        r += 1
                for j in range(m):
                    part[j] = part[j] + q[j]
            for j in range(m):
                total[j] = total[j] + part[j]
        out[j0:j1] = total
    return out


class HostSparseMLP:
    """One layer's sparse MLP on the CPU, built once from its float32 weights.

    ``w_gate``, ``w_up``: [k, d]; ``w_down_t``: W_down^T [k, d] (the layout the down step
    reads row by row). Arrays are used in place (no copy) when already float32 and
    C-contiguous, so memory-mapped weights stay shared with whoever else maps them.
    """

    def __init__(self, w_gate, w_up, w_down_t, activation):
        self.act = Activation.parse(activation)
        if not self.act.sparse_capable:
            raise SparseInferError(f"activation {self.act} has no exact zeros; the sparse MLP needs relu or fatrelu")
        arrays = []
        for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down_t", w_down_t)):
            w = np.asarray(w)
            if w.dtype != _F32:
                raise SparseInferError(f"{name} has dtype {w.dtype}; the host kernels take float32 weights")
            if w.ndim != 2:
                raise SparseInferError(f"{name} must be 2-D [k, d], got shape {w.shape}")
            arrays.append(np.ascontiguousarray(w))
        self.w_gate, self.w_up, self.w_down_t = arrays
        self.k, self.d = self.w_gate.shape
        for name, w in (("w_up", self.w_up), ("w_down_t", self.w_down_t)):
            if w.shape != (self.k, self.d):
                raise SparseInferError(f"{name} has shape {w.shape}; expected [k, d] = {(self.k, self.d)}")
        self.w_signs = pack_signs(self.w_gate)
        self._tail = tail_mask(self.d)

    def predict_zero(self, x: np.ndarray, alpha_milli: int) -> np.ndarray:
        """The sign predictor's mask (True = row predicted zero), as reference.signs."""
        counts = negative_counts(self.w_signs, pack_signs(x), self._tail)
        return zero_rows_from_counts(counts, self.d, alpha_milli)

    def __call__(self, x, alpha_milli: int):
        """x [d] float32 -> (out [d], predicted_zero [k] bool, rows [n] int64 computed in up/down)."""
        x = np.asarray(x)
        if x.dtype != _F32 or x.shape != (self.d,):
            raise SparseInferError(f"x has shape {x.shape} {x.dtype}; expected [{self.d}] float32")
        zero = self.predict_zero(x, alpha_milli)
        active = np.flatnonzero(~zero)
        h1 = self.act(dot_rows(self.w_gate, active, x))
        live = h1 != 0                                          # +AS: rows with h1 == 0 skip up and down
        rows = active[live]
        h3 = h1[live] * dot_rows(self.w_up, rows, x)
        nz = h3 != 0                                            # the contract skips h3 == 0 rows
        out = down_rows(h3[nz], rows[nz], self.w_down_t, down_column_block(self.d, numba.get_num_threads()))
        return out, zero, rows
