"""The two reference points every method is measured between: dense and the oracle.

* ``dense``: nothing skipped (the reference every quality figure is measured against).
* ``oracle``: the skip set is the reference set itself, read from the true gate — on a
  ReLU model the exact zeros (target ignored: skipping a non-zero row is never free), on
  a SiLU model the ``floor(s·k)`` rows of smallest |h1|. An unrealisable upper bound.
"""
from __future__ import annotations

import numpy as np

from .base import LayerInput, Method, Plan, smallest_rows


class Dense(Method):
    """Every row computed (the reference)."""

    name = "dense"
    paper = "dense baseline (llama.cpp in the SparseInfer paper, Table I)"
    exact_for_relu = True

    def select(self, inp: LayerInput) -> Plan:
        return Plan()


class Oracle(Method):
    """The true zero set (ReLU) or the smallest-|h1| rows (SiLU): an upper bound."""

    name = "oracle"
    paper = "upper bound (the skip set of the paper's Fig. 3 ground truth)"
    exact_for_relu = True
    bound = True

    def select(self, inp: LayerInput) -> Plan:
        h1 = inp.act(inp.z)
        if inp.act.sparse_capable:
            return Plan(skip_rows=h1 == 0)
        return Plan(skip_rows=smallest_rows(np.abs(h1), self.target))
