"""Python wrappers of the kernels: check arguments, allocate outputs, launch.

Every wrapper checks shapes and dtypes (from metadata only, so the checks run on the
host before CuPy is touched) and raises SparseInferError with one line naming the
problem. Vectors (x, h3) are float32 CuPy arrays; weights are :class:`DeviceMatrix`.
Which CUDA function a wrapper launches, and with how many threads, is the caller's
:class:`Launch`: each kernel version's record (``registry.py``) holds its own. The helpers
shared by several versions (sign packing, the active-list compaction, the chunks' final
sum) launch with theirs, below.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sparseinfer.reference.activations import Activation
from sparseinfer.reference.dtypes import SIGN_PACK_DTYPES, WEIGHT_DTYPES, dtype_name
from sparseinfer.reference.errors import SparseInferError
from sparseinfer.reference.order_contract import DOWN_ROW_CHUNK, DOWN_SUB_CHUNKS, WARP_SIZE, vector_width
from sparseinfer.reference.signs import words_per_row

from . import device
from .device import DeviceMatrix, cupy, kernel
from .sources import source_of

THREADS = 256                      # 8 warps per block in the warp-per-row kernels
_NULL = np.uint64(0)


@dataclass(frozen=True)
class Launch:
    """How one kernel is launched: its CUDA function (``{dtype}`` stands for the weights' dtype
    name: ``gate_up_batched_{dtype}`` launches ``gate_up_batched_fp16`` on fp16 weights) and
    threads per block. Warp-per-row kernels give each warp ``rows_per_warp`` rows; the split-K
    down projection gives each block ``rows_per_block`` rows; a ``persistent`` grid is capped
    at the blocks resident at once (``device.resident_blocks``). The grid follows from the
    sizes, in the wrapper that launches it."""
    function: str
    threads: int = THREADS
    rows_per_warp: int = 1
    rows_per_block: int = 0
    persistent: bool = False

    def name(self, dtype_name: str = "") -> str:
        """The extern "C" name launched on weights of ``dtype_name``."""
        return self.function.format(dtype=dtype_name)

    @property
    def source(self) -> str:
        """The file of ``cuda/`` that defines the function."""
        return source_of(self.function)


# The helpers' launches: sign packing (weights at load time, x every token), the compaction
# of the predicted-active rows into a list (one block), the chunked down projections' sum of
# the chunks' partials in order (a thread per column).
SIGN_PACKING = Launch("pack_signs_{dtype}")
COMPACTION = Launch("compact_active", threads=1024)
CHUNK_SUM = Launch("down_reduce_chunks")


# --- argument checks (metadata only) ------------------------------------------------------

def check_vector(name: str, v, n: int | None = None, dtype=np.float32) -> int:
    if getattr(v, "dtype", None) != np.dtype(dtype):
        raise SparseInferError(f"{name} has dtype {getattr(v, 'dtype', type(v).__name__)}; expected {np.dtype(dtype)}")
    if v.ndim != 1 or (n is not None and v.shape[0] != n):
        want = f"[{n}]" if n is not None else "1-D"
        raise SparseInferError(f"{name} has shape {tuple(v.shape)}; expected {want}")
    if v.shape[0] < 1:
        raise SparseInferError(f"{name} is empty")
    _check_contiguous(name, v)
    return v.shape[0]


def _check_contiguous(name: str, v) -> None:
    """The kernels index raw pointers densely: a strided view would be read wrongly."""
    if not v.flags.c_contiguous:
        raise SparseInferError(f"{name} is a strided view (strides {tuple(v.strides)}); pass a contiguous array "
                               "(cupy.ascontiguousarray)")


def check_matrix(name: str, m, cols: int | None = None, allowed=WEIGHT_DTYPES) -> None:
    if not isinstance(m, DeviceMatrix):
        raise SparseInferError(f"{name} must be a DeviceMatrix (DeviceMatrix.from_host), got {type(m).__name__}")
    if m.dtype not in allowed:
        raise SparseInferError(f"{name} has dtype {dtype_name(m.dtype)}; expected one of "
                               f"{', '.join(dtype_name(d) for d in allowed)}")
    if cols is not None and m.cols != cols:
        raise SparseInferError(f"{name} has shape {m.shape}; expected {cols} columns")


def check_pair(w_gate: DeviceMatrix, w_up: DeviceMatrix, d: int) -> None:
    check_matrix("w_gate", w_gate, d)
    check_matrix("w_up", w_up, d)
    if w_up.shape != w_gate.shape or w_up.dtype != w_gate.dtype or w_up.ld != w_gate.ld:
        raise SparseInferError(f"w_up {w_up.shape} {w_up.dtype_name} does not match w_gate "
                               f"{w_gate.shape} {w_gate.dtype_name}")


def sparse_activation(activation, approximate: bool = False) -> Activation:
    """The activation of a sparse (predicting) MLP: relu or fatrelu, or with ``approximate``
    one without exact zeros, whose predicted-negative rows are taken as zero (as in
    reference.mlp.mlp_sparse). The kernel wrappers below run any activation."""
    act = Activation.parse(activation)
    if not act.sparse_capable and not approximate:
        raise SparseInferError(f"activation {act} has no exact zeros; the sparse kernels need relu or fatrelu "
                               f"(or approximate=True)")
    return act


def check_alpha_milli(alpha_milli) -> int:
    if isinstance(alpha_milli, bool) or not isinstance(alpha_milli, (int, np.integer)) or not 0 < alpha_milli < 2**20:
        raise SparseInferError(f"alpha_milli must be an integer in thousandths (1000 = 1.00), got {alpha_milli!r}")
    return int(alpha_milli)


def _warp_grid(n_warps: int, threads: int) -> tuple:
    return (max(1, -(-n_warps // (threads // WARP_SIZE))),)


def _act_args(act: Activation) -> tuple:
    return np.int32(act.code), np.float32(act.threshold)


# --- predictor ---------------------------------------------------------------------------

def pack_signs(m: DeviceMatrix, launch: Launch = SIGN_PACKING):
    """uint32 sign words [rows, ceil(cols/32)] of a weight matrix (fp32/fp16/bf16/int8)."""
    check_matrix("pack_signs input", m, allowed=SIGN_PACK_DTYPES)
    cp = cupy()
    n_words = words_per_row(m.cols)
    words = cp.empty((m.rows, n_words), dtype=cp.uint32)
    kernel(launch.name(m.dtype_name))(_warp_grid(m.rows * n_words, launch.threads), (launch.threads,),
                                      (m.data, words, np.int32(m.rows), np.int32(m.cols), np.int64(m.ld)))
    return words


def pack_x_signs(x, launch: Launch = SIGN_PACKING):
    """uint32 sign words [ceil(d/32)] of the float32 activation vector x."""
    d = check_vector("x", x)
    cp = cupy()
    words = cp.empty(words_per_row(d), dtype=cp.uint32)
    kernel(launch.name("fp32"))(_warp_grid(words.size, launch.threads), (launch.threads,),
                                (x, words, np.int32(1), np.int32(d), np.int64(d)))
    return words


def _check_signs(w_signs, x_signs, d: int) -> int:
    n_words = words_per_row(d)
    check_vector("x_signs", x_signs, n_words, np.uint32)
    if getattr(w_signs, "dtype", None) != np.uint32 or w_signs.ndim != 2 or w_signs.shape[1] != n_words:
        raise SparseInferError(f"w_signs has shape {tuple(getattr(w_signs, 'shape', ()))} and dtype "
                               f"{getattr(w_signs, 'dtype', None)}; expected uint32 [k, {n_words}] for d = {d}")
    _check_contiguous("w_signs", w_signs)
    return w_signs.shape[0]


def predict(w_signs, x_signs, d: int, alpha_milli: int, *, launch: Launch):
    """(counts int32 [k], zero uint8 [k]): N_neg per row and eq. 2's predicted-zero mask, the
    rows split over warps ``launch.rows_per_warp`` at a time."""
    k = _check_signs(w_signs, x_signs, d)
    alpha_milli = check_alpha_milli(alpha_milli)
    cp = cupy()
    counts = cp.empty(k, dtype=cp.int32)
    zero = cp.empty(k, dtype=cp.uint8)
    kernel(launch.name())(
        _warp_grid(-(-k // launch.rows_per_warp), launch.threads), (launch.threads,),
        (w_signs, np.int64(w_signs.shape[1]), x_signs, np.int32(k), np.int32(d), np.int32(alpha_milli), counts, zero))
    return counts, zero


def compact_active(zero, launch: Launch = COMPACTION):
    """(active int32 [k], n_active int32 [1]): ascending rows with zero == 0, on the device (one block)."""
    k = check_vector("zero mask", zero, dtype=np.uint8)
    cp = cupy()
    active = cp.empty(k, dtype=cp.int32)
    n_active = cp.empty(1, dtype=cp.int32)
    kernel(launch.name())((1,), (launch.threads,), (zero, np.int32(k), active, n_active))
    return active, n_active


# --- gate + up ---------------------------------------------------------------------------

def _gate_up_outputs(k: int, zeroed: bool):
    cp = cupy()
    alloc = cp.zeros if zeroed else cp.empty
    return alloc(k, dtype=cp.float32), alloc(k, dtype=cp.float32)


def gate_up_mask(x, w_gate: DeviceMatrix, w_up: DeviceMatrix, activation, zero=None, *, launch: Launch):
    """(h1, h3) [k]: warp per row over all rows; ``zero`` (uint8 mask) skips rows, None = dense."""
    d = check_vector("x", x)
    check_pair(w_gate, w_up, d)
    act = Activation.parse(activation)
    k = w_gate.rows
    if zero is not None:
        check_vector("zero mask", zero, k, np.uint8)
    h1, h3 = _gate_up_outputs(k, zeroed=False)
    kernel(launch.name(w_gate.dtype_name))(
        _warp_grid(k, launch.threads), (launch.threads,),
        (x, w_gate.data, w_up.data, np.int64(w_gate.ld), np.int32(d), np.int32(k),
         _NULL if zero is None else zero, *_act_args(act), h1, h3))
    return h1, h3


def gate_up_list(x, w_gate: DeviceMatrix, w_up: DeviceMatrix, activation, active, n_active, *, launch: Launch):
    """(h1, h3) [k]: warps only over the compacted active rows (count read on the device)."""
    d = check_vector("x", x)
    check_pair(w_gate, w_up, d)
    act = Activation.parse(activation)
    k = w_gate.rows
    check_vector("active", active, k, np.int32)
    check_vector("n_active", n_active, 1, np.int32)
    h1, h3 = _gate_up_outputs(k, zeroed=True)
    kernel(launch.name(w_gate.dtype_name))(
        _warp_grid(k, launch.threads), (launch.threads,),
        (x, w_gate.data, w_up.data, np.int64(w_gate.ld), np.int32(d), active, n_active, *_act_args(act), h1, h3))
    return h1, h3


def gate_up_fused(x, x_signs, w_signs, w_gate: DeviceMatrix, w_up: DeviceMatrix, activation, alpha_milli: int, *,
                  launch: Launch):
    """(counts, zero, h1, h3): predict + gate + up in one launch, warp per row (a persistent
    launch: a grid that fits on the device at once, each warp striding over the rows)."""
    d = check_vector("x", x)
    check_pair(w_gate, w_up, d)
    k = _check_signs(w_signs, x_signs, d)
    if k != w_gate.rows:
        raise SparseInferError(f"w_signs has {k} rows but w_gate has {w_gate.rows}")
    act = Activation.parse(activation)
    alpha_milli = check_alpha_milli(alpha_milli)
    cp = cupy()
    counts = cp.empty(k, dtype=cp.int32)
    zero = cp.empty(k, dtype=cp.uint8)
    h1, h3 = _gate_up_outputs(k, zeroed=False)
    name, threads = launch.name(w_gate.dtype_name), launch.threads
    grid = _warp_grid(k, threads)
    if launch.persistent:
        grid = (min(grid[0], device.resident_blocks(name, threads)),)
    kernel(name)(
        grid, (threads,),
        (x, x_signs, w_signs, np.int64(w_signs.shape[1]), w_gate.data, w_up.data, np.int64(w_gate.ld), np.int32(d),
         np.int32(k), np.int32(alpha_milli), *_act_args(act), counts, zero, h1, h3))
    return counts, zero, h1, h3


# --- down projection ---------------------------------------------------------------------

def _check_down(h3, w_down_t: DeviceMatrix) -> tuple[int, int]:
    check_matrix("w_down_t", w_down_t)
    check_vector("h3", h3, w_down_t.rows)
    return w_down_t.rows, w_down_t.cols


def _down_grid_x(d: int, dtype, tile: int) -> int:
    """Column tiles of ``tile`` threads, V columns each."""
    return -(-d // (tile * vector_width(dtype)))


def _chunked_down(h3, w_down_t: DeviceMatrix) -> tuple:
    """(k, d, n_chunks, partial [n_chunks, d], out [d]) of the chunked down projections."""
    k, d = _check_down(h3, w_down_t)
    cp = cupy()
    n_chunks = -(-k // DOWN_ROW_CHUNK)
    return k, d, n_chunks, cp.empty((n_chunks, d), dtype=cp.float32), cp.empty(d, dtype=cp.float32)


def down_chunks(h3, w_down_t: DeviceMatrix, dense: bool = False, *, launch: Launch,
                chunk_sum: Launch = CHUNK_SUM):
    """out [d] in the contract's order: sub-chunk sums, per-chunk partials, then chunks ascending.
    A block of ``launch`` is a column tile of ``launch.threads / DOWN_SUB_CHUNKS`` threads times
    the sub-chunks of one chunk; then ``chunk_sum`` adds the chunks' partials in order, a thread
    per column. ``dense``: every row, not only those with h3 != 0."""
    k, d, n_chunks, partial, out = _chunked_down(h3, w_down_t)
    tile = launch.threads // DOWN_SUB_CHUNKS
    kernel(launch.name(w_down_t.dtype_name))(
        (_down_grid_x(d, w_down_t.dtype, tile), n_chunks), (launch.threads,),
        (h3, w_down_t.data, np.int64(w_down_t.ld), np.int32(k), np.int32(d), np.int32(bool(dense)), partial))
    kernel(chunk_sum.name())((-(-d // chunk_sum.threads),), (chunk_sum.threads,),
                             (partial, np.int32(n_chunks), np.int32(d), out))
    return out


# Self-resetting counters of the kernels whose last block adds the others' partials: per
# column tile, how many chunk blocks of down_chunks_serial have finished; per chunk, how many
# parts of mlp_fused (and how many chunks). Each launch leaves them at 0 again, so one zeroed
# buffer per (backend, kernel, length) serves every call made on one stream.
_COUNTERS: dict = {}


def _counters(kind: str, n: int):
    cp = cupy()
    key = (id(cp), kind, n)
    if key not in _COUNTERS:
        _COUNTERS[key] = cp.zeros(n, dtype=cp.uint32)
    return _COUNTERS[key]


def down_chunks_serial(h3, w_down_t: DeviceMatrix, *, launch: Launch):
    """down_chunks in one launch: the last block of each column tile adds the chunks' partials."""
    k, d, n_chunks, partial, out = _chunked_down(h3, w_down_t)
    n_tiles = _down_grid_x(d, w_down_t.dtype, launch.threads // DOWN_SUB_CHUNKS)
    kernel(launch.name(w_down_t.dtype_name))(
        (n_tiles, n_chunks), (launch.threads,),
        (h3, w_down_t.data, np.int64(w_down_t.ld), np.int32(k), np.int32(d), partial, _counters("tile_done", n_tiles),
         out))
    return out


def down_atomic(h3, w_down_t: DeviceMatrix, *, launch: Launch):
    """out [d], order free: split-K over groups of ``launch.rows_per_block`` rows, a block a column
    tile of ``launch.threads`` threads, one atomicAdd per column per block."""
    k, d = _check_down(h3, w_down_t)
    cp = cupy()
    out = cp.zeros(d, dtype=cp.float32)
    rows_per_block = launch.rows_per_block
    kernel(launch.name(w_down_t.dtype_name))(
        (_down_grid_x(d, w_down_t.dtype, launch.threads), -(-k // rows_per_block)), (launch.threads,),
        (h3, w_down_t.data, np.int64(w_down_t.ld), np.int32(k), np.int32(d), np.int32(rows_per_block), out))
    return out


# --- predict + gate + up + down in one launch (fused.cu) ---------------------------------

def fused_parts(k: int) -> tuple[int, int]:
    """(chunks, parts) of mlp_fused at k rows: the contract's down chunks, and their sub-chunks
    (one part each, every chunk counted whole)."""
    n_chunks = -(-k // DOWN_ROW_CHUNK)
    return n_chunks, n_chunks * DOWN_SUB_CHUNKS


def mlp_fused(x, x_signs, w_signs, w_gate: DeviceMatrix, w_up: DeviceMatrix, w_down_t: DeviceMatrix, activation,
              alpha_milli: int, *, launch: Launch):
    """(h1, h3, zero, out): the whole sparse MLP in one persistent launch (mlp_fused). The three
    weight matrices share one row stride: row-major matrices, or views into the neuron-major
    records (``layout.record_views``). A grid of the blocks resident at once strides over the
    parts (``device.resident_blocks``); ``out`` is the contract's down projection, bit for bit."""
    d = check_vector("x", x)
    check_pair(w_gate, w_up, d)
    k = _check_signs(w_signs, x_signs, d)
    if k != w_gate.rows:
        raise SparseInferError(f"w_signs has {k} rows but w_gate has {w_gate.rows}")
    check_matrix("w_down_t", w_down_t, d)
    if w_down_t.rows != k or w_down_t.dtype != w_gate.dtype or w_down_t.ld != w_gate.ld:
        raise SparseInferError(f"w_down_t {w_down_t.shape} {w_down_t.dtype_name} (row stride {w_down_t.ld}) does not "
                               f"match w_gate {w_gate.shape} {w_gate.dtype_name} (row stride {w_gate.ld})")
    act = Activation.parse(activation)
    alpha_milli = check_alpha_milli(alpha_milli)
    cp = cupy()
    n_chunks, n_parts = fused_parts(k)
    counts = cp.empty(k, dtype=cp.int32)
    zero = cp.empty(k, dtype=cp.uint8)
    h1, h3 = _gate_up_outputs(k, zeroed=False)
    q = cp.empty((n_parts, d), dtype=cp.float32)
    partial = cp.empty((n_chunks, d), dtype=cp.float32)
    out = cp.empty(d, dtype=cp.float32)
    name, threads = launch.name(w_gate.dtype_name), launch.threads
    kernel(name)(
        (min(n_parts, device.resident_blocks(name, threads)) if launch.persistent else n_parts,), (threads,),
        (x, x_signs, w_signs, np.int64(w_signs.shape[1]), w_gate.data, w_up.data, w_down_t.data, np.int64(w_gate.ld),
         np.int32(d), np.int32(k), np.int32(alpha_milli), *_act_args(act), counts, zero, h1, h3, q, partial,
         _counters("mlp_fused", n_chunks + 1), out))
    return h1, h3, zero, out


# --- the strong dense baseline (dense.cu) ----------------------------------------------

def dense_gemv_mlp(x, w_gate: DeviceMatrix, w_up: DeviceMatrix, w_down: DeviceMatrix, activation, *,
                   gate_up: Launch, rows: Launch):
    """(h1, h3 [k], out [d]): the dense MLP as two bandwidth-tuned GEMVs, the benchmark's strong
    dense baseline beside cuBLAS. ``w_down`` in the Hugging Face layout [d, k] (not W_down^T):
    dense_gate_up (warp per neuron, gate and up chunks in flight together), then dense_rows
    (warp per output row). h1 and h3 are in the contract's order; ``out`` is not (one warp
    sum per row of W_down instead of the chunked partials), so it is checked against
    rigorous_error_bound. ``gate_up`` and ``rows``: the two kernels' launches."""
    d = check_vector("x", x)
    check_pair(w_gate, w_up, d)
    act = Activation.parse(activation)
    k = w_gate.rows
    check_matrix("w_down", w_down, k)
    if w_down.rows != d or w_down.dtype != w_gate.dtype:
        raise SparseInferError(f"w_down has shape {w_down.shape} {w_down.dtype_name}; expected [d, k] = ({d}, {k}) "
                               f"{w_gate.dtype_name}")
    cp = cupy()
    h1, h3 = _gate_up_outputs(k, zeroed=False)
    kernel(gate_up.name(w_gate.dtype_name))(
        _warp_grid(k, gate_up.threads), (gate_up.threads,),
        (x, w_gate.data, w_up.data, np.int64(w_gate.ld), np.int32(d), np.int32(k), *_act_args(act), h1, h3))
    out = cp.empty(d, dtype=cp.float32)
    kernel(rows.name(w_down.dtype_name))(
        _warp_grid(d, rows.threads), (rows.threads,),
        (w_down.data, np.int64(w_down.ld), h3, np.int32(d), np.int32(k), out))
    return h1, h3, out
