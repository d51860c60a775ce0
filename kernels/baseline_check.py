"""Rigorous checks for a dense MLP computed in any float32 order (the strong dense baseline).

The baseline is not bound by the order contract, so it is checked against the exact
(float64) MLP within ``rigorous_error_bound``, step by step:

* gate and up: ``z = W[i] . x`` in float32, any order, is within ``e = gamma_d sum|w x|`` of
  the exact value. ``h1 = act(z)``: relu is 1-Lipschitz, so ``|h1 - act(g)| <= e_g``; fatrelu
  (and relu at 0) jumps at its threshold t, so where the exact g lies within e_g of t either
  side is accepted (``h1 == 0`` or ``|h1 - g| <= e_g``).
* ``h3 = fl(h1 * h2)`` with ``|h2 - u| <= e_u``: ``|h3 - h1 u| <= |h1| e_u + 2^-24 |h3|``
  (plus the smallest subnormal, for a product that underflows).
* down: the kernel's own h3 through the order-free bound of ``within_down_bound``.
"""
from __future__ import annotations

import numpy as np

from sparseinfer.reference import Activation
from sparseinfer.reference.order_contract import UNIT_ROUNDOFF_FP32, rigorous_error_bound

from .expected import within_down_bound

_TINY = 2.0 ** -149


def _dot_bounds(w, x) -> tuple[np.ndarray, np.ndarray]:
    """(exact w @ x, its rigorous float32 bound) per row, float64."""
    w64, x64 = np.asarray(w, np.float64), np.asarray(x, np.float64)
    return w64 @ x64, rigorous_error_bound(np.abs(w64) @ np.abs(x64), max(w64.shape[1], 1))


def gate_up_within_bound(h1, h3, x, w_gate, w_up, activation) -> np.ndarray:
    """Bool [k]: the neuron's h1 and h3 are within the rigorous bound of the exact dense MLP's."""
    act = Activation.parse(activation)
    threshold = float(act.threshold) if act.kind == "fatrelu" else 0.0
    h1 = np.asarray(h1, np.float64)
    h3 = np.asarray(h3, np.float64)
    g, e_g = _dot_bounds(w_gate, x)
    u, e_u = _dot_bounds(w_up, x)
    act_g = np.where(g >= threshold if act.kind == "fatrelu" else g > 0, g, 0.0)
    near = np.abs(g - threshold) <= e_g
    ok_h1 = (np.abs(h1 - act_g) <= e_g) | (near & ((h1 == 0) | (np.abs(h1 - g) <= e_g)))
    ok_h3 = np.abs(h3 - h1 * u) <= np.abs(h1) * e_u + UNIT_ROUNDOFF_FP32 * np.abs(h3) + _TINY
    return ok_h1 & ok_h3 & np.isfinite(h1) & np.isfinite(h3)


def dense_mlp_verified(h1, h3, out, x, w_gate, w_up, w_down_t, activation) -> bool:
    """h1 and h3 within the bound of the exact gate and up, and out within the order-free
    down projection's bound of the exact down projection of the kernel's own h3."""
    return bool(gate_up_within_bound(h1, h3, x, w_gate, w_up, activation).all()
                and within_down_bound(out, h3, w_down_t).all())
