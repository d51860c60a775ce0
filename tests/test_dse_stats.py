"""Predictor statistics and quality proxies on constructed data with known answers."""
import math

import numpy as np
import pytest

from sparseinfer.methods import predictor_stats as ps
from sparseinfer.methods import quality as q
from sparseinfer.reference import mlp_sparse
from sparseinfer.reference.errors import SparseInferError
from sparseinfer.reference.mlp import MLPTrace

from helpers import mlp_weights


def _masks():
    # 10 rows: truly zero = rows 0-5; predicted zero = rows 0-3 and 8
    actual = np.zeros(10, dtype=bool)
    actual[:6] = True
    pred = np.zeros(10, dtype=bool)
    pred[[0, 1, 2, 3, 8]] = True
    return pred, actual


def test_confusion_precision_recall_known_answer():
    pred, actual = _masks()
    c = ps.confusion(pred, actual)
    assert (c.true_zero, c.false_zero, c.missed_zero, c.true_nonzero) == (4, 1, 2, 3)
    assert c.precision == 4 / 5 and c.recall == 4 / 6
    none = ps.confusion(np.zeros(4, bool), np.zeros(4, bool))
    assert none.precision == 1.0 and none.recall == 1.0
    with pytest.raises(SparseInferError, match="boolean"):
        ps.confusion(pred.astype(int), actual)
    with pytest.raises(SparseInferError, match="shapes differ"):
        ps.confusion(pred[:3], actual)


def _trace(pred, actual, d=64, dtype="fp16"):
    k = pred.size
    gate = ~pred
    up = gate & ~actual
    return MLPTrace(mode="predicted+actual", d=d, k=k, weight_dtype=dtype, alpha_milli=1000, predicted_zero=pred,
                    actual_zero=actual, computed_gate=gate, computed_up=up, computed_down=up.copy())


def test_layer_stats_pool_tokens_and_count_bytes():
    pred, actual = _masks()
    t1 = _trace(pred, actual)
    t2 = _trace(np.ones(10, bool), actual)                 # predicts every row zero
    s = ps.layer_stats(3, [t1, t2])
    # pooled: t1 (tz 4, fz 1, mz 2), t2 (tz 6, fz 4, mz 0) -> precision 10/15, recall 10/12
    assert s.precision == pytest.approx(10 / 15) and s.recall == pytest.approx(10 / 12)
    assert s.predicted_sparsity == pytest.approx((0.5 + 1.0) / 2)
    assert s.actual_sparsity == pytest.approx(0.6)
    assert s.union_sparsity == pytest.approx((0.7 + 1.0) / 2)
    # t1 reads 5 gate rows and 3 up and 3 down rows (~pred & ~actual = rows 6, 7, 9)
    read_rows_t1 = 5 + 3 + 3
    assert s.bytes_skipped == pytest.approx(((1 - read_rows_t1 / 30) + 1.0) / 2)
    words = 2  # ceil(64 / 32)
    assert s.predictor_bytes_fraction == pytest.approx(10 * words * 4 / (3 * 64 * 10 * 2))


def test_stats_agree_with_reference_traces():
    rng = np.random.default_rng(5)
    x, wg, wu, wd = mlp_weights(rng, 96, 200, np.float16, sparsity=0.85)
    _, tr = mlp_sparse(x, wg, wu, wd, "relu", alpha=1.0)
    assert 0 < tr.predicted_zero.sum() < 200 and 0 < tr.actual_zero.sum() < 200
    s = ps.per_layer_stats([[tr], [tr]])[0]
    assert s.precision == pytest.approx(tr.precision) and s.recall == pytest.approx(tr.recall)
    expected = 1 - (tr.weight_bytes_read["total"] - tr.weight_bytes_read["predictor"]) / (3 * 96 * 200 * 2)
    assert s.bytes_skipped == pytest.approx(expected)
    with pytest.raises(SparseInferError, match="same number of layers"):
        ps.per_layer_stats([[tr], [tr, tr]])


def test_quality_proxies_known_answers():
    ref = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0]])
    test = np.array([[0.0, 0.0], [0.0, 1.0], [0.0, 2.0]])
    assert q.top1_agreement(ref, test) == pytest.approx(2 / 3)        # row 0 ties -> argmax 0 both
    assert q.max_abs_logit_delta(ref, test) == 1.0
    # KL of row 1: p = softmax(1,0), q = softmax(0,1); row 2: p = softmax(0,3), q = softmax(0,2)
    def kl(a, b):
        p = np.exp(a) / np.exp(a).sum()
        r = np.exp(b) / np.exp(b).sum()
        return float((p * np.log(p / r)).sum())
    expected = (0.0 + kl(np.array([1.0, 0]), np.array([0, 1.0])) + kl(np.array([0, 3.0]), np.array([0, 2.0]))) / 3
    assert q.mean_kl(ref, test) == pytest.approx(expected, rel=1e-12)
    assert q.mean_kl(ref, ref) == 0.0 and q.top1_agreement(ref, ref) == 1.0
    big = np.array([[1000.0, 0.0]])
    assert math.isfinite(q.mean_kl(big, -big))
    with pytest.raises(SparseInferError, match="matching"):
        q.mean_kl(ref, test[:2])
    with pytest.raises(SparseInferError, match="NaN"):
        q.top1_agreement(ref, np.full_like(ref, np.nan))
