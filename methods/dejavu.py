"""DejaVu's trained low-rank predictor, as PowerInfer uses it.

Liu, Wang, Dao, Zhou, Yuan, Song, Shrivastava, Zhang, Tian, Ré, Chen: "Deja Vu: Contextual
Sparsity for Efficient LLMs at Inference Time" (ICML 2023); PowerInfer (Song et al. 2023)
uses the same predictor for ReLU-fied models (rank 1024 for ProSparse-13B, paper Table I).

Per layer: ``logits = relu(x W1 + b1) W2 + b2`` (Linear d→r, ReLU, Linear r→k), trained in
NumPy (Adam, binary cross-entropy) on the model's own MLP inputs from the calibration
prompts, labelled with the reference active set (h1 != 0 on ReLU; the ``1 - s`` largest
|h1| on SiLU). A row is skipped when its logit is below the threshold: ``auto`` calibrates
it per layer to the target sparsity on the calibration tokens; a number fixes it
(PowerInfer's default is 0). ``save=FILE.npz`` writes the trained predictors,
``load=FILE.npz`` reads them instead of training (checked against the model's shape).
Memory and ops (d·r + r·k fp16 MACs per layer) feed the simulator as Table I's PowerInfer
row does, at the rank actually used.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sparseinfer.reference.errors import SparseInferError
from sparseinfer.reference.files import replacing

from .base import LayerInput, Method, MethodCost, Plan, parse_auto_or_float

FP16_BYTES = 2
_F32 = np.float32


@dataclass
class LowRankPredictor:
    """One layer's d→r→k predictor."""

    w1: np.ndarray   # [d, r]
    b1: np.ndarray   # [r]
    w2: np.ndarray   # [r, k]
    b2: np.ndarray   # [k]

    def logits(self, x: np.ndarray) -> np.ndarray:
        h = np.maximum(x @ self.w1 + self.b1, _F32(0))
        return (h @ self.w2 + self.b2).astype(_F32)


def train_predictor(x: np.ndarray, active: np.ndarray, rank: int, epochs: int = 300, lr: float = 1e-2,
                    seed: int = 0, batch: int = 1024) -> LowRankPredictor:
    """Fit a d→r→k predictor of ``active`` [T, k] (bool) from ``x`` [T, d] with Adam on the
    mean binary cross-entropy."""
    x = np.asarray(x, dtype=_F32)
    y = np.asarray(active, dtype=_F32)
    t, d = x.shape
    k = y.shape[1]
    rng = np.random.default_rng(seed)
    p = y.mean(axis=0).clip(1e-3, 1 - 1e-3)
    params = [rng.standard_normal((d, rank)).astype(_F32) * _F32(np.sqrt(2.0 / d)),
              np.zeros(rank, _F32),
              rng.standard_normal((rank, k)).astype(_F32) * _F32(np.sqrt(1.0 / rank)),
              np.log(p / (1 - p)).astype(_F32)]
    m = [np.zeros_like(q) for q in params]
    v = [np.zeros_like(q) for q in params]
    b1, b2, eps = 0.9, 0.999, 1e-8
    step = 0
    for _ in range(int(epochs)):
        order = rng.permutation(t)
        for start in range(0, t, batch):
            idx = order[start:start + batch]
            xb, yb = x[idx], y[idx]
            pre = xb @ params[0] + params[1]
            h = np.maximum(pre, 0)
            logits = h @ params[2] + params[3]
            g = (0.5 * (1.0 + np.tanh(0.5 * logits)) - yb) / (len(idx) * k)   # dBCE/dlogits (mean); stable sigmoid
            gw2 = h.T @ g
            gb2 = g.sum(axis=0)
            gh = (g @ params[2].T) * (pre > 0)
            grads = [xb.T @ gh, gh.sum(axis=0), gw2, gb2]
            step += 1
            for j, gr in enumerate(grads):
                gr = gr * k                                                  # per-row mean gradients
                m[j] = b1 * m[j] + (1 - b1) * gr
                v[j] = b2 * v[j] + (1 - b2) * gr * gr
                mh = m[j] / (1 - b1 ** step)
                vh = v[j] / (1 - b2 ** step)
                params[j] = (params[j] - lr * mh / (np.sqrt(vh) + eps)).astype(_F32)
    return LowRankPredictor(*params)


