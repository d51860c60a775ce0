"""The neuron-major layout and the fused gate+up+down kernel, on the CPU emulation.

The registry's property tests (tests/test_kernels_gpu.py) already run the new pipelines
(sparse-neuron-major, fused, fused-neuron-major) bit for bit on both backends; this file
adds the layout transform against the reference's matrices, shapes that reach the fused
kernel's paths (one part, a partial last chunk, several parts per block, tails of d), its
self-resetting counters, mutants the bit-exact checks must reject, and its argument checks.
"""
from __future__ import annotations

import numpy as np
import pytest

from kernel_cases import assert_same, build_case, emu, mutated  # noqa: F401 (emu: a fixture)
from sparseinfer.benchmarks import harness
from sparseinfer.kernels import DOWN, GATE_UP, MLP_FUSED, PACK_SIGNS, PIPELINES, SparseMLP, layout, ops, traffic, verify
from sparseinfer.kernels.device import DeviceMatrix, padded_rows
from sparseinfer.kernels.registry import LAYOUTS
from sparseinfer.kernels.shapes import BenchShape
from sparseinfer.reference import mlp_sparse, order_contract as oc
from sparseinfer.reference.dtypes import BFLOAT16
from sparseinfer.reference.errors import SparseInferError

pytestmark = pytest.mark.emulated

NEW_PIPELINES = ("sparse-neuron-major", "fused", "fused-neuron-major")


def test_new_pipelines_are_registered_and_benchmarked():
    assert all(PIPELINES[p].deterministic for p in NEW_PIPELINES) and "v1" in MLP_FUSED
    assert {PIPELINES[p].layout for p in PIPELINES} == set(LAYOUTS)
    assert all(PIPELINES[p].fused in ("", *MLP_FUSED) for p in PIPELINES)
    assert {("mlp", p) for p in NEW_PIPELINES} <= set(verify.bench_targets())


@pytest.mark.parametrize("d,k,dtype", [(33, 5, np.float32), (97, 600, np.float16), (300, 129, BFLOAT16)])
def test_neuron_major_records_hold_each_neurons_three_rows(d, k, dtype):
    case = build_case(d, k, dtype, 1000, seed=d, activation="relu", features=(), sparsity=0.5)
    records = layout.neuron_major(case.w_gate, case.w_up, case.w_down)
    ld = padded_rows(case.w_gate).shape[1]
    assert records.shape == (k, 3, ld) and (ld * records.itemsize) % 16 == 0
    for r, want in enumerate((case.w_gate, case.w_up, case.w_down.T)):
        assert_same(records[:, r, :d], np.ascontiguousarray(want).view(records.dtype), f"record row {r}", case)
    assert not records[:, :, d:].any()                          # the padding is zero
    views = layout.record_views(records, case.dtype, d)
    for view, want in zip(views, (case.w_gate, case.w_up, case.w_down.T)):
        assert (view.rows, view.cols, view.ld) == (k, d, 3 * ld)
        assert np.array_equal(view.to_host().view(np.uint8), np.ascontiguousarray(want).view(np.uint8))


def test_the_device_records_equal_the_host_transform(emu):
    case = build_case(97, 600, np.float16, 1000, seed=4, activation="relu", features=(), sparsity=0.5)
    mlp = SparseMLP(case.w_gate, case.w_up, case.w_down, "relu", pipeline="fused-neuron-major")
    nm = mlp.in_layout("neuron-major")
    assert nm is mlp.with_pipeline("sparse-neuron-major").in_layout("neuron-major")      # built once per layer
    assert mlp.in_layout("row-major") is mlp and nm.w_gate is not mlp.w_gate
    want = layout.neuron_major(case.w_gate, case.w_up, case.w_down).reshape(-1)
    assert np.array_equal(np.asarray(nm.w_gate.data), want)
    assert mlp.clone().in_layout("neuron-major") is not nm                               # a clone: its own copy


