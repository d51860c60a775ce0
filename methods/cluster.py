"""Activation-pattern clustering (seed 003).

"A Sparsity Predicting Approach for Large Language Models via Activation Pattern
Clustering" (arXiv, 2025-07; ``../shared/seeds/003_*``). Each calibration token's binary
activation mask (1 = neuron active: h1 != 0 on ReLU, the ``1 - s`` largest |h1| on SiLU)
is assigned to one of K centroids by the *one-sided Hamming distance*
``|m AND NOT c|`` (the token's actives the centroid misses); assignment is greedy under a
capacity limit (each centroid takes at most ``ceil(capacity * T / K)`` tokens: all
(token, centroid) pairs in ascending distance, each token to the first centroid with
room); each centroid is then re-binarised at a density quantile — its
``round((1 - s) * k)`` most frequently active neurons — so that every centroid runs at the
target sparsity (without the quantile the all-ones centroid would win). Repeated for
``iters`` rounds from K tokens drawn as seeds.

*Clustering precision* (reported on the calibration tokens and, online, on the evaluated
tokens): over tokens, ``sum |m AND c| / sum |c|``, the fraction of the centroid's active
neurons that are active in the token; ``coverage`` = ``sum |m AND c| / sum |m|``. With
masks and centroids of the same density (top-k masks on SiLU at the centroid's density)
the two are equal.

Online (the seed leaves cluster prediction open):
* ``cluster`` — this project's extension: the centroid closest, by the same one-sided
  distance, to the SparseInfer sign predictor's active set (α = 1.00; on SiLU this needs
  ``approximate=true``); costs the sign predictor plus K·ceil(k/32) popcount words.
* ``cluster-oracle`` — the centroid closest to the token's true mask: an upper bound.

Simplifications against the seed: per-layer clustering with a fixed K for every layer;
seeds drawn uniformly (not k-means++); the seed's exact capacity rule and quantile are not
published in the abstract, so both are parameters here.
"""
from __future__ import annotations

import math

import numpy as np

from sparseinfer.reference.errors import SparseInferError
from sparseinfer.reference.signs import (BYTES_PER_WORD, negative_product_counts, pack_signs, words_per_row,
                                         zero_rows_from_counts)

from .base import LayerInput, Method, MethodCost, Plan, parse_bool, smallest_rows
from .sign_predictor import sign_words_per_layer