def save_predictors(path, predictors: list[LowRankPredictor], meta: dict) -> Path:
    """All layers' predictors in one .npz, written whole (temp name + rename)."""
    p = Path(path)
    if p.suffix != ".npz":
        raise SparseInferError(f"dejavu save file must end in .npz, got {p.name}")
    if not p.parent.is_dir():
        raise SparseInferError(f"no such directory for the dejavu predictors: {p.parent}")
    arrays = {"meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)}
    for i, pr in enumerate(predictors):
        for name in ("w1", "b1", "w2", "b2"):
            arrays[f"{name}_{i}"] = getattr(pr, name)
    with replacing(p) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return p


def load_predictors(path, d: int, k: int, num_layers: int) -> tuple[list[LowRankPredictor], dict]:
    p = Path(path)
    if not p.is_file():
        raise SparseInferError(f"no such dejavu predictor file: {p}")
    try:
        with np.load(p) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            preds = [LowRankPredictor(*(z[f"{n}_{i}"].astype(_F32) for n in ("w1", "b1", "w2", "b2")))
                     for i in range(num_layers)]
    except (OSError, KeyError, ValueError) as e:
        raise SparseInferError(f"cannot read dejavu predictors {p}: {e}") from None
    for i, pr in enumerate(preds):
        if pr.w1.shape[0] != d or pr.w2.shape[1] != k:
            raise SparseInferError(f"{p}: layer {i} predicts {pr.w1.shape[0]}->{pr.w2.shape[1]}, the model has "
                                   f"d {d}, k {k}")
    return preds, meta


def default_rank(d: int) -> int:
    """PowerInfer's rank 1024 for d 5120 is d/5; at least 16, at most 1024."""
    return int(min(1024, max(16, d // 5)))


def _rank_param(text):
    r = int(text)
    if r < 1:
        raise ValueError("rank must be >= 1")
    return r


class DejaVu(Method):
    """DejaVu / PowerInfer (Liu et al. 2023): trained d→r→k predictor per layer."""

    name = "dejavu"
    paper = "Liu et al.: Deja Vu, Contextual Sparsity for Efficient LLMs (ICML 2023); PowerInfer (2023)"
    needs_calibration = True
    PARAMS = {"rank": (_rank_param, None, "rank r (default d/5, 16..1024)"),
              "threshold": (parse_auto_or_float, "auto", "'auto' (calibrated to the target) or a logit threshold"),
              "epochs": (int, 200, "training epochs"),
              "lr": (float, 1e-2, "Adam learning rate"),
              "seed": (int, 0, "random seed"),
              "save": (str, None, "write the trained predictors to this .npz"),
              "load": (str, None, "read predictors from this .npz instead of training")}

    def __init__(self, **params):
        super().__init__(**params)
        self._trained: dict = {}

    @property
    def rank(self) -> int:
        return self.params["rank"] or default_rank(self.shape.d)

    def prepare(self, weights, calibration, target):
        if self.params["load"] and self.params["threshold"] != "auto":
            self.needs_calibration = False
        super().prepare(weights, calibration, target)
        s = self.shape
        # ReLU labels do not depend on the target: train once and reuse
        key = "relu" if self.act.sparse_capable else f"top{self.target:.6f}"
        if key not in self._trained:
            if self.params["load"]:
                preds, meta = load_predictors(self.params["load"], s.d, s.k, s.num_layers)
                self.params["rank"] = int(preds[0].w1.shape[1])
            else:
                preds = [train_predictor(calibration.xs[i], ~calibration.reference_zero(i, self.target), self.rank,
                                         self.params["epochs"], self.params["lr"], self.params["seed"] + i)
                         for i in range(s.num_layers)]
                if self.params["save"]:
                    save_predictors(self.params["save"], preds,
                                    {"model": s.name, "d": s.d, "k": s.k, "rank": self.rank, "labels": key,
                                     "calibration_tokens": calibration.tokens})
            self._trained[key] = preds
        self.predictors = self._trained[key]
        if self.params["threshold"] == "auto":
            self.t = [float(np.quantile(pr.logits(calibration.xs[i]), self.target)) if self.target > 0 else -np.inf
                      for i, pr in enumerate(self.predictors)]
        else:
            self.t = [float(self.params["threshold"])] * s.num_layers

    def select(self, inp: LayerInput) -> Plan:
        return Plan(skip_rows=self.predictors[inp.layer].logits(inp.x) < self.t[inp.layer])

    def cost(self, shape) -> MethodCost:
        r = self.params["rank"] or default_rank(shape.d)
        macs = shape.d * r + r * shape.k
        return MethodCost(ops=float(macs), unit="fp16_tensor", bytes_read=float(macs * FP16_BYTES),
                          memory_bytes=float(macs * FP16_BYTES), launches=4, kind="dejavu", rank=r)
