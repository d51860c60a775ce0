"""The SparseInfer sign predictor with α.

Shin, Yang, Yi, "SparseInfer: Training-free Prediction of Activation Sparsity for Fast LLM
Inference" (2024), eq. 2: row i skipped when α·N_pos < N_neg, counted by XOR + popcount of
sign words (``reference/signs.py``). ``alpha`` is a schedule (``1.03@0-19,1.00``) or
``auto``: per layer, the α (in thousandths) whose predicted sparsity on the calibration
tokens is closest to the target (this project's extension; the paper sets α by hand). On a
SiLU model the predictor skips rows whose gate it predicts negative; SiLU is not zero
there, so this is an approximation and needs ``approximate=true`` (``--approximate``).
"""
from __future__ import annotations

import numpy as np

from sparseinfer.reference.alpha import AlphaSchedule
from sparseinfer.reference.errors import SparseInferError
from sparseinfer.reference.signs import (BYTES_PER_WORD, negative_product_counts, pack_signs, words_per_row,
                                         zero_rows_from_counts)

from .base import LayerInput, Method, MethodCost, Plan, parse_bool

MAX_AUTO_ALPHA_MILLI = 100_000


def _alpha_param(text):
    t = str(text).strip().lower()
    if t == "auto":
        return "auto"
    return AlphaSchedule.parse(text)


def sign_words_per_layer(weights) -> list[np.ndarray]:
    return [pack_signs(lw.gate) for lw in weights.layers]


def calibrated_alpha_milli(n_neg: np.ndarray, d: int, target: float) -> int:
    """α in thousandths whose predicted sparsity over ``n_neg`` [T, k] is closest to target.

    Predicted sparsity falls as α rises (eq. 2), so the search bisects on integers."""
    def sparsity(milli):
        return float(zero_rows_from_counts(n_neg, d, milli).mean())

    lo, hi = 1, MAX_AUTO_ALPHA_MILLI            # sparsity(lo) >= sparsity(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if sparsity(mid) >= target:
            lo = mid
        else:
            hi = mid
    return min((lo, hi), key=lambda m: (abs(sparsity(m) - target), m))


class SparseInfer(Method):
    """SparseInfer (Shin, Yang, Yi 2024): sign-bit XOR + popcount predictor, paper eq. 2."""

    name = "sparseinfer"
    paper = "Shin, Yang, Yi: SparseInfer (2024), eq. 2"
    exact_for_relu = False
    PARAMS = {"alpha": (_alpha_param, AlphaSchedule.parse("1.00"),
                        "α schedule ('1.03@0-19,1.00') or 'auto' (per-layer α calibrated to the target)"),
              "approximate": (parse_bool, False, "allow the predictor on a SiLU model (skips predicted-negative gates)")}

    def prepare(self, weights, calibration, target):
        super().prepare(weights, calibration, target)
        if not self.act.sparse_capable and not self.params["approximate"]:
            raise SparseInferError(f"sparseinfer on a {self.act} model is an approximation (SiLU is not zero for a "
                                   f"negative gate); pass --approximate (its quality is reported beside it)")
        if not hasattr(self, "_signs") or self._signs_of is not weights:
            self._signs, self._signs_of = sign_words_per_layer(weights), weights
        d = self.shape.d
        if self.params["alpha"] == "auto":
            if calibration is None:
                raise SparseInferError("sparseinfer alpha=auto needs calibration prompts")
            self.alpha_milli = [calibrated_alpha_milli(
                np.stack([negative_product_counts(self._signs[i], pack_signs(x), d) for x in calibration.xs[i]]),
                d, self.target) for i in range(self.shape.num_layers)]
        else:
            self.alpha_milli = self.params["alpha"].per_layer_milli(self.shape.num_layers)

    def select(self, inp: LayerInput) -> Plan:
        d = inp.x.shape[0]
        counts = negative_product_counts(self._signs[inp.layer], pack_signs(inp.x), d)
        return Plan(skip_rows=zero_rows_from_counts(counts, d, self.alpha_milli[inp.layer]))

    def cost(self, shape) -> MethodCost:
        words = shape.k * words_per_row(shape.d)
        return MethodCost(ops=float(words), unit="popc", bytes_read=float(words * BYTES_PER_WORD),
                          memory_bytes=float(words * BYTES_PER_WORD), launches=2, kind="sign")

    def describe(self) -> dict:
        out = super().describe()
        if getattr(self, "alpha_milli", None):
            out["params"]["alpha_per_layer"] = [m / 1000 for m in self.alpha_milli]
        return out
