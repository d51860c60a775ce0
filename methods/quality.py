"""Quality proxies of a sparse run against the dense model on the same prompts.

All take logits of shape [tokens, vocab] (the dense reference first) and work in float64:
top-1 agreement (fraction of positions whose argmax agrees), mean KL(p_dense || p_sparse)
of the next-token distributions in nats, and the largest |Δlogit|.
"""
from __future__ import annotations

import numpy as np

from sparseinfer.reference.errors import SparseInferError


def _pair(reference, test):
    r = np.asarray(reference, dtype=np.float64)
    t = np.asarray(test, dtype=np.float64)
    if r.shape != t.shape or r.ndim != 2 or r.shape[0] == 0:
        raise SparseInferError(f"logits must be matching [tokens, vocab] arrays, got {r.shape} and {t.shape}")
    if not (np.isfinite(r).all() and np.isfinite(t).all()):
        raise SparseInferError("logits contain NaN or infinity")
    return r, t


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def top1_agreement(reference, test) -> float:
    r, t = _pair(reference, test)
    return float(np.mean(r.argmax(axis=-1) == t.argmax(axis=-1)))


def mean_kl(reference, test) -> float:
    """Mean over positions of KL(softmax(reference) || softmax(test)), in nats."""
    r, t = _pair(reference, test)
    lp, lq = log_softmax(r), log_softmax(t)
    return float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1)))


def max_abs_logit_delta(reference, test) -> float:
    r, t = _pair(reference, test)
    return float(np.max(np.abs(r - t)))


def quality(reference, test) -> dict:
    return {"top1_agreement": top1_agreement(reference, test), "mean_kl": mean_kl(reference, test),
            "max_abs_logit_delta": max_abs_logit_delta(reference, test)}
