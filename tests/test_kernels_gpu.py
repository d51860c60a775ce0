"""Every kernel version against the reference, on a GPU and on the CPU emulation of the kernels.

Integer results (sign words, counts, masks, active lists) exactly; float outputs of the
deterministic versions bit for bit; the atomic down projection within the reference's
rigorous error bound. Each case first asserts it is non-trivial.

Every test runs twice, once per backend (the module's ``backend`` fixture): ``gpu``
(marker ``gpu``: CuPy on a CUDA device, skipped with the reason where there is none) and
``emulated`` (marker ``emulated``: the same CUDA sources compiled for the CPU by
``kernels/emulator.py``, skipped where g++ is missing). The emulation checks the
kernels' logic in CI; only the GPU run checks them on the hardware.
"""
from __future__ import annotations


import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel_cases import BACKENDS, assert_same, build_case, cases, on_backend, to_host
from sparseinfer.kernels import DOWN, GATE_UP, PACK_SIGNS, PIPELINES, PREDICT, SparseMLP
from sparseinfer.kernels.device import DeviceMatrix, cupy
from sparseinfer.kernels import ops
from sparseinfer.kernels.expected import expected_h1_h3, within_down_bound
from sparseinfer.kernels.graph import MLPGraph
from sparseinfer.reference import mlp_dense, mlp_sparse, order_contract as oc
from sparseinfer.reference.dtypes import SIGN_PACK_DTYPES, WEIGHT_DTYPES
from sparseinfer.reference.errors import SparseInferError
from sparseinfer.reference.signs import pack_signs



@pytest.fixture(scope="module", autouse=True, params=BACKENDS)
def backend(request):
    """gpu: skipped by conftest where there is no device; emulated: the kernels on the CPU."""
    with on_backend(request.param) as name:
        yield name


def _mlp(case, pipeline="sparse-fused"):
    return SparseMLP(case.w_gate, case.w_up, case.w_down, case.activation, pipeline=pipeline)


@pytest.mark.parametrize("version", list(PACK_SIGNS))
@given(case=cases(), sign_dtype=st.sampled_from(SIGN_PACK_DTYPES))
def test_pack_signs_matches_reference(version, case, sign_dtype):
    if sign_dtype in WEIGHT_DTYPES:
        w = case.w_gate.astype(sign_dtype)
    else:
        w = np.random.default_rng(case.seed).integers(-128, 128, case.w_gate.shape).astype(np.int8)
    want = pack_signs(w)
    assert want.any() and (want != 0xFFFFFFFF).any(), f"trivial sign words: {case}"
    got = PACK_SIGNS[version].run(DeviceMatrix.from_host("w", w))
    assert_same(to_host(got), want, f"pack_signs {version} {np.dtype(sign_dtype)}", case)
    x_words = ops.pack_x_signs(cupy().asarray(case.x))
    assert_same(to_host(x_words), pack_signs(case.x), "pack_x_signs", case)


@pytest.mark.parametrize("version", list(PREDICT))
@given(case=cases())
def test_predict_matches_reference(version, case):
    case.assert_nontrivial()
    cp = cupy()
    w_signs = cp.asarray(pack_signs(case.w_gate))
    x_signs = cp.asarray(pack_signs(case.x))
    counts, zero, active, n_active = PREDICT[version].run(w_signs, x_signs, case.d, case.alpha_milli)
    assert_same(to_host(counts), case.counts, f"predict {version} counts", case)
    assert_same(to_host(zero).astype(bool), case.predicted_zero, f"predict {version} zero mask", case)
    if active is not None:
        want = np.flatnonzero(~case.predicted_zero).astype(np.int32)
        n = int(to_host(n_active)[0])
        assert n == want.size, f"n_active {n} != {want.size} ({case})"
        assert_same(to_host(active)[:n], want, f"predict {version} active list", case)


@pytest.mark.parametrize("version", list(GATE_UP))
@given(case=cases())
def test_gate_up_matches_reference_bit_for_bit(version, case):
    case.assert_nontrivial()
    mlp = _mlp(case)
    cp = cupy()
    x = cp.asarray(case.x)
    h1, h3, zero = GATE_UP[version].run(mlp, x, ops.pack_x_signs(x), case.alpha_milli)
    want_h1, want_h3 = case.h1_h3(sparse=version != "dense")
    assert_same(to_host(h1), want_h1, f"gate_up {version} h1", case)
    assert_same(to_host(h3), want_h3, f"gate_up {version} h3", case)
    if zero is not None:
        assert_same(to_host(zero).astype(bool), case.predicted_zero, f"gate_up {version} zero mask", case)


