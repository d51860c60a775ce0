"""The random control: ``floor(s·k)`` rows drawn uniformly per token, seeded.

The SparseInfer paper's control (Shin, Yang, Yi 2024, Tables II/III "random 90 %").
"""
from __future__ import annotations

import numpy as np

from .base import LayerInput, Method, Plan


class RandomRows(Method):
    """floor(s·k) rows dropped uniformly at random per token (SparseInfer paper's control)."""

    name = "random"
    paper = "Shin, Yang, Yi: SparseInfer (2024), Tables II/III random-sparsity control"
    PARAMS = {"seed": (int, 0, "random seed")}

    def prepare(self, weights, calibration, target):
        super().prepare(weights, calibration, target)
        self._rng = np.random.default_rng(self.params["seed"])

    def select(self, inp: LayerInput) -> Plan:
        k = inp.gate.shape[0]
        skip = np.zeros(k, dtype=bool)
        skip[self._rng.choice(k, int(np.floor(self.target * k + 1e-9)), replace=False)] = True
        return Plan(skip_rows=skip)
