"""The gated MLP, dense and sparse, in the order contract of ``order_contract.py``.

``MLP(x) = (act(x W_gate^T) * (x W_up^T)) W_down^T`` with Hugging Face layouts
``w_gate``, ``w_up``: [k, d] and ``w_down``: [d, k]. Steps: (1) h1 = act(gate),
(2) h2 = up, (3) h3 = h1 * h2, (4) out = down(h3).

Sparse modes (``mlp_sparse``):
* ``predicted``: skip the rows the sign predictor flags in steps 1, 2 and 4.
* ``predicted+actual``: also skip rows whose h1 is exactly zero in steps 2 and 4 (+AS).
* ``oracle``: skip exactly the true zero set (h1 == 0) in every step.
Output bits of ``predicted`` and ``predicted+actual`` are identical (a row with h1 == 0
contributes a zero h3, which the down projection skips anyway); they differ in work done.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import order_contract as oc
from .activations import Activation
from .dtypes import WEIGHT_DTYPES, check_dtype, check_no_nan, dtype_name, itemsize
from .errors import SparseInferError
from .signs import (BYTES_PER_WORD, alpha_to_milli, negative_product_counts, pack_signs, words_per_row,
                    zero_rows_from_counts)

MODES = ("predicted", "predicted+actual", "oracle")


@dataclass
class MLPTrace:
    """What one sparse MLP call did. Masks are bool [k]; True = row zero / row computed."""

    mode: str
    d: int
    k: int
    weight_dtype: str
    alpha_milli: int
    predicted_zero: np.ndarray   # the skip set used in step 1 (oracle: the true zero set)
    actual_zero: np.ndarray      # true h1 == 0 (from the full gate, for statistics)
    computed_gate: np.ndarray    # rows whose W_gate row was read (step 1)
    computed_up: np.ndarray      # rows whose W_up row was read (steps 2-3)
    computed_down: np.ndarray    # rows whose W_down^T row was read (step 4)

    @property
    def rows(self) -> dict:
        return {"gate": int(self.computed_gate.sum()), "up": int(self.computed_up.sum()),
                "down": int(self.computed_down.sum())}

    @property
    def macs(self) -> dict:
        r = self.rows
        m = {step: n * self.d for step, n in r.items()}
        m["total"] = sum(m.values())
        return m

    @property
    def predictor_xor_words(self) -> int:
        """32-bit XOR+popcount operations of the predictor (0 for the oracle)."""
        return 0 if self.mode == "oracle" else self.k * words_per_row(self.d)

    @property
    def weight_bytes_read(self) -> dict:
        size = itemsize(self.weight_dtype)
        b = {step: n * self.d * size for step, n in self.rows.items()}
        b["predictor"] = self.predictor_xor_words * BYTES_PER_WORD
        b["total"] = sum(b.values())
        return b

    @property
    def predicted_sparsity(self) -> float:
        return float(self.predicted_zero.mean())

    @property
    def actual_sparsity(self) -> float:
        return float(self.actual_zero.mean())

    @property
    def union_sparsity(self) -> float:
        return float((self.predicted_zero | self.actual_zero).mean())

    @property
    def precision(self) -> float:
        """Of the rows predicted zero, the fraction truly zero (paper Fig. 3); 1.0 if none predicted."""
        n = int(self.predicted_zero.sum())
        return 1.0 if n == 0 else float((self.predicted_zero & self.actual_zero).sum() / n)

    @property
    def recall(self) -> float:
        """Of the truly zero rows, the fraction predicted zero; 1.0 if none are zero."""
        n = int(self.actual_zero.sum())
        return 1.0 if n == 0 else float((self.predicted_zero & self.actual_zero).sum() / n)

    def summary(self) -> dict:
        return {"mode": self.mode, "d": self.d, "k": self.k, "weight_dtype": self.weight_dtype,
                "alpha_milli": self.alpha_milli, "rows": self.rows, "macs": self.macs,
                "predictor_xor_words": self.predictor_xor_words,
                "weight_bytes_read": self.weight_bytes_read,
                "predicted_sparsity": self.predicted_sparsity, "actual_sparsity": self.actual_sparsity,
                "union_sparsity": self.union_sparsity, "precision": self.precision, "recall": self.recall}


def check_mlp_inputs(x, w_gate, w_up, w_down):
    """Validate shapes, dtypes and NaN; returns (x float32, d, k)."""
    x = np.asarray(x)
    if x.dtype != np.float32:
        raise SparseInferError(f"x has dtype {x.dtype}; expected float32")
    if x.ndim != 1:
        raise SparseInferError(f"x must be one token's vector [d], got shape {x.shape}")
    d = x.shape[0]
    for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        check_dtype(name, np.asarray(w), WEIGHT_DTYPES)
    if w_gate.ndim != 2 or w_gate.shape[1] != d:
        raise SparseInferError(f"w_gate has shape {w_gate.shape}; expected [k, d] with d = {d}")
    k = w_gate.shape[0]
    if w_up.shape != (k, d):
        raise SparseInferError(f"w_up has shape {w_up.shape}; expected [k, d] = {(k, d)}")
    if w_down.shape != (d, k):
        raise SparseInferError(f"w_down has shape {w_down.shape}; expected [d, k] = {(d, k)} (Hugging Face layout)")
    if not (w_gate.dtype == w_up.dtype == w_down.dtype):
        raise SparseInferError(
            f"weights must share one dtype, got {w_gate.dtype}, {w_up.dtype}, {w_down.dtype}")
    check_no_nan("x", x)
    return x, d, k


def transposed_down(w_down, w_down_t=None) -> np.ndarray:
    """W_down^T [k, d], contiguous: the layout the down projection reads row by row.

    Pass ``w_down_t`` (prepared once at load time, as the kernels do) to skip the copy.
    """
    if w_down_t is None:
        return np.ascontiguousarray(w_down.T)
    if w_down_t.shape != w_down.shape[::-1] or w_down_t.dtype != w_down.dtype:
        raise SparseInferError(f"w_down_t has shape {w_down_t.shape} {w_down_t.dtype}; "
                               f"expected {w_down.shape[::-1]} {w_down.dtype} (w_down transposed)")
    return w_down_t


def float_row_dots(x, w_gate, w_up, v_width=None):
    """``dots(which, rows)``: rows (an index array, or None for all) of W_gate (which "gate") or
    W_up ("up") times x, by ``order_contract.warp_dot_rows`` with V ``v_width``."""
    weights = {"gate": w_gate, "up": w_up}

    def dots(which, rows=None):
        w = weights[which]
        return oc.warp_dot_rows(w if rows is None else w[rows], x, v_width=v_width)
    return dots


def _finish(h1, up_rows, w_down_t, dots):
    """Steps 2-4 given h1 and the rows to compute in step 2."""
    h2 = np.zeros_like(h1)
    h2[up_rows] = dots("up", up_rows)
    return oc.down_projection(h1 * h2, w_down_t)


def mlp_dense(x, w_gate, w_up, w_down, activation, w_down_t=None, v_width=None, row_dots=None) -> np.ndarray:
    """Dense MLP output [d] float32, every dot product in the order contract (``v_width``: the
    row dot products' V, see ``order_contract.warp_dot_rows``; ``row_dots``: instead, another
    arithmetic for them, a function as :func:`float_row_dots` returns)."""
    act = Activation.parse(activation)
    x, d, k = check_mlp_inputs(x, w_gate, w_up, w_down)
    w_down_t = transposed_down(w_down, w_down_t)
    dots = row_dots or float_row_dots(x, w_gate, w_up, v_width)
    h1 = act(dots("gate"))
    if not act.sparse_capable:
        return oc.down_projection(h1 * dots("up"), w_down_t)
    return _finish(h1, np.arange(k), w_down_t, dots)


def mlp_sparse(x, w_gate, w_up, w_down, activation, alpha=1.0, mode="predicted+actual",
               w_signs=None, w_down_t=None, approximate: bool = False, v_width=None, row_dots=None):
    """Sparse MLP: returns (output [d] float32, MLPTrace).

    ``w_signs`` (``pack_signs(w_gate)``) and ``w_down_t`` (``w_down.T`` contiguous) may be
    passed to avoid re-deriving them per call, the way a kernel prepares them once at load
    time. ``approximate``: allow an activation without exact zeros (SiLU): rows the
    predictor skips are taken as zero, an approximation; the trace's ``actual_zero`` is then
    the rows whose gate pre-activation is negative (what the sign predictor aims at).
    ``v_width``, ``row_dots``: the row dot products' arithmetic, as in :func:`mlp_dense`.
    """
    act = Activation.parse(activation)
    if not act.sparse_capable and not approximate:
        raise SparseInferError(f"activation {act} has no exact zeros; sparse modes need relu or fatrelu "
                               f"(or approximate=True)")
    if mode not in MODES:
        raise SparseInferError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    x, d, k = check_mlp_inputs(x, w_gate, w_up, w_down)
    w_down_t = transposed_down(w_down, w_down_t)
    alpha_milli = alpha_to_milli(alpha)

    # The true h1 for every row: the statistics (actual mask) need it, and for the rows
    # the mode computes it is bit-identical to what a kernel computes for them.
    dots = row_dots or float_row_dots(x, w_gate, w_up, v_width)
    z = dots("gate")
    h1_true = act(z)
    actual_zero = h1_true == 0 if act.sparse_capable else z < 0

    if mode == "oracle":
        predicted_zero = actual_zero.copy()
    else:
        if w_signs is None:
            w_signs = pack_signs(w_gate)
        counts = negative_product_counts(w_signs, pack_signs(x), d)
        predicted_zero = zero_rows_from_counts(counts, d, alpha_milli)

    computed_gate = ~predicted_zero
    h1 = np.where(computed_gate, h1_true, np.float32(0))
    computed_up = computed_gate & (h1 != 0) if mode != "predicted" else computed_gate.copy()
    out = _finish(h1, np.flatnonzero(computed_up), w_down_t, dots)
    trace = MLPTrace(mode=mode, d=d, k=k, weight_dtype=dtype_name(w_gate.dtype), alpha_milli=alpha_milli,
                     predicted_zero=predicted_zero, actual_zero=actual_zero, computed_gate=computed_gate,
                     computed_up=computed_up, computed_down=computed_up.copy())
    return out, trace
