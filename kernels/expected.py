"""What the kernels must write, from the reference, where the reference has no function of
that exact form: the predictor's mask from the sign words, h1 and h3 of the gate+up kernels, and
for block-quantized weights (``reference.quant_mlp``) the sign words, h1 / h3 and the down
projection on the dequantized weights, in the contract's order for blocks.

Sparse: rows predicted zero get h1 = h3 = +0 and read nothing; rows whose h1 is exactly
zero skip the up row and get h3 = +0 (+AS). Dense: every row, h3 = fl(h1 * h2).
Named by the kernel versions' records (``registry.py``); shared by the GPU tests and the
verifier (``verify.py``).
"""
from __future__ import annotations

import numpy as np

from sparseinfer.reference import Activation, order_contract as oc
from sparseinfer.reference.block_quant import dequantize
from sparseinfer.reference.signs import negative_product_counts, pack_signs, zero_rows_from_counts


def predicted_zero(w_signs, x_signs, d: int, alpha_milli: int) -> np.ndarray:
    """Bool [k]: eq. 2's predicted-zero rows, from the rows' and x's sign words."""
    return zero_rows_from_counts(negative_product_counts(w_signs, x_signs, d), d, alpha_milli)


def expected_h1_h3(x, w_gate, w_up, activation, predicted_zero=None, v_width=None):
    """(h1, h3) float32 [k]; ``predicted_zero`` None means the dense kernels. ``v_width``: the row
    dot products' V (``order_contract.warp_dot_rows``; default: the weights' dtype's)."""
    h1 = Activation.parse(activation)(oc.warp_dot_rows(w_gate, x, v_width=v_width))
    if predicted_zero is None:
        return h1, h1 * oc.warp_dot_rows(w_up, x, v_width=v_width)
    h1 = np.where(predicted_zero, np.float32(0), h1)
    h3 = np.zeros_like(h1)
    rows = np.flatnonzero(h1)
    h3[rows] = h1[rows] * oc.warp_dot_rows(w_up[rows], x, v_width=v_width)
    return h1, h3


def dense_h1_h3(x, w_gate, w_up, activation, predicted_zero=None):
    """(h1, h3) float32 [k] of the dense kernels: every row, whatever was predicted."""
    return expected_h1_h3(x, w_gate, w_up, activation)


def same_bits(got, want) -> bool:
    return np.array_equal(np.asarray(got, np.float32).view(np.uint32), np.asarray(want, np.float32).view(np.uint32))


def within_down_bound(got, h3, w_down_t) -> np.ndarray:
    """Bool [d]: |got - exact| within the rigorous bound of an order-free down projection."""
    exact = np.asarray(h3, np.float64) @ w_down_t.astype(np.float64)
    return np.abs(np.asarray(got, np.float64) - exact) <= oc.down_projection_error_bound(h3, w_down_t)


# --- block-quantized weights (weights: reference.quant_mlp.QuantizedMLPWeights) -------------------

def quant_signs(blocks, fmt, cols: int) -> np.ndarray:
    """uint32 sign words of block rows: the dequantized weights' (a bit is 1 iff the value is < 0)."""
    return pack_signs(dequantize(blocks, fmt, cols))


def quant_h1_h3(x, weights, activation, predicted_zero=None):
    """(h1, h3) float32 [k] of the gate+up kernels on ``weights``' dequantized W_gate and W_up,
    row dot products with V = BLOCK_VECTOR_WIDTH; ``predicted_zero`` None means dense."""
    w_gate, w_up, _ = weights.dequantized()
    return expected_h1_h3(x, w_gate, w_up, activation, predicted_zero, v_width=oc.BLOCK_VECTOR_WIDTH)


def dense_quant_h1_h3(x, weights, activation, predicted_zero=None):
    """(h1, h3) float32 [k] of the dense gate+up kernels on blocks: every row, whatever was predicted."""
    return quant_h1_h3(x, weights, activation)


def quant_down(h3, weights) -> np.ndarray:
    """out [d]: the contract's down projection on ``weights``' dequantized W_down^T."""
    return oc.down_projection(h3, weights.dequantized()[2])