def one_sided_hamming(masks: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """[T, K]: the actives of each mask (rows of ``masks`` [T, k]) that centroid c misses."""
    m = np.asarray(masks, dtype=np.float32)
    c = np.asarray(centroids, dtype=np.float32)
    return np.rint(m @ (1.0 - c).T).astype(np.int64)


def capacity_assign(dist: np.ndarray, capacity: int) -> np.ndarray:
    """Greedy capacity-limited assignment: pairs in ascending distance (ties: token, then
    centroid index), each token to the first centroid with room. Returns [T] centroid ids."""
    t, kk = dist.shape
    if capacity * kk < t:
        raise SparseInferError(f"capacity {capacity} x {kk} centroids cannot hold {t} tokens")
    order = np.lexsort((np.tile(np.arange(kk), t), np.repeat(np.arange(t), kk), dist.ravel()))
    out = np.full(t, -1, dtype=np.int64)
    room = np.full(kk, capacity, dtype=np.int64)
    left = t
    for flat in order:
        tok, c = divmod(int(flat), kk)
        if out[tok] < 0 and room[c] > 0:
            out[tok] = c
            room[c] -= 1
            left -= 1
            if left == 0:
                break
    return out


def binarise(freq: np.ndarray, ones: int, tie_break: np.ndarray | None = None) -> np.ndarray:
    """The ``ones`` entries of largest ``freq`` set (ties by ``tie_break`` then index)."""
    k = freq.shape[0]
    c = np.zeros(k, dtype=bool)
    if ones <= 0:
        return c
    tb = np.zeros(k) if tie_break is None else tie_break
    order = np.lexsort((np.arange(k), -tb, -freq))
    c[order[:ones]] = True
    return c


def clustering_precision(masks: np.ndarray, centroids: np.ndarray, assign: np.ndarray) -> dict:
    """precision = sum|m & c| / sum|c|, coverage = sum|m & c| / sum|m| over tokens."""
    m = np.asarray(masks, dtype=bool)
    c = np.asarray(centroids, dtype=bool)[assign]
    hit = int((m & c).sum())
    cs, ms = int(c.sum()), int(m.sum())
    return {"precision": 1.0 if cs == 0 else hit / cs, "coverage": 1.0 if ms == 0 else hit / ms}


def cluster_masks(masks: np.ndarray, k_clusters: int, density: float, capacity: float = 2.0,
                  iters: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(centroids [K, k] bool, assignment [T]) of ``masks`` [T, k] (seed 003's procedure)."""
    masks = np.asarray(masks, dtype=bool)
    t, k = masks.shape
    kk = int(min(k_clusters, t))
    ones = int(round(density * k))
    cap = int(math.ceil(capacity * t / kk))
    rng = np.random.default_rng(seed)
    overall = masks.mean(axis=0)
    centroids = np.stack([binarise(masks[j].astype(float), ones, overall)
                          for j in rng.choice(t, kk, replace=False)])
    assign = capacity_assign(one_sided_hamming(masks, centroids), cap)
    for _ in range(int(iters)):
        new = []
        for c in range(kk):
            members = masks[assign == c]
            if len(members) == 0:                     # an empty cluster re-seeds on the worst-served token
                worst = int(np.argmax(one_sided_hamming(masks, centroids)[np.arange(t), assign]))
                new.append(binarise(masks[worst].astype(float), ones, overall))
            else:
                new.append(binarise(members.mean(axis=0), ones, overall))
        centroids = np.stack(new)
        again = capacity_assign(one_sided_hamming(masks, centroids), cap)
        if np.array_equal(again, assign):
            break
        assign = again
    return centroids, assign


class Cluster(Method):
    """Seed 003 clustering; online centroid from the sign predictor (this project's extension)."""

    name = "cluster"
    paper = "Activation Pattern Clustering (seed 003, arXiv 2025-07); online choice by the SparseInfer sign mask (extension)"
    needs_calibration = True
    online = "sign"
    PARAMS = {"clusters": (int, 16, "K centroids per layer"),
              "capacity": (float, 2.0, "capacity factor: a centroid holds at most ceil(capacity*T/K) tokens"),
              "iters": (int, 10, "assignment / re-binarisation rounds"),
              "seed": (int, 0, "random seed"),
              "approximate": (parse_bool, False, "allow the sign predictor on a SiLU model")}

    def prepare(self, weights, calibration, target):
        super().prepare(weights, calibration, target)
        if self.params["clusters"] < 1:
            raise SparseInferError(f"method {self.name}: clusters must be >= 1")
        if self.online == "sign" and not self.act.sparse_capable and not self.params["approximate"]:
            raise SparseInferError(f"{self.name} picks centroids with the sign predictor, an approximation on a "
                                   f"{self.act} model; pass --approximate")
        if self.online == "sign" and getattr(self, "_signs_of", None) is not weights:
            self._signs, self._signs_of = sign_words_per_layer(weights), weights
        self.centroids, self.calibration_precision = [], []
        for i in range(self.shape.num_layers):
            masks = ~calibration.reference_zero(i, self.target)
            c, a = cluster_masks(masks, self.params["clusters"], 1.0 - self.target, self.params["capacity"],
                                 self.params["iters"], self.params["seed"] + i)
            self.centroids.append(c)
            self.calibration_precision.append(clustering_precision(masks, c, a))
        self._hit = self._cent = self._act = 0

    def _query(self, inp: LayerInput) -> np.ndarray:
        d = inp.x.shape[0]
        counts = negative_product_counts(self._signs[inp.layer], pack_signs(inp.x), d)
        return ~zero_rows_from_counts(counts, d, 1000)

    def _true_active(self, inp: LayerInput) -> np.ndarray:
        h1 = inp.act(inp.z)
        if inp.act.sparse_capable:
            return h1 != 0
        return ~smallest_rows(np.abs(h1), self.target)

    def select(self, inp: LayerInput) -> Plan:
        cents = self.centroids[inp.layer]
        query = self._query(inp)
        c = cents[int(np.argmin(one_sided_hamming(query[None, :], cents)[0]))]
        truth = self._true_active(inp) if self.online == "sign" else query   # statistics only
        self._hit += int((truth & c).sum())
        self._cent += int(c.sum())
        self._act += int(truth.sum())
        return Plan(skip_rows=~c)

    def extra_stats(self) -> dict:
        cal = self.calibration_precision
        return {"clusters": int(self.centroids[0].shape[0]) if self.centroids else 0,
                "calibration_clustering_precision": float(np.mean([c["precision"] for c in cal])),
                "calibration_clustering_coverage": float(np.mean([c["coverage"] for c in cal])),
                "online_clustering_precision": 1.0 if self._cent == 0 else self._hit / self._cent,
                "online_clustering_coverage": 1.0 if self._act == 0 else self._hit / self._act}

    def cost(self, shape) -> MethodCost:
        kk = self.params["clusters"]
        cent_words = kk * words_per_row(shape.k)
        sign_words = shape.k * words_per_row(shape.d)
        words = cent_words + sign_words
        return MethodCost(ops=float(words), unit="popc", bytes_read=float(words * BYTES_PER_WORD),
                          memory_bytes=float(words * BYTES_PER_WORD), launches=3, kind="sign",
                          extra_popc_words=float(cent_words))


class ClusterOracle(Cluster):
    """Seed 003 clustering with the centroid closest to the true mask: an upper bound."""

    name = "cluster-oracle"
    paper = "Activation Pattern Clustering (seed 003, arXiv 2025-07); oracle centroid (upper bound)"
    online = "oracle"
    bound = True

    def _query(self, inp: LayerInput) -> np.ndarray:
        return self._true_active(inp)

    def cost(self, shape) -> MethodCost:
        words = self.params["clusters"] * words_per_row(shape.k)
        return MethodCost(ops=float(words), unit="popc", bytes_read=float(words * BYTES_PER_WORD),
                          memory_bytes=float(words * BYTES_PER_WORD), launches=1)
