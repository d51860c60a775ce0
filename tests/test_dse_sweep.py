"""α sweep: range parsing, Pareto front, and a full sweep over a toy residual-MLP model."""
import numpy as np
import pytest

from sparseinfer.methods import alpha_sweep as sw
from sparseinfer.methods.pareto import mark_pareto, pareto_front
from sparseinfer.reference import AlphaSchedule, mlp_dense, mlp_sparse
from sparseinfer.reference.errors import SparseInferError
from sparseinfer.reference.shapes import ModelShape
from sparseinfer.sim.hardware import load_hardware

from helpers import mlp_weights


def test_alpha_range_parsing():
    assert sw.parse_alpha_range("1.00:1.05:0.01") == [1000, 1010, 1020, 1030, 1040, 1050]
    assert sw.parse_alpha_range("1.02") == [1020]
    assert sw.parse_alpha_range("0.995:1.005:0.005") == [995, 1000, 1005]


@pytest.mark.parametrize("spec,message", [
    ("1.00:1.05", "use START:STOP:STEP"),
    ("a:b:c", "'a' is not a number"),
    ("1.00:1.05:0", "STEP must be > 0"),
    ("1.05:1.00:0.01", "STOP is below START"),
    ("1.0001:1.05:0.01", "more than 3 decimals"),
    ("0:1:0.1", "alpha must be > 0"),
    ("0.001:1:0.001", "at most 101"),
])
def test_malformed_alpha_ranges(spec, message):
    with pytest.raises(SparseInferError, match=message):
        sw.parse_alpha_range(spec)


def test_layers_and_schedule():
    assert sw.parse_layers("0-19", 40) == (0, 19) and sw.parse_layers("all", 4) == (0, 3)
    assert sw.schedule_for(1020, (0, 19)) == AlphaSchedule.parse("1.02@0-19,1.00")
    with pytest.raises(SparseInferError, match="need 0 <= A <= B <= 3"):
        sw.parse_layers("0-19", 4)
    with pytest.raises(SparseInferError, match="bad layer range 'x'"):
        sw.parse_layers("x", 4)
    assert sw.parse_layers(None, 40) == (0, 19) and sw.parse_layers(None, 8) == (0, 7)


def test_pareto_front():
    rows = [{"latency_ms": 1.0, "mean_kl": 0.5}, {"latency_ms": 2.0, "mean_kl": 0.1},
            {"latency_ms": 2.5, "mean_kl": 0.3}, {"latency_ms": 3.0, "mean_kl": 0.0}]
    assert pareto_front(rows) == [0, 1, 3]
    assert pareto_front(rows, "mean_kl", "latency_ms") == [0, 1, 3]
    mark_pareto(rows)
    assert [r["pareto"] for r in rows] == [True, True, False, True]
    ties = [{"latency_ms": 1.0, "loss": 0.2}, {"latency_ms": 1.0, "loss": 0.2}, {"latency_ms": 1.0, "loss": 0.3}]
    assert pareto_front(ties, "latency_ms", "loss") == [0, 1]          # equal rows do not dominate each other


class ToyRunner:
    """Residual stack of gated ReLU MLPs with an LM head; tokens are random inputs."""

    def __init__(self, layers=4, d=64, k=160, vocab=50, tokens=6, seed=0):
        rng = np.random.default_rng(seed)
        self.layers = [mlp_weights(rng, d, k, np.float32, sparsity=0.8)[1:] for _ in range(layers)]
        self.inputs = [rng.standard_normal(d).astype(np.float32) for _ in range(tokens)]
        self.lm_head = rng.standard_normal((vocab, d)).astype(np.float32)
        self.shape = ModelShape("toy", d, k, layers, 4, 4, vocab)

    def _forward(self, x, schedule=None):
        traces = []
        h = x
        for i, (wg, wu, wd) in enumerate(self.layers):
            if schedule is None:
                out = mlp_dense(h, wg, wu, wd, "relu")
            else:
                out, tr = mlp_sparse(h, wg, wu, wd, "relu", alpha=schedule.alpha(i))
                traces.append(tr)
            h = (h + out).astype(np.float32)
        return self.lm_head @ h, traces

    def dense_logits(self):
        return np.stack([self._forward(x)[0] for x in self.inputs])

    def sparse(self, schedule):
        schedule = AlphaSchedule.parse(schedule)
        outs = [self._forward(x, schedule) for x in self.inputs]
        return np.stack([o[0] for o in outs]), [o[1] for o in outs]


def test_sweep_over_a_toy_model():
    runner = ToyRunner()
    seen = []
    result = sw.run_sweep(runner, [900, 1000, 1100, 1300], (0, 3), load_hardware("jetson-orin-agx"),
                          progress=lambda i, n, row: seen.append((i, n)))
    rows = result["rows"]
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert [r["alpha"] for r in rows] == [0.9, 1.0, 1.1, 1.3]
    pred = [r["predicted_sparsity"] for r in rows]
    assert 0 < pred[-1] < pred[0] < 1                                   # data non-trivial
    assert all(b <= a for a, b in zip(pred, pred[1:]))                  # larger α skips fewer rows
    lat = [r["latency_ms"] for r in rows]
    assert all(b >= a for a, b in zip(lat, lat[1:]))                   # and costs latency
    assert all(r["speedup_vs_llama.cpp"] > 0 for r in rows)
    # the union with actual zeros never drops below the actual sparsity
    assert all(r["union_sparsity"] >= r["actual_sparsity"] - 1e-12 for r in rows)
    # quality: some error at the aggressive end, and KL never negative
    assert rows[0]["max_abs_logit_delta"] > 0 and all(r["mean_kl"] >= 0 for r in rows)
    assert any(r["pareto"] for r in rows)
    # the conservative end agrees with the dense model at least as well as the aggressive end
    assert rows[-1]["top1_agreement"] >= rows[0]["top1_agreement"]
