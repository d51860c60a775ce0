"""The NumPy reference model: KV-cache consistency, sparse/dense relations, traces."""
from __future__ import annotations

import numpy as np
import pytest

from sparseinfer.model_export.synthetic import make_weights, synthetic_shape
from sparseinfer.reference import mlp_sparse
from sparseinfer.reference.errors import SparseInferError
from sparseinfer.reference.llama import LlamaReference

PROMPT = [256, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100]


@pytest.fixture(scope="module")
def weights():
    return make_weights(synthetic_shape("tiny", layers=2), seed=5)


@pytest.mark.parametrize("kv_heads,tie", [(2, False), (4, True)])
def test_decode_with_cache_matches_prefill(kv_heads, tie):
    """Prefill of n tokens == prefill of n-3 then three decode steps (dense MLP)."""
    w = make_weights(synthetic_shape("tiny", layers=2, kv_heads=kv_heads, tie_embeddings=tie), seed=2)
    full = LlamaReference(w).prefill(PROMPT)
    model = LlamaReference(w)
    model.prefill(PROMPT[:-3])
    steps = np.stack([model.decode(t).logits for t in PROMPT[-3:]])
    assert model.position == len(PROMPT)
    assert np.abs(full[-3:]).max() > 0.1
    # batched float32 products vs the order contract: rounding only
    np.testing.assert_allclose(steps, full[-3:], rtol=0, atol=2e-4 * np.abs(full).max())


def test_sparse_with_nothing_predicted_equals_dense_bit_for_bit(weights):
    """α so large that no row is predicted zero: +AS skips only true zeros, a no-op by contract."""
    dense, sparse = LlamaReference(weights), LlamaReference(weights, sparse=True, alpha="1000")
    dense.prefill(PROMPT)
    sparse.prefill(PROMPT)
    for tok in (33, 34, 35):
        a, b = dense.decode(tok), sparse.decode(tok, trace=True)
        assert all(tr.predicted_sparsity == 0 and tr.actual_sparsity > 0.5 for tr in b.traces)
        assert np.array_equal(a.logits.view(np.uint32), b.logits.view(np.uint32))


def test_traces_are_the_mlp_calls_on_the_recorded_inputs(weights):
    model = LlamaReference(weights, sparse=True, alpha="1.05@0,1.00")
    model.prefill(PROMPT)
    step = model.decode(65, trace=True)
    assert [tr.alpha_milli for tr in step.traces] == [1050, 1000]
    for i, (x, tr) in enumerate(zip(step.mlp_inputs, step.traces)):
        lw = weights.layers[i]
        _, again = mlp_sparse(x, lw.gate, lw.up, lw.down, weights.activation, alpha=tr.alpha_milli / 1000)
        assert 0 < tr.predicted_zero.sum() < tr.k
        assert np.array_equal(again.predicted_zero, tr.predicted_zero)
        assert np.array_equal(again.computed_up, tr.computed_up)


def test_dense_trace_reports_the_predictor_without_skipping(weights):
    model = LlamaReference(weights)
    model.prefill(PROMPT)
    step = model.decode(65, trace=True)
    for tr in step.traces:
        assert tr.computed_gate.all() and tr.computed_down.all()
        assert 0 < tr.predicted_zero.sum() < tr.k and 0 < tr.precision <= 1 and 0 < tr.recall <= 1


def test_bad_input(weights):
    model = LlamaReference(weights)
    with pytest.raises(SparseInferError, match="outside the vocabulary"):
        model.prefill([1, 999])
    with pytest.raises(SparseInferError, match="exceed the context of 512"):
        model.prefill([1] * 513)
    silu = make_weights(synthetic_shape("tiny", layers=1, hidden_act="silu"), seed=0)
    with pytest.raises(SparseInferError, match="no exact zeros"):
        LlamaReference(silu, sparse=True)
