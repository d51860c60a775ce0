"""WiSparse (seed 004): weight-aware, mixed-granularity training-free activation sparsity.

"WiSparse: Boosting LLM Inference Efficiency with Weight-Aware Mixed Activation Sparsity"
(arXiv, 2026-02; ``../shared/seeds/004_*``). A channel's score is its activation magnitude
times a precomputed weight norm, ``|x_i| · ||W_{:,i}||_2^a``; channels below a threshold
are dropped (input-channel axis, as TEAL). A global sparsity budget is split across
blocks by an evolutionary search on a calibration loss, then refined inside each block to
minimise reconstruction error.

What this implementation does (MLP blocks only, as the rest of this project):

1. Scores: gate and up share the input x, scored with the norm of column i of
   ``[W_gate; W_up]``; the down projection's input h3 is scored with the norm of column j
   of W_down. Thresholds are calibration quantiles of the scores (like TEAL's).
2. Exponent a per layer: the a in ``EXPONENTS`` with the lowest reconstruction error at
   the target sparsity (a = 0 is TEAL's magnitude-only score).
3. Within a block: a block sparsity s_l is split between x (gate/up, 2/3 of the MACs) and
   h3 (down, 1/3) as ``(2 s_x + s_h) / 3 = s_l``; the split in ``SPLITS`` with the lowest
   reconstruction error ``||MLP(x) - MLP_sparse(x)||^2 / ||MLP(x)||^2`` wins.
4. Across blocks: each layer's best error e_l(s) on a grid of s (``GRID``), then a (μ+λ)
   evolutionary search over per-layer sparsities whose mean is the target (mutations move
   one grid step of budget between two layers), minimising sum_l e_l(s_l).

Simplifications against the paper, stated: the calibration loss is the sum of per-layer
relative MLP reconstruction errors on the dense model's calibration inputs (the paper
searches on an end-to-end loss, where errors propagate); only MLP projections are
sparsified (the paper also sparsifies attention projections); a is chosen from a small
grid per layer (the paper's a_l); the within-block refinement is a grid over two inputs
rather than the paper's per-projection optimisation; the sparse kernels are not the
paper's. All calibration tokens come from ``--calibration`` prompts.
"""
from __future__ import annotations

import numpy as np

from .base import LayerInput, Method, MethodCost, Plan

_F32 = np.float32
EXPONENTS = (0.0, 0.5, 1.0)
SPLITS = (-0.15, -0.05, 0.0, 0.05, 0.15)          # s_x - s_l
GRID = np.round(np.arange(0.0, 0.951, 0.05), 3)   # per-layer block sparsities searched
MAX_TOKENS = 256                                   # calibration tokens used for the errors


def _quantile_threshold(score: np.ndarray, s: float) -> float:
    return -1.0 if s <= 0 else float(np.quantile(score.ravel(), min(s, 0.999)))


class _Layer:
    """One layer's calibration data and weights, for reconstruction errors."""

    def __init__(self, x, gate, up, down, act):
        self.x, self.gate, self.up, self.down, self.act = x, gate, up, down, act
        self.norm_x = np.sqrt((gate.astype(np.float64) ** 2).sum(axis=0) + (up.astype(np.float64) ** 2).sum(axis=0))
        self.norm_h = np.sqrt((down.astype(np.float64) ** 2).sum(axis=0))
        self.dense = self.mlp(x)
        self.dense_energy = float((self.dense.astype(np.float64) ** 2).sum()) or 1.0

    def mlp(self, x):
        h3 = self.act(x @ self.gate.T) * (x @ self.up.T)
        return (h3 @ self.down.T).astype(_F32)

    def thresholds(self, a: float, s_x: float, s_h: float) -> tuple[float, float]:
        sx = np.abs(self.x) * (self.norm_x ** a)
        t_x = _quantile_threshold(sx, s_x)
        xk = np.where(sx > t_x, self.x, _F32(0))
        h3 = self.act(xk @ self.gate.T) * (xk @ self.up.T)
        t_h = _quantile_threshold(np.abs(h3) * (self.norm_h ** a), s_h)
        return t_x, t_h

    def error(self, a: float, s_x: float, s_h: float) -> float:
        """||MLP(x) - MLP_sparse(x)||^2 / ||MLP(x)||^2 over the calibration tokens."""
        t_x, t_h = self.thresholds(a, s_x, s_h)
        xk = np.where(np.abs(self.x) * (self.norm_x ** a) > t_x, self.x, _F32(0))
        h3 = self.act(xk @ self.gate.T) * (xk @ self.up.T)
        h3 = np.where(np.abs(h3) * (self.norm_h ** a) > t_h, h3, _F32(0))
        out = h3 @ self.down.T
        return float(((out - self.dense).astype(np.float64) ** 2).sum()) / self.dense_energy


def split(s_l: float, delta: float) -> tuple[float, float] | None:
    """(s_x, s_h) with (2 s_x + s_h)/3 = s_l and both in [0, 0.99], or None."""
    s_x = s_l + delta
    s_h = 3 * s_l - 2 * s_x
    if not (0 <= s_x <= 0.99 and 0 <= s_h <= 0.99):
        return None
    return s_x, s_h


