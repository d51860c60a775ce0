"""How many MLP rows each method skips per layer: an explicit, documented model.

The latency model needs, per layer, the fraction of rows the sign predictor skips
(``predicted``: rows of W_gate not read) and the fraction skipped in steps 2 and 4 with
actual sparsity (+AS, ``union`` = predicted or truly zero). Measured values (from
``predictor-stats`` / ``sweep`` traces) replace this model whenever they exist.

ASSUMPTIONS (none of them is fitted to Fig. 4):

1. At α = 1.00 the sign rule is unbiased: it skips as many rows as are truly zero, i.e.
   ``predicted(1.00) = actual``, the model's reported sparsity (ProSparse model cards:
   89.32 % 7B, 88.80 % 13B; ``paper.REPORTED_SPARSITY``).
2. Precision of the skipped set is ``PREDICTOR_PRECISION`` = 0.99 (paper Fig. 3: "over 99 %
   in most layers"), so ``union = actual + (1 - precision) · predicted`` (capped at 1).
3. α > 1 (eq. 2: skip when N_neg > α/(1+α)·d) moves the decision threshold on the
   negative-product fraction f = N_neg/d from 1/2 to α/(1+α). Across the rows of one
   layer, f is modelled as Normal(m, σ) with σ = ``ROW_SPREAD_KAPPA`` · ½/√d: the binomial
   standard deviation of a fraction of d fair signs (the paper's i.i.d. Gaussian hypothesis,
   Sec. IV-A), widened by κ for the spread of the rows' own means. m is fixed by
   assumption 1 (P(f > ½) = actual). Then predicted(α) = P(f > α/(1+α)).
   κ = 2 is an assumption, not a measurement; ``predictor-stats`` measures the real table.
4. PowerInfer's DejaVu predictor is trained for recall and marks more rows active than
   are truly active: ``POWERINFER_ACTIVE_RATIO`` = 1.6 predicted-active rows per truly
   active row (its predicted sparsity is 1 - 1.6·(1 - actual): 82.9 % for 7B, 82.1 % for
   13B). The ProSparse model cards report PowerInfer's predicted sparsity below the
   actual sparsity; this value is an assumption, not taken from them. PowerInfer has no
   actual-sparsity step: all three matrices use its predicted set.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

from sparseinfer.reference.alpha import AlphaSchedule
from sparseinfer.reference.errors import SparseInferError
from sparseinfer.reference.shapes import ModelShape

from . import paper
from .ops import as_fraction

PREDICTOR_PRECISION = 0.99     # paper Fig. 3: precision over 99 % in most layers
ROW_SPREAD_KAPPA = 2.0         # assumption 3: row spread of N_neg/d in binomial standard deviations
POWERINFER_ACTIVE_RATIO = 1.6  # assumption 4: DejaVu predicted-active rows per truly active row

_NORMAL = NormalDist()


@dataclass(frozen=True)
class LayerSparsity:
    """Fractions of the k MLP rows skipped in one layer."""

    predicted: float   # rows the predictor skips (W_gate rows not read)
    union: float       # predicted or truly zero (W_up / W_down rows not read with +AS)

    def __post_init__(self):
        for name in ("predicted", "union"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise SparseInferError(f"{name} sparsity must be in [0, 1], got {v}")
        if self.union + 1e-12 < self.predicted:
            raise SparseInferError(f"union sparsity {self.union} is below predicted sparsity {self.predicted}")


def default_sparsity(model: ModelShape) -> float:
    """The model's reported activation sparsity (Sec. V-A), or Table I's 0.92 for other models."""
    return paper.REPORTED_SPARSITY.get(model.name, paper.TABLE1_SPARSITY)


def predicted_sparsity(actual: float, alpha: float, d: int, kappa: float | None = None) -> float:
    """Assumption 3: the fraction of rows eq. 2 skips at α, given the layer's true sparsity."""
    if not 0.0 < actual < 1.0:
        return float(actual)
    sigma = (ROW_SPREAD_KAPPA if kappa is None else kappa) * 0.5 / math.sqrt(d)
    mean = 0.5 + sigma * _NORMAL.inv_cdf(actual)
    threshold = alpha / (1.0 + alpha)
    return float(_NORMAL.cdf((mean - threshold) / sigma))


def union_sparsity(actual: float, predicted: float, precision: float = PREDICTOR_PRECISION) -> float:
    """Assumption 2: truly zero rows plus the predictor's false skips."""
    return min(1.0, actual + (1.0 - precision) * predicted)


def sign_predictor_layers(model: ModelShape, alpha="1.00", sparsity=None) -> list[LayerSparsity]:
    """Per-layer predicted / union sparsity of SparseInfer under an α schedule."""
    actual = float(as_fraction(default_sparsity(model) if sparsity is None else sparsity))
    schedule = AlphaSchedule.parse(alpha)
    out = []
    for milli in schedule.per_layer_milli(model.num_layers):
        pred = predicted_sparsity(actual, milli / 1000.0, model.d)
        out.append(LayerSparsity(pred, max(pred, union_sparsity(actual, pred))))
    return out


def powerinfer_layers(model: ModelShape, sparsity=None) -> list[LayerSparsity]:
    """Assumption 4: PowerInfer's predicted set, used in all three matrices (no +AS)."""
    actual = float(as_fraction(default_sparsity(model) if sparsity is None else sparsity))
    pred = max(0.0, 1.0 - POWERINFER_ACTIVE_RATIO * (1.0 - actual))
    return [LayerSparsity(pred, pred)] * model.num_layers


def alpha_table(model: ModelShape, alphas=(1.00, 1.01, 1.02, 1.03, 1.04, 1.05), sparsity=None) -> list[dict]:
    """The assumed predicted-sparsity-vs-α table for one model (shown by ``latency --json``)."""
    actual = float(as_fraction(default_sparsity(model) if sparsity is None else sparsity))
    return [{"alpha": a, "predicted_sparsity": predicted_sparsity(actual, a, model.d),
             "union_sparsity": union_sparsity(actual, predicted_sparsity(actual, a, model.d))} for a in alphas]