def _check_fused(emu, case, pipeline):
    mlp = SparseMLP(case.w_gate, case.w_up, case.w_down, case.activation, pipeline=pipeline)
    h1, h3, zero, out = mlp.steps(emu.asarray(case.x), case.alpha_milli)
    want_h1, want_h3 = case.h1_h3()
    assert_same(np.asarray(zero).astype(bool), case.predicted_zero, f"{pipeline} zero", case)
    assert_same(np.asarray(h1), want_h1, f"{pipeline} h1", case)
    assert_same(np.asarray(h3), want_h3, f"{pipeline} h3", case)
    want, _ = mlp_sparse(case.x, case.w_gate, case.w_up, case.w_down, case.activation, case.alpha_milli / 1000)
    assert np.abs(want).max() > 0
    assert_same(np.asarray(out), want, f"{pipeline} out", case)
    return mlp


@pytest.mark.parametrize("pipeline", ["fused", "fused-neuron-major"])
@pytest.mark.parametrize("d,k,dtype", [
    (1, 37, np.float32),         # one part (k < 128), d = 1: no whole 16-byte chunk, one column
    (97, 600, np.float16),       # two chunks, the second partial: parts past k do nothing
    (300, 1031, BFLOAT16),       # 12 parts on 2 emulated resident blocks: 6 parts each, chunks finished by either
    (5120, 130, np.float16),     # 20 chunks per lane: gate and up batches of 6, 6, 6, 2; columns in 3 passes
    (2091, 200, np.float32),     # 522 whole chunks and a scalar tail of 3; columns past d in the last pass
])
def test_fused_pipelines_bit_for_bit(emu, pipeline, d, k, dtype):
    case = build_case(d, k, dtype, 1000, seed=d + k, activation="fatrelu:0.01", features=("neg_zero", "subnormal"),
                      sparsity=0.5)
    case.assert_nontrivial()
    _check_fused(emu, case, pipeline)


def test_fused_counters_reset_for_the_next_call(emu):
    """The counters live across calls (one buffer per chunk count): a second call, and a call
    of another layer with the same chunk count, finish their chunks with the right partials."""
    a = build_case(300, 1031, np.float32, 1000, seed=1, activation="relu", features=(), sparsity=0.5)
    b = build_case(97, 1100, np.float16, 1050, seed=2, activation="fatrelu:0.01", features=(), sparsity=0.9)
    assert ops.fused_parts(a.k)[0] == ops.fused_parts(b.k)[0] == 3
    mlp = _check_fused(emu, a, "fused-neuron-major")
    _check_fused(emu, b, "fused")
    first = np.asarray(mlp.steps(emu.asarray(a.x), 1000)[3]).copy()
    assert_same(np.asarray(mlp.steps(emu.asarray(a.x), 1000)[3]), first, "second call", a)


FUSED_MUTANTS = [
    # the in-order sums of partials: rows 1 and 2 swapped (((p0 + p2) + p1) + ...)
    ("if (r0 + u < n) v[u] = __ldcg(col + u * stride);",
     "if (r0 + u < n) v[u] = __ldcg(col + (r0 + 2 < n && (u == 1 || u == 2) ? 3 - u : u) * stride);"),
    # a chunk's last sub-chunk sum left out
    ("block_sum_rows_in_order(q + (i64)chunk * DOWN_SUB_CHUNKS * d, DOWN_SUB_CHUNKS, d,",
     "block_sum_rows_in_order(q + (i64)chunk * DOWN_SUB_CHUNKS * d, DOWN_SUB_CHUNKS - 1, d,"),
    # the last chunk's partial left out
    ("block_sum_rows_in_order(partial, n_chunks, d, out);", "block_sum_rows_in_order(partial, n_chunks - 1, d, out);"),
    # the chunk counter left set: the next call's chunks finish too early or never
    ("done[chunk] = 0u;", ";"),
    # +AS broken: h3 = fl(h1 * h2) where h1 == 0 (a -0 h3 where the up products are negative)
    ("h = a != 0.0f ? __fmul_rn(a, z_up) : 0.0f;", "h = __fmul_rn(a, z_up);"),
    # no barrier between the warps writing the part's h3 and the block listing its rows
    ("__syncthreads();                            // the part's h3 written (read back below)", ";"),
]


