"""The float32 accumulation-order contract shared by the reference and the GPU kernels.

This module is the ONE place that defines the order. Deterministic kernels in
``kernels/`` must produce the same bits as the functions here; a change here is a change
of contract and must be mirrored there.

Row dot products (gate and up projections, ``z_i = W[i, :] . x``)
-----------------------------------------------------------------
* One warp of ``WARP_SIZE`` = 32 lanes per row. Weights are widened to float32 exactly
  (fp16 and bf16 are subsets of fp32); x is float32.
* The row is cut into chunks of ``V = vector_width(weight dtype)`` consecutive elements
  (16 bytes of weights: V = 4 for fp32, 8 for fp16/bf16). Lane ``l`` owns chunks
  ``l, l + 32, l + 64, ...``, i.e. element ``j = (t * 32 + l) * V + v`` for
  iteration ``t`` and position ``v``.
* Each lane keeps one float32 accumulator, starting at +0.0, and adds its products in
  order ``t = 0, 1, ...`` then ``v = 0 .. V-1``: ``acc = fl(acc + fl(w_j * x_j))``.
  Products and sums are rounded separately: no fused multiply-add (``__fmul_rn`` /
  ``__fadd_rn`` or NVRTC ``--fmad=false``); subnormals are kept (no flush-to-zero).
* Elements past ``d`` contribute nothing. (Adding a +0.0 product instead is
  equivalent: an accumulator that starts at +0.0 can never become -0.0 under
  round-to-nearest, so ``acc + 0.0 == acc`` bit for bit.)
* Butterfly reduction: for offset in ``BUTTERFLY_OFFSETS`` = (16, 8, 4, 2, 1),
  ``acc[l] = fl(acc[l] + acc[l ^ offset])``. IEEE addition is commutative, so all lanes
  end with the same value; the result is lane 0's.

Activation and product (steps 1 and 3)
--------------------------------------
``h1 = act(z)`` (see ``activations.py``), ``h3 = fl(h1 * h2)``.

Down projection (step 4, on W_down^T, shape [k, d])
---------------------------------------------------
* ``out[j] = sum_i h3[i] * Wt[i, j]``. Rows are cut into chunks of ``DOWN_ROW_CHUNK``
  consecutive rows, and each chunk into ``DOWN_SUB_CHUNKS`` sub-chunks of
  ``DOWN_ROW_CHUNK // DOWN_SUB_CHUNKS`` rows (one thread group of a kernel block each,
  so that a block keeps several independent load streams in flight).
* Within sub-chunk ``s`` of chunk ``c``, ``q[c, s, j]`` starts at +0.0 and adds
  ``fl(h3[i] * Wt[i, j])`` over the sub-chunk's rows ``i`` in ascending order, skipping rows
  whose ``h3[i]`` is exactly zero (for finite weights a skipped row would add ±0.0, a
  no-op, so skipping is bit-identical to adding; this is why a sparse kernel equals the
  dense one on the true zero set).
* ``partial[c, j] = (((+0.0 + q[c, 0, j]) + q[c, 1, j]) + ...)`` over sub-chunks in
  ascending order, then ``out[j] = (((+0.0 + partial[0, j]) + partial[1, j]) + ...)`` over
  chunks in ascending order.

Order-free variants (the paper's atomicAdd down projection) are checked against
:func:`rigorous_error_bound` instead of bit for bit.

Block-quantized weights (Q8_0, Q4_0, Q4_1; ``block_quant.py``, ``quant_mlp.py``)
-------------------------------------------------------------------------------
* Activations stay float32; x is never quantized.
* Each weight is first dequantized to float32 by ``block_quant``'s rule: q8_0 ``D * q``,
  q4_0 ``D * (q - 8)`` (both exact), q4_1 ``fl(D * q + M)`` (one rounding; ``D * q`` is exact,
  so a fused multiply-add gives the same bits), D and M the block's fp16 scale and min.
* The row dot products of W_gate and W_up take ``V = BLOCK_VECTOR_WIDTH`` = 1, not the
  fp32 width 4: lane ``l`` owns element ``j = 32 t + l`` of iteration ``t``, so one block of
  32 weights is exactly one iteration across the 32 lanes. Each lane adds its products
  ``fl(w_j * x_j)`` (``w_j`` the dequantized float32 weight) in order ``t = 0, 1, ...``; then
  the same butterfly. d is a multiple of 32 (whole blocks; no tail). Why: a kernel
  dequantizes one block straight into the lanes' accumulators (a CPU's SIMD registers hold
  consecutive weights, a GPU warp's lanes one weight each) with no transposes, and a
  block's scale is read once per iteration.
* The down projection is unchanged: the chunks and sub-chunks above, per column, on the
  dequantized rows of W_down^T (blocks along d). Sign words are packed from the dequantized
  W_gate. When a kernel dequantizes is free; the values and the order of the products are not.

Block-quantized weights with int8 activations (``q8_activation.py``; onnxruntime's accuracy level 4)
----------------------------------------------------------------------------------------------------
The gate and up row dot products may instead run on x quantized per block of 32, as
llama.cpp's q8 dot products and MatMulNBits at accuracy level 4 do; everything else (the
predictor on float32 x's signs, activation, product, down projection) is unchanged.

* x is quantized per block b of 32 elements: ``amax`` the largest ``|x_j|`` (exact),
  ``s_b = fl(amax / 127)``, codes ``q_j = rint(fl(x_j / s_b))`` (nearest, ties to even) clamped
  to [-127, 127] (the clamp acts only where ``s_b`` is subnormal), all 0 where ``s_b == 0``.
  x must be finite.
* A weight block b of a row and x's block b: per group ``g`` of ``Q8_GROUP`` = 4 consecutive
  elements ``4g .. 4g + 3`` (g = 0 .. 7), the exact integer sum ``n_g`` of code products: q8_0
  ``sum c q``, q4_0 ``sum (c - 8) q``, q4_1 ``sum c q`` and also ``u_g = sum q``. (|n_g| < 2^16:
  the conversion to float32 is exact.)
* ``Q8_LANES`` = 16 float32 accumulators from +0.0; group g of block b goes to lane
  ``8 (b mod 2) + g``, blocks in order b = 0, 1, ...: q8_0 and q4_0 add ``fl(fl(D s_b) n_g)``,
  q4_1 adds ``fl(fl(fl(D s_b) n_g) + fl(fl(M s_b) u_g))`` (D, M the block's fp16 fields widened).
* Then the butterfly over the 16 lanes, offsets ``Q8_BUTTERFLY`` = (8, 4, 2, 1):
  ``acc[a] = fl(acc[a] + acc[a + offset])`` for a < offset; the result is acc[0].
  Why: the integer sums are what a SIMD integer dot product (VNNI's vpdpbusd, AVX2's
  vpmaddubsw + vpmaddwd, CUDA's dp4a) gives per 4 bytes, and an AVX-512 register holds two
  blocks' 8 groups, an AVX2 register one block's (its even and odd blocks in two registers):
  every width gives the same bits with no horizontal sum inside the loop.
"""
from __future__ import annotations