@pytest.mark.parametrize("version", list(DOWN))
@given(case=cases())
def test_down_matches_reference(version, case):
    case.assert_nontrivial()
    _, h3 = case.h1_h3()
    w_down_t = np.ascontiguousarray(case.w_down.T)
    got = to_host(DOWN[version].run(cupy().asarray(h3), DeviceMatrix.from_host("w_down_t", w_down_t)))
    if DOWN[version].deterministic:
        assert_same(got, oc.down_projection(h3, w_down_t), f"down {version}", case)
    else:
        ok = within_down_bound(got, h3, w_down_t)
        bad = np.flatnonzero(~ok)
        assert bad.size == 0, (f"down {version}: {bad.size} of {got.size} columns outside the rigorous bound; "
                               f"first [{bad[0]}] got {got[bad[0]]!r} ({case})")


@pytest.mark.parametrize("pipeline", list(PIPELINES))
@given(case=cases())
def test_sparse_mlp_matches_reference(pipeline, case):
    case.assert_nontrivial()
    mlp = _mlp(case, pipeline)
    alpha = case.alpha_milli / 1000
    if not PIPELINES[pipeline].sparse:
        assert_same(to_host(mlp(case.x, alpha)), mlp_dense(case.x, case.w_gate, case.w_up, case.w_down, case.activation),
                    f"SparseMLP {pipeline}", case)
        return
    want, want_trace = mlp_sparse(case.x, case.w_gate, case.w_up, case.w_down, case.activation, alpha)
    got, trace = mlp(case.x, alpha, trace=True)
    for field in ("predicted_zero", "actual_zero", "computed_gate", "computed_up", "computed_down"):
        assert_same(getattr(trace, field), getattr(want_trace, field), f"trace {field}", case)
    assert trace.summary() == want_trace.summary()
    if PIPELINES[pipeline].deterministic:
        assert_same(to_host(got), want, f"SparseMLP {pipeline}", case)
    else:
        _, h3 = case.h1_h3()
        assert within_down_bound(to_host(got), h3, case.w_down.T).all(), f"SparseMLP {pipeline} out of bound ({case})"


@pytest.mark.parametrize("pipeline", [p for p in PIPELINES if PIPELINES[p].deterministic])
def test_deterministic_pipelines_repeat_bit_for_bit(pipeline):
    case = build_case(5120, 1031, np.float16, 1000, 7, "fatrelu:0.01", ())
    case.assert_nontrivial()
    mlp = _mlp(case, pipeline)
    runs = [to_host(mlp(case.x)) for _ in range(5)]
    assert np.abs(runs[0]).max() > 0
    for r in runs[1:]:
        assert_same(r, runs[0], f"{pipeline} repeated run", case)


def test_nan_in_x_is_a_one_line_error():
    case = build_case(33, 97, np.float32, 1000, 3, "relu", ())
    x = case.x.copy()
    x[5] = np.nan
    with pytest.raises(SparseInferError, match="x contains NaN at index 5"):
        _mlp(case)(x)


def test_with_pipeline_shares_the_weights_and_runs_its_own_pipeline():
    case = build_case(97, 600, np.float16, 1000, 11, "relu", ())
    case.assert_nontrivial()
    fused = _mlp(case, "sparse-fused")
    for name in PIPELINES:
        other = fused.with_pipeline(name)
        assert other.pipeline is PIPELINES[name] and fused.pipeline is PIPELINES["sparse-fused"]
        assert other.w_gate is fused.w_gate and other.w_down_t is fused.w_down_t and other.w_signs is fused.w_signs
        got = to_host(other(case.x))
        if PIPELINES[name].deterministic:
            assert_same(got, to_host(_mlp(case, name)(case.x)), f"with_pipeline({name})", case)
        else:                # atomicAdd order differs between runs on a GPU
            assert within_down_bound(got, case.h1_h3()[1], case.w_down.T).all(), f"with_pipeline({name}) ({case})"
    with pytest.raises(SparseInferError, match="unknown pipeline 'nope'"):
        fused.with_pipeline("nope")


@pytest.mark.parametrize("dtype", WEIGHT_DTYPES, ids=lambda t: np.dtype(t).name)
def test_batched_loads_cover_whole_batches_a_remainder_and_a_scalar_tail(dtype):
    """d 2091: every lane adds whole batches of 8 chunks, some lanes one more chunk, one lane
    the 3-element tail (fp16/bf16: 261 chunks of 8, fp32: 522 of 4), in the contract's order."""
    case = build_case(2091, 65, dtype, 1000, 13, "relu", ())
    case.assert_nontrivial()
    mlp = _mlp(case, "sparse-persistent")
    x = cupy().asarray(case.x)
    h1, h3, zero = GATE_UP["v4_persistent"].run(mlp, x, ops.pack_x_signs(x), case.alpha_milli)
    want_h1, want_h3 = case.h1_h3()
    assert_same(to_host(zero).astype(bool), case.predicted_zero, "v4_persistent zero mask", case)
    assert_same(to_host(h1), want_h1, "v4_persistent h1", case)
    assert_same(to_host(h3), want_h3, "v4_persistent h3", case)
    want = mlp_sparse(case.x, case.w_gate, case.w_up, case.w_down, case.activation, 1.0)[0]
    assert_same(to_host(mlp(case.x)), want, "sparse-persistent out", case)


