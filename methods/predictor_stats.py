"""Predictor quality per layer (paper Fig. 3) from masks or reference ``MLPTrace``s.

Precision: of the rows predicted zero, the fraction truly zero. Recall: of the truly zero
rows, the fraction predicted zero. Both are pooled over tokens (micro-averaged: counts are
summed before dividing). Sparsities are mean fractions of the k rows; ``bytes_skipped``
is the fraction of the dense MLP's weight bytes (3·d·k elements) not read, and
``predictor_bytes_fraction`` the predictor's sign words relative to the same dense bytes.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from sparseinfer.reference.errors import SparseInferError
from sparseinfer.sim.ops import dense_mlp_bytes


@dataclass(frozen=True)
class Confusion:
    """Counts over rows: zero = the positive class."""

    true_zero: int        # predicted zero and zero
    false_zero: int       # predicted zero but non-zero (a wrong skip)
    missed_zero: int      # zero but not predicted
    true_nonzero: int

    @property
    def precision(self) -> float:
        n = self.true_zero + self.false_zero
        return 1.0 if n == 0 else self.true_zero / n

    @property
    def recall(self) -> float:
        n = self.true_zero + self.missed_zero
        return 1.0 if n == 0 else self.true_zero / n

    def __add__(self, other: "Confusion") -> "Confusion":
        return Confusion(*(a + b for a, b in zip(asdict(self).values(), asdict(other).values())))


def confusion(predicted_zero, actual_zero) -> Confusion:
    p = np.asarray(predicted_zero)
    a = np.asarray(actual_zero)
    if p.dtype != bool or a.dtype != bool:
        raise SparseInferError(f"masks must be boolean, got {p.dtype} and {a.dtype}")
    if p.shape != a.shape:
        raise SparseInferError(f"mask shapes differ: {p.shape} vs {a.shape}")
    return Confusion(int((p & a).sum()), int((p & ~a).sum()), int((~p & a).sum()), int((~p & ~a).sum()))


@dataclass
class LayerStats:
    layer: int
    tokens: int
    precision: float
    recall: float
    predicted_sparsity: float
    actual_sparsity: float
    union_sparsity: float
    bytes_skipped: float
    predictor_bytes_fraction: float

    def to_dict(self) -> dict:
        return asdict(self)


def layer_stats(layer: int, traces) -> LayerStats:
    """Pool one layer's traces (one per decoded token) into Fig. 3-style statistics."""
    traces = list(traces)
    if not traces:
        raise SparseInferError(f"layer {layer}: no traces")
    total = Confusion(0, 0, 0, 0)
    pred = act = union = skipped = predictor = 0.0
    for t in traces:
        total = total + confusion(t.predicted_zero, t.actual_zero)
        pred += t.predicted_sparsity
        act += t.actual_sparsity
        union += t.union_sparsity
        read = t.weight_bytes_read
        dense = dense_mlp_bytes(t.d, t.k, t.weight_dtype)
        skipped += 1.0 - (read["gate"] + read["up"] + read["down"]) / dense
        predictor += read["predictor"] / dense
    n = len(traces)
    return LayerStats(layer, n, total.precision, total.recall, pred / n, act / n, union / n, skipped / n, predictor / n)


def per_layer_stats(traces_by_token) -> list[LayerStats]:
    """``traces_by_token[t][l]`` is the MLPTrace of layer l at decoded token t."""
    traces_by_token = list(traces_by_token)
    if not traces_by_token:
        raise SparseInferError("no tokens traced")
    n_layers = len(traces_by_token[0])
    if any(len(t) != n_layers for t in traces_by_token):
        raise SparseInferError("every token must trace the same number of layers")
    return [layer_stats(i, [tok[i] for tok in traces_by_token]) for i in range(n_layers)]


def summary(stats: list[LayerStats]) -> dict:
    """Means over layers (each layer weighs the same, as in the paper's per-layer plots)."""
    keys = ("precision", "recall", "predicted_sparsity", "actual_sparsity", "union_sparsity", "bytes_skipped")
    return {k: float(np.mean([getattr(s, k) for s in stats])) for k in keys}
