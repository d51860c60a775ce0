"""mlp_dense / mlp_sparse: modes, trace counts, and the exact cost of mispredictions."""
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from sparseinfer.reference import (MODES, Activation, SparseInferError, mlp_dense, mlp_sparse,
                                   order_contract as oc)

from helpers import WEIGHT_DTYPES, assert_bits_equal, mlp_weights

ACTS = ("relu", "fatrelu:0.01")
case = dict(d=st.sampled_from([1, 31, 33, 97, 160]), k=st.sampled_from([3, 64, 257, 600]),
            seed=st.integers(0, 2**32 - 1), sparsity=st.sampled_from([0.3, 0.5, 0.9]))


def _reference_pieces(x, wg, wu, wd, act):
    """h1 and h2 for every row, in the contract's order."""
    act = Activation.parse(act)
    return act(oc.warp_dot_rows(wg, x)), oc.warp_dot_rows(wu, x)


@pytest.mark.parametrize("dtype", WEIGHT_DTYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("act", ACTS)
@given(**case)
def test_oracle_equals_dense_bit_for_bit(dtype, act, d, k, seed, sparsity):
    x, wg, wu, wd = mlp_weights(np.random.default_rng(seed), d, k, dtype, sparsity)
    out, trace = mlp_sparse(x, wg, wu, wd, act, 1.0, "oracle")
    assume(0 < trace.actual_zero.sum() < k)  # some rows skipped, some kept
    assert_bits_equal(out, mlp_dense(x, wg, wu, wd, act), "oracle vs dense", f"d={d} k={k} seed={seed}")
    assert trace.rows["gate"] == trace.rows["up"] == trace.rows["down"] == int((~trace.actual_zero).sum())


@pytest.mark.parametrize("act", ACTS)
@given(alpha_milli=st.integers(950, 1050), **case)
def test_sparse_differs_from_dense_by_exactly_the_mispredicted_rows(act, alpha_milli, d, k, seed, sparsity):
    x, wg, wu, wd = mlp_weights(np.random.default_rng(seed), d, k, np.float16, sparsity)
    out_as, tr = mlp_sparse(x, wg, wu, wd, act, alpha_milli / 1000, "predicted+actual")
    out_p, tr_p = mlp_sparse(x, wg, wu, wd, act, alpha_milli / 1000, "predicted")
    h1, h2 = _reference_pieces(x, wg, wu, wd, act)
    mispredicted = tr.predicted_zero & (h1 != 0)
    assume(tr.predicted_zero.any() and (~tr.predicted_zero).any())
    # +AS changes the work, never the bits
    assert_bits_equal(out_as, out_p, "predicted+actual vs predicted")
    # exactly: the dense pipeline with the mispredicted rows' h3 removed
    h3 = h1 * h2
    h3_kept = np.where(mispredicted, np.float32(0), h3)
    assert_bits_equal(out_as, oc.down_projection(h3_kept, np.ascontiguousarray(wd.T)), "sparse vs dense minus mispredicted")
    # and the difference to dense is the mispredicted rows' contribution, within the rigorous bound
    dense = mlp_dense(x, wg, wu, wd, act)
    contribution = wd.astype(np.float64)[:, mispredicted] @ h3[mispredicted].astype(np.float64)
    bound = oc.down_projection_error_bound(h3, np.ascontiguousarray(wd.T)) * 2
    assert np.all(np.abs((dense.astype(np.float64) - out_as) - contribution) <= bound)


@given(alpha_milli=st.integers(950, 1050), **case)
def test_trace_counts_match_masks(alpha_milli, d, k, seed, sparsity):
    x, wg, wu, wd = mlp_weights(np.random.default_rng(seed), d, k, np.float16, sparsity)
    h1, _ = _reference_pieces(x, wg, wu, wd, "relu")
    for mode in MODES:
        _, tr = mlp_sparse(x, wg, wu, wd, "relu", alpha_milli / 1000, mode)
        np.testing.assert_array_equal(tr.actual_zero, h1 == 0)
        kept = ~tr.predicted_zero
        up = kept & (h1 != 0) if mode != "predicted" else kept
        assert tr.rows == {"gate": int(kept.sum()), "up": int(up.sum()), "down": int(up.sum())}
        assert tr.macs == {"gate": int(kept.sum()) * d, "up": int(up.sum()) * d, "down": int(up.sum()) * d,
                           "total": (int(kept.sum()) + 2 * int(up.sum())) * d}
        assert tr.weight_bytes_read["gate"] == int(kept.sum()) * d * 2
        assert tr.predictor_xor_words == (0 if mode == "oracle" else k * -(-d // 32))


def test_precision_and_recall_on_known_masks():
    from sparseinfer.reference.mlp import MLPTrace
    pred = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0], bool)
    act = np.array([1, 1, 1, 0, 1, 0, 0, 0, 0, 0], bool)
    tr = MLPTrace("predicted", 8, 10, "fp16", 1000, pred, act, ~pred, ~pred, ~pred)
    assert tr.precision == 0.75 and tr.recall == 0.75
    assert tr.predicted_sparsity == 0.4 and tr.actual_sparsity == 0.4 and tr.union_sparsity == 0.5


def test_fatrelu_keeps_the_threshold_itself():
    act = Activation.parse("fatrelu:0.25")
    z = np.array([0.25, 0.2499999, -1.0, 3.0], np.float32)
    assert act(z).tolist() == [0.25, 0.0, 0.0, 3.0]
    tiny = np.float32(1e-45)  # a subnormal is kept, -0.0 becomes +0.0
    out = Activation.parse("relu")(np.array([-0.0, 0.0, tiny], np.float32))
    assert out.tolist() == [0.0, 0.0, float(tiny)] and not np.signbit(out[0])


def test_silu_is_dense_only_and_matches_float64():
    rng = np.random.default_rng(0)
    x, wg, wu, wd = mlp_weights(rng, 64, 128)
    out = mlp_dense(x, wg, wu, wd, "silu")
    z = wg.astype(np.float64) @ x
    ref = wd.astype(np.float64) @ ((z / (1 + np.exp(-z))) * (wu.astype(np.float64) @ x))
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(SparseInferError, match="no exact zeros"):
        mlp_sparse(x, wg, wu, wd, "silu")


def test_alpha_one_predicts_most_zero_rows_of_a_sparse_layer():
    """On ProSparse-like data (gate biased negative, ~90 % zero) the predictor finds most zero rows, precisely."""
    x, wg, wu, wd = mlp_weights(np.random.default_rng(11), 512, 2048, np.float16, sparsity=0.9)
    _, tr = mlp_sparse(x, wg, wu, wd, "relu", 1.0, "predicted+actual")
    assert 0.85 < tr.actual_sparsity < 0.95 and tr.precision > 0.9 and tr.recall > 0.85


@pytest.mark.parametrize("mutate,message", [
    (lambda a: (a[0][:-1], *a[1:]), "w_gate has shape"),
    (lambda a: (a[0].astype(np.float64), *a[1:]), "x has dtype float64"),
    (lambda a: (a[0], a[1], a[2], a[3].T.copy()), "w_down has shape"),
    (lambda a: (a[0], a[1], a[2].astype(np.float32), a[3]), "share one dtype"),
    (lambda a: (np.where(np.arange(a[0].size) == 5, np.nan, a[0]).astype(np.float32), *a[1:]), "NaN at index 5"),
])
def test_bad_inputs_raise_one_clear_error(mutate, message):
    args = mlp_weights(np.random.default_rng(0), 40, 70, np.float16)
    with pytest.raises(SparseInferError, match=message):
        mlp_sparse(*mutate(args), "relu")


def test_unknown_mode_and_activation():
    args = mlp_weights(np.random.default_rng(0), 8, 8)
    with pytest.raises(SparseInferError, match="unknown mode"):
        mlp_sparse(*args, "relu", 1.0, "magic")
    with pytest.raises(SparseInferError, match="unknown activation"):
        mlp_dense(*args, "quick_gelu")
    with pytest.raises(SparseInferError, match="needs a threshold"):
        mlp_dense(*args, "fatrelu")


def test_prepared_transposed_down_is_checked():
    x, wg, wu, wd = mlp_weights(np.random.default_rng(0), 40, 70, np.float16)
    out, _ = mlp_sparse(x, wg, wu, wd, "relu", w_down_t=np.ascontiguousarray(wd.T))
    assert_bits_equal(out, mlp_sparse(x, wg, wu, wd, "relu")[0], "prepared vs unprepared")
    with pytest.raises(SparseInferError, match="w_down_t has shape"):
        mlp_sparse(x, wg, wu, wd, "relu", w_down_t=wd)


def test_dtype_names_round_trip_and_unknown_names_list_the_choices():
    from sparseinfer.reference.dtypes import SIGN_PACK_DTYPES, dtype_name, parse_dtype

    for dt in SIGN_PACK_DTYPES:
        assert parse_dtype(dtype_name(dt)) == dt and parse_dtype(dt.name) == dt
    with pytest.raises(SparseInferError, match=r"unknown dtype 'fp8'; expected one of fp32, fp16, bf16, int8$"):
        parse_dtype("fp8")