@pytest.mark.parametrize("old,new", FUSED_MUTANTS, ids=["sum-order", "sub-dropped", "chunk-dropped", "no-reset", "plus-as", "no-barrier"])
def test_bit_exact_checks_reject_fused_mutants(emu, old, new):
    act = "fatrelu:0.01"
    case = build_case(300, 1031, np.float32, 1000, seed=3, activation=act, features=(), sparsity=0.5)
    # neuron 0: predicted active, its gate below fatrelu's threshold (h1 = 0), up products all negative
    case.w_gate[0] = np.copysign(np.float32(1e-6), case.x)
    case.w_up[0] = -np.abs(case.w_up[0]) * np.sign(case.x)
    assert not case.predicted_zero[0] and case.h1_h3()[0][0] == 0
    want, _ = mlp_sparse(case.x, case.w_gate, case.w_up, case.w_down, act, 1.0)
    want_h3 = case.h1_h3()[1]

    def same_twice():
        mlp = SparseMLP(case.w_gate, case.w_up, case.w_down, act, pipeline="fused-neuron-major")
        runs = [mlp.steps(emu.asarray(case.x), 1000) for _ in range(2)]
        return all(np.array_equal(np.asarray(r[3]).view(np.uint32), want.view(np.uint32))
                   and np.array_equal(np.asarray(r[1]).view(np.uint32), want_h3.view(np.uint32)) for r in runs)

    assert same_twice()
    try:
        with mutated("fused.cu", old, new):
            assert not same_twice(), "the mutant passed the bit-exact check"
    finally:
        ops._COUNTERS.clear()          # a mutant may leave its counters set


def test_fused_checks_its_arguments(emu):
    case = build_case(33, 97, np.float16, 1000, seed=1, activation="relu", features=(), sparsity=0.5)
    mlp = SparseMLP(case.w_gate, case.w_up, case.w_down, "relu", pipeline="fused")
    x = emu.asarray(case.x)
    xs = ops.pack_x_signs(x)
    nm = mlp.in_layout("neuron-major")
    launch = MLP_FUSED["v1"].launches[0]
    with pytest.raises(SparseInferError, match=r"w_down_t \(97, 33\) fp16 \(row stride 120\) does not match w_gate "
                                               r"\(97, 33\) fp16 \(row stride 40\)"):
        ops.mlp_fused(x, xs, mlp.w_signs, mlp.w_gate, mlp.w_up, nm.w_down_t, "relu", 1000, launch=launch)
    with pytest.raises(SparseInferError, match=r"w_down_t has shape \(97, 16\); expected 33 columns"):
        ops.mlp_fused(x, xs, mlp.w_signs, mlp.w_gate, mlp.w_up,
                      DeviceMatrix.from_host("w", np.ones((97, 16), np.float16)), "relu", 1000, launch=launch)
    with pytest.raises(SparseInferError, match="w_signs has 96 rows but w_gate has 97"):
        ops.mlp_fused(x, xs, mlp.w_signs[:96], mlp.w_gate, mlp.w_up, mlp.w_down_t, "relu", 1000, launch=launch)


def test_fused_bytes_add_the_per_part_sums(emu):
    d, k = 5120, 13824
    assert ops.fused_parts(k) == (27, 108)
    assert traffic.fused_scratch(d, k) == 2 * 108 * d * 4
    case = harness.BenchCase(BenchShape("prosparse-llama2-13b", 97, 600), 0.9, None, log=lambda s: None)
    rows = case.trace.rows
    split = sum(v.touched(97, 600, "fp16", rows) for v in (PACK_SIGNS["v1"], GATE_UP["v6_paired"], DOWN["v5_narrow"]))
    assert case.pipeline_bytes(PIPELINES["sparse-neuron-major"]) == split
    assert case.pipeline_bytes(PIPELINES["fused-neuron-major"]) == split + 2 * 8 * 97 * 4
    assert oc.DOWN_ROW_CHUNK // oc.DOWN_SUB_CHUNKS == 128         # PART_ROWS of fused.cu
