"""What the kernels must write, from the reference, where the reference has no function of
that exact form: the predictor's mask from the sign words, and h1 and h3 of the gate+up kernels.

Sparse: rows predicted zero get h1 = h3 = +0 and read nothing; rows whose h1 is exactly
zero skip the up row and get h3 = +0 (+AS). Dense: every row, h3 = fl(h1 * h2).
Named by the kernel versions' records (``registry.py``); shared by the GPU tests and the
verifier (``verify.py``).
"""
from __future__ import annotations

import numpy as np

from sparseinfer.reference import Activation, order_contract as oc
from sparseinfer.reference.signs import negative_product_counts, zero_rows_from_counts


def predicted_zero(w_signs, x_signs, d: int, alpha_milli: int) -> np.ndarray:
    """Bool [k]: eq. 2's predicted-zero rows, from the rows' and x's sign words."""
    return zero_rows_from_counts(negative_product_counts(w_signs, x_signs, d), d, alpha_milli)


def expected_h1_h3(x, w_gate, w_up, activation, predicted_zero=None):
    """(h1, h3) float32 [k]; ``predicted_zero`` None means the dense kernels."""
    h1 = Activation.parse(activation)(oc.warp_dot_rows(w_gate, x))
    if predicted_zero is None:
        return h1, h1 * oc.warp_dot_rows(w_up, x)
    h1 = np.where(predicted_zero, np.float32(0), h1)
    h3 = np.zeros_like(h1)
    rows = np.flatnonzero(h1)
    h3[rows] = h1[rows] * oc.warp_dot_rows(w_up[rows], x)
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