import numpy as np

WARP_SIZE = 32
BUTTERFLY_OFFSETS = (16, 8, 4, 2, 1)
VECTOR_BYTES = 16          # one 128-bit load of weights per lane per iteration
DOWN_ROW_CHUNK = 512       # rows of W_down^T reduced into one partial sum (one kernel block)
DOWN_SUB_CHUNKS = 4        # sub-chunks of a chunk summed separately, then added in order
BLOCK_VECTOR_WIDTH = 1     # V of block-quantized weights: one 32-weight block per iteration
Q8_GROUP = 4               # int8 activations: elements per exact integer sum
Q8_LANES = 16              # int8 activations: float32 accumulators (two blocks' groups)
Q8_BUTTERFLY = (8, 4, 2, 1)
UNIT_ROUNDOFF_FP32 = 2.0 ** -24
UNIT_ROUNDOFF_FP64 = 2.0 ** -53

_F32 = np.float32


def vector_width(weight_dtype) -> int:
    """V: weights per lane per iteration, 16 bytes' worth (fp32: 4, fp16/bf16: 8)."""
    return VECTOR_BYTES // np.dtype(weight_dtype).itemsize


def warp_dot_rows(w_rows: np.ndarray, x: np.ndarray, row_block: int = 1024,
                  v_width: int | None = None) -> np.ndarray:
    """``z[i] = w_rows[i] . x`` in the contract's order. w_rows [n, d] fp32/fp16/bf16, x [d] fp32.

    ``v_width``: V, elements per lane per iteration; by default ``vector_width(w_rows.dtype)``
    (block-quantized weights, dequantized to fp32, pass ``BLOCK_VECTOR_WIDTH``).

    Vectorised over rows and lanes; rows are processed in blocks of ``row_block`` so the
    widened weights and the per-lane accumulators stay in cache (the blocking changes
    nothing in the order: every row is independent).
    """
    n, d = w_rows.shape
    if v_width is None:
        v_width = vector_width(w_rows.dtype)
    if v_width < 1:
        raise ValueError(f"v_width {v_width} must be at least 1")
    step = WARP_SIZE * v_width
    iters = -(-d // step)
    padded = iters * step
    if padded != d:
        w_rows = np.pad(w_rows, ((0, 0), (0, padded - d)))
        x = np.pad(x, (0, padded - d))
    w4 = w_rows.reshape(n, iters, WARP_SIZE, v_width)
    x4 = x.astype(_F32, copy=False).reshape(iters, WARP_SIZE, v_width)
    lanes = np.zeros((n, WARP_SIZE), dtype=_F32)
    slab_buf = np.empty((min(n, row_block), WARP_SIZE, v_width), dtype=_F32)
    prod_buf = np.empty((min(n, row_block), WARP_SIZE), dtype=_F32)
    for r0 in range(0, n, row_block):
        r1 = min(n, r0 + row_block)
        acc, slab, prod = lanes[r0:r1], slab_buf[:r1 - r0], prod_buf[:r1 - r0]
        for t in range(iters):
            np.copyto(slab, w4[r0:r1, t], casting="unsafe")   # exact widening to fp32
            for v in range(v_width):
                np.multiply(slab[:, :, v], x4[t, :, v], out=prod)
                np.add(acc, prod, out=acc)
    return butterfly_reduce(lanes)


def butterfly_reduce(acc: np.ndarray) -> np.ndarray:
    """Xor-shuffle reduction of per-lane sums [n, 32] -> [n] (lane 0's value)."""
    lanes = np.arange(WARP_SIZE)
    for offset in BUTTERFLY_OFFSETS:
        acc = acc + acc[:, lanes ^ offset]
    return acc[:, 0].copy()


def down_projection(h3: np.ndarray, w_down_t: np.ndarray, row_chunk: int = DOWN_ROW_CHUNK,
                    sub_chunks: int = DOWN_SUB_CHUNKS) -> np.ndarray:
    """``out = h3 @ Wt`` in the contract's order. h3 [k] fp32, w_down_t [k, d] -> [d] fp32."""
    if row_chunk % sub_chunks:
        raise ValueError(f"row_chunk {row_chunk} is not a multiple of sub_chunks {sub_chunks}")
    k, d = w_down_t.shape
    n_chunks = -(-k // row_chunk)
    q = _sequential_partials(np.asarray(h3, dtype=_F32), w_down_t, row_chunk // sub_chunks,
                             n_chunks * sub_chunks)
    partial = _sum_in_order(q.reshape(n_chunks, sub_chunks, d).transpose(1, 0, 2))
    return _sum_in_order(partial)


def _sequential_partials(h3, w_down_t, rows_per_part: int, n_parts: int) -> np.ndarray:
    """[n_parts, d]: per part of ``rows_per_part`` rows, the ascending sum over its h3 != 0 rows."""
    d = w_down_t.shape[1]
    rows = np.flatnonzero(h3)
    partial = np.zeros((n_parts, d), dtype=_F32)
    if rows.size:
        part = rows // rows_per_part
        starts = np.searchsorted(part, np.arange(n_parts))
        rank = np.arange(rows.size) - starts[part]   # position among the part's nonzero rows
        for r in range(int(rank.max()) + 1):
            sel = rank == r
            rr, pp = rows[sel], part[sel]
            # each part appears at most once per r, so the fancy-indexed add is safe
            partial[pp] += h3[rr, None] * w_down_t[rr].astype(_F32)
    return partial


def _sum_in_order(terms: np.ndarray) -> np.ndarray:
    """(((+0.0 + terms[0]) + terms[1]) + ...) along the first axis, float32."""
    out = np.zeros(terms.shape[1:], dtype=_F32)
    for t in terms:
        out += t
    return out


# --- the mathematical oracle and the rigorous bound --------------------------------------

def exact_rows(w_rows: np.ndarray, x: np.ndarray) -> np.ndarray:
    """float64 ``w_rows @ x``: the mathematical oracle for any order."""
    return w_rows.astype(np.float64) @ np.asarray(x, dtype=np.float64)


def gamma(n: int, u: float = UNIT_ROUNDOFF_FP32) -> float:
    """Higham's gamma_n = n u / (1 - n u)."""
    nu = n * u
    if nu >= 1:
        return float("inf")
    return nu / (1 - nu)


def rigorous_error_bound(abs_terms_sum, n_terms) -> np.ndarray:
    """Bound on |fl32(sum of n products) - exact| for ANY summation order and tree.

    ``abs_terms_sum`` = sum_i |a_i b_i| (float64); each product is rounded once and the
    sum has n - 1 roundings, so ``gamma_n * sum|a_i b_i|`` bounds the float32 error
    (Higham, Accuracy and Stability of Numerical Algorithms, eq. 3.5). A slack of
    ``gamma_n`` in float64 covers the error of evaluating the oracle itself.
    """
    n = np.asarray(n_terms)
    g32 = np.vectorize(gamma, otypes=[np.float64])(np.maximum(n, 1))
    g64 = np.vectorize(lambda m: gamma(m, UNIT_ROUNDOFF_FP64), otypes=[np.float64])(np.maximum(n, 1))
    return (g32 + g64) * np.asarray(abs_terms_sum, dtype=np.float64)


def down_projection_error_bound(h3: np.ndarray, w_down_t: np.ndarray) -> np.ndarray:
    """Per output column, the bound between an order-free fp32 down projection and exact."""
    h3 = np.asarray(h3, dtype=np.float64)
    rows = np.flatnonzero(h3)
    abs_sum = np.abs(h3[rows]) @ np.abs(w_down_t[rows].astype(np.float64))
    return rigorous_error_bound(abs_sum, max(rows.size, 1))