@pytest.mark.parametrize("pipeline", list(PIPELINES))
def test_graph_replays_every_pipeline_on_new_inputs(pipeline):
    """Three layers (two shapes, one a clone) recorded once, replayed on two sets of inputs:
    each replay equals the eager calls on the same inputs (bits, or the atomic bound), so the
    recording read the static inputs, not the values it was recorded with."""
    cases_ = [build_case(97, 600, np.float16, 1000, 21, "relu", ()),
              build_case(300, 1031, np.float32, 1050, 22, "fatrelu:0.01", ())]
    for c in cases_:
        c.assert_nontrivial()
    first = [_mlp(c, pipeline) for c in cases_]
    mlps = [first[0], first[1], first[0].clone()]
    assert mlps[2].w_gate.data is not mlps[0].w_gate.data and mlps[2].w_signs is not mlps[0].w_signs
    layer_cases = [cases_[0], cases_[1], cases_[0]]
    alpha = 1.05                     # one alpha for the whole recording; cases' own alphas differ
    graph = MLPGraph(mlps, alpha)
    rng = np.random.default_rng(5)
    for round_ in range(2):
        xs = [c.x if round_ == 0 else (c.x * rng.choice([-1.0, 1.0], c.d)).astype(np.float32) for c in layer_cases]
        outs = [to_host(o).copy() for o in graph(xs)]
        for i, (m, c, x, got) in enumerate(zip(mlps, layer_cases, xs, outs)):
            what = f"graph {pipeline} round {round_} layer {i}"
            if PIPELINES[pipeline].deterministic:
                want = to_host(m(x, alpha))
                assert np.abs(want).max() > 0
                assert_same(got, want, what, c)
            else:
                sparse = mlp_sparse(x, c.w_gate, c.w_up, c.w_down, c.activation, alpha)[1].predicted_zero
                h3 = expected_h1_h3(x, c.w_gate, c.w_up, c.activation, sparse)[1]
                assert within_down_bound(got, h3, c.w_down.T).all(), what
    # layers 0 and 2 hold the same weights: the same inputs give the same outputs
    if PIPELINES[pipeline].deterministic:
        graph([cases_[0].x, cases_[1].x, cases_[0].x])
        assert_same(to_host(graph.outs[2]), to_host(graph.outs[0]), f"graph {pipeline} clone", cases_[0])
    with pytest.raises(SparseInferError, match="MLPGraph of 3 layers got 2 inputs"):
        graph(xs[:2])
    with pytest.raises(SparseInferError, match="x has shape"):
        graph([cases_[1].x, cases_[1].x, cases_[0].x])


@pytest.mark.parametrize("pipeline", list(PIPELINES))
def test_misaligned_vectors_take_the_scalar_path_and_give_the_same_bits(pipeline):
    """x (and h3 for the down projections) as a contiguous view 4 bytes past an allocation:
    the 16-byte loads must not be used on it (a GPU faults on a misaligned address; the
    emulator reports one), and the results are the same bits as from an aligned copy."""
    cp = cupy()
    case = build_case(1031, 300, np.float16, 1000, 17, "relu", ())
    case.assert_nontrivial()
    mlp = _mlp(case, pipeline)

    def shifted(v):
        buf = cp.zeros(v.size + 1, dtype=cp.float32)
        buf[1:] = cp.asarray(v)
        return buf[1:]

    x = shifted(case.x)
    address = x.data.ptr if hasattr(x.data, "ptr") else x.ctypes.data     # CuPy, or the emulator's NumPy
    assert address % 16 == 4
    want = mlp(case.x)
    got = mlp(x)
    if PIPELINES[pipeline].deterministic:
        assert_same(to_host(got), to_host(want), f"{pipeline} on a misaligned x", case)
    else:
        assert within_down_bound(to_host(got), case.h1_h3()[1], case.w_down.T).all(), f"{pipeline} ({case})"
    h3 = case.h1_h3()[1]
    for version in DOWN:
        if not DOWN[version].deterministic:
            continue
        want = to_host(DOWN[version].run(cp.asarray(h3), mlp.w_down_t))
        assert_same(to_host(DOWN[version].run(shifted(h3), mlp.w_down_t)), want, f"down {version} misaligned h3", case)