def best_split(layer: _Layer, a: float, s_l: float) -> tuple[float, float, float]:
    """(error, s_x, s_h) of the best within-block split of s_l."""
    best = None
    for delta in SPLITS:
        sp = split(s_l, delta)
        if sp is None:
            continue
        e = layer.error(a, *sp)
        if best is None or e < best[0]:
            best = (e, *sp)
    if best is None:                                   # s_l too high for any split: equal
        best = (layer.error(a, min(s_l, 0.99), min(s_l, 0.99)), min(s_l, 0.99), min(s_l, 0.99))
    return best


def evolve_allocation(curves: np.ndarray, grid: np.ndarray, target: float, generations: int = 150,
                      mu: int = 8, lam: int = 32, seed: int = 0) -> np.ndarray:
    """Per-layer sparsities with mean ``target`` minimising sum_l e_l(s_l) (``curves``
    [L, len(grid)], interpolated): a (μ+λ) evolution strategy from the uniform split whose
    mutations move one grid step of budget from one layer to another."""
    n = curves.shape[0]
    lo, hi = float(grid[0]), float(grid[-1])
    step = float(grid[1] - grid[0])

    def fitness(s):
        return float(sum(np.interp(s[i], grid, curves[i]) for i in range(n)))

    start = np.full(n, min(max(target, lo), hi))
    if n == 1:
        return start
    rng = np.random.default_rng(seed)
    pop = [(fitness(start), start)]
    for _ in range(generations):
        children = []
        for _ in range(lam):
            parent = pop[rng.integers(len(pop))][1].copy()
            for _ in range(1 + rng.integers(3)):
                i, j = rng.choice(n, 2, replace=False)
                if parent[i] - step >= lo - 1e-9 and parent[j] + step <= hi + 1e-9:
                    parent[i] -= step
                    parent[j] += step
            children.append((fitness(parent), parent))
        pop = sorted(pop + children, key=lambda p: p[0])[:mu]
    return pop[0][1]


class WiSparse(Method):
    """WiSparse (seed 004): |x_i|·||W_:,i||^a channel scores, searched per-block budgets."""

    name = "wisparse"
    paper = "WiSparse: Weight-Aware Mixed Activation Sparsity (seed 004, arXiv 2026-02)"
    axis = "channels"
    needs_calibration = True
    quantile_threshold = True
    PARAMS = {"exponent": (float, None, "fix a for every layer (default: searched per layer)"),
              "seed": (int, 0, "random seed of the evolutionary search")}

    def __init__(self, **params):
        super().__init__(**params)
        self._cache = {}

    def _layers(self, weights, calibration):
        key = id(calibration)
        if key not in self._cache:
            self._cache = {key: {"layers": []}}
            rng = np.random.default_rng(0)
            for i in range(weights.shape.num_layers):
                x = calibration.xs[i]
                if x.shape[0] > MAX_TOKENS:
                    x = x[np.sort(rng.choice(x.shape[0], MAX_TOKENS, replace=False))]
                self._cache[key]["layers"].append(_Layer(x, calibration.w(i, "gate"), calibration.w(i, "up"),
                                                         calibration.w(i, "down"), calibration.act))
        return self._cache[key]

    def prepare(self, weights, calibration, target):
        super().prepare(weights, calibration, target)
        cache = self._layers(weights, calibration)
        layers = cache["layers"]
        if "a" not in cache:                 # exponent per layer, chosen at the first target seen
            cache["a"] = [self.params["exponent"] if self.params["exponent"] is not None else
                          min(EXPONENTS, key=lambda a: best_split(lay, a, max(self.target, 0.5))[0])
                          for lay in layers]
            cache["curves"] = np.array([[best_split(lay, a, s)[0] for s in GRID]
                                        for lay, a in zip(layers, cache["a"])])
        self.exponent = cache["a"]
        self.allocation = evolve_allocation(cache["curves"], GRID, self.target, seed=self.params["seed"])
        self.t_x, self.t_h, self.scale_x, self.scale_h, self.splits = [], [], [], [], []
        for lay, a, s_l in zip(layers, self.exponent, self.allocation):
            _, s_x, s_h = best_split(lay, a, float(s_l))
            t_x, t_h = lay.thresholds(a, s_x, s_h)
            self.t_x.append(t_x)
            self.t_h.append(t_h)
            self.scale_x.append((lay.norm_x ** a).astype(_F32))
            self.scale_h.append((lay.norm_h ** a).astype(_F32))
            self.splits.append((s_x, s_h))

    def select(self, inp: LayerInput) -> Plan:
        i = inp.layer
        return Plan(x_keep=np.abs(inp.x) * self.scale_x[i] > self.t_x[i], h_threshold=self.t_h[i],
                    h_scale=self.scale_h[i])

    def cost(self, shape) -> MethodCost:
        # d + k multiplies by the stored norms and compares; the norms (fp32) and two thresholds
        return MethodCost(ops=float(2 * (shape.d + shape.k)), unit="fp32_cuda",
                          bytes_read=float(4 * (shape.d + shape.k) + 8), memory_bytes=float(4 * (shape.d + shape.k) + 8),
                          launches=0)

    def describe(self) -> dict:
        out = super().describe()
        if getattr(self, "allocation", None) is not None:
            out["params"]["layer_sparsity"] = [round(float(s), 4) for s in self.allocation]
            out["params"]["layer_exponent"] = list(self.exponent)
            out["params"]["layer_split_x_h"] = [[round(a, 4), round(b, 4)] for a, b in self.splits]
        return out
