"""The host (numba) sparse MLP against the reference, bit for bit, on the CPU.

The same Hypothesis cases as the GPU kernel tests (tails, -0.0, subnormals, N_neg = N_pos
ties, all-negative / all-positive x, target sparsities), float32 weights: the host kernels
follow the same order contract, so every output must equal the reference's bits.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given

from kernel_cases import assert_same, build_case, cases

pytest.importorskip("numba", reason="the host kernels are compiled with numba")
from sparseinfer.kernels import host_mlp  # noqa: E402
from sparseinfer.reference import mlp_sparse, order_contract as oc
from sparseinfer.reference.errors import SparseInferError
from sparseinfer.reference.signs import negative_product_counts, pack_signs, tail_mask

FP32_CASES = cases(dtypes=(np.float32,))


def _mlp(case):
    return host_mlp.HostSparseMLP(case.w_gate, case.w_up, np.ascontiguousarray(case.w_down.T), case.activation)


@given(case=FP32_CASES)
def test_sparse_mlp_equals_reference_bit_for_bit(case):
    case.assert_nontrivial()
    out, zero, rows = _mlp(case)(case.x, case.alpha_milli)
    want, trace = mlp_sparse(case.x, case.w_gate, case.w_up, case.w_down, case.activation,
                             alpha=case.alpha_milli / 1000, mode="predicted+actual")
    assert_same(zero, trace.predicted_zero, "predicted_zero", case)
    assert_same(rows, np.flatnonzero(trace.computed_up), "rows computed in up/down", case)
    assert_same(out, want, "output", case)


@given(case=FP32_CASES)
def test_counts_equal_reference(case):
    w_signs, x_signs = pack_signs(case.w_gate), pack_signs(case.x)
    got = host_mlp.negative_counts(w_signs, x_signs, tail_mask(case.d))
    assert_same(got, negative_product_counts(w_signs, x_signs, case.d), "N_neg", case)


@pytest.mark.parametrize("d", [1, 33, 127, 128, 129, 4096, 4100])
def test_dot_rows_follow_the_contract_for_every_tail(d):
    rng = np.random.default_rng(d)
    w = rng.standard_normal((70, d)).astype(np.float32) * np.float32(3.0)
    x = rng.standard_normal(d).astype(np.float32)
    rows = np.sort(rng.choice(70, 40, replace=False)).astype(np.int64)
    got = host_mlp.dot_rows(w, rows, x)
    want = oc.warp_dot_rows(w[rows], x)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    # and the order matters here: a plain float32 dot product differs in some rows
    assert not np.array_equal(got, (w[rows] @ x).astype(np.float32)) or d < 8


@pytest.mark.parametrize("block", [16, 512, 560, 1100])
def test_down_rows_cross_chunks_in_the_contract_order(block):
    rng = np.random.default_rng(3)
    k, d = 3 * oc.DOWN_ROW_CHUNK + 77, 1100          # several chunks; blocks with a partial last one
    w_t = rng.standard_normal((k, d)).astype(np.float32)
    h3 = np.zeros(k, np.float32)
    rows = np.sort(rng.choice(k, k // 3, replace=False)).astype(np.int64)
    h3[rows] = rng.standard_normal(rows.size).astype(np.float32)
    got = host_mlp.down_rows(h3[rows], rows, w_t, block)
    want = oc.down_projection(h3, w_t)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    assert not np.array_equal(got, (h3 @ w_t).astype(np.float32))   # another order rounds differently


@pytest.mark.parametrize("d", [1, 33, 1100, 4096, 5120, 11008])
@pytest.mark.parametrize("threads", [1, 2, 3, 16])
def test_down_column_blocks_cover_d_in_whole_lines_and_balance_threads(d, threads):
    block = host_mlp.down_column_block(d, threads)
    tasks = -(-d // block)
    assert block % (host_mlp.CACHE_LINE // 4) == 0
    assert block <= max(host_mlp.DOWN_MAX_COLUMNS, host_mlp.CACHE_LINE // 4)
    assert (tasks - 1) * block < d <= tasks * block            # no empty task
    if d % (threads * host_mlp.CACHE_LINE // 4) == 0:           # lines split evenly: every thread has a task
        assert tasks % threads == 0


def test_bad_weights_and_inputs_are_one_line_errors():
    case = build_case(33, 97, np.float32, 1000, 1, "relu", ())
    with pytest.raises(SparseInferError, match="w_gate has dtype float16"):
        host_mlp.HostSparseMLP(case.w_gate.astype(np.float16), case.w_up, case.w_down.T, "relu")
    with pytest.raises(SparseInferError, match="w_down_t has shape"):
        host_mlp.HostSparseMLP(case.w_gate, case.w_up, case.w_down, "relu")
    with pytest.raises(SparseInferError, match="no exact zeros"):
        host_mlp.HostSparseMLP(case.w_gate, case.w_up, case.w_down.T, "silu")
    with pytest.raises(SparseInferError, match=r"x has shape \(32,\)"):
        _mlp(case)(case.x[:32], 1000)
