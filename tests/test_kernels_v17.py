"""The memory-limit kernel versions on the CPU emulation: predict v4 (rows per warp), gate_up v6_paired (gate
and up loads in flight together), down v5_narrow (64-thread column tiles), pipeline
sparse-paired, and the strong dense baseline (dense-gemv).

The registry's property tests (tests/test_kernels_gpu.py) already run every new sparse
version bit for bit on both backends (``-m emulated -k v6_paired`` etc.); this file adds the
shapes that reach the new code paths (several load batches per lane, a partial last warp,
padded sign strides), mutants that the bit-exact checks must reject, and the baseline's
rigorous-bound checks, which the registry tests do not cover (it is not a sparse version).
"""
from __future__ import annotations

import numpy as np
import pytest

from kernel_cases import assert_same, build_case, emu, mutated  # noqa: F401 (emu: a fixture)
from sparseinfer.benchmarks import harness
from sparseinfer.kernels import (BASELINE, DOWN, GATE_UP, PACK_SIGNS, PIPELINES, PREDICT, SparseMLP, emulator, ops,
                                 sources, verify)
from sparseinfer.kernels.baseline_check import dense_mlp_verified, gate_up_within_bound
from sparseinfer.kernels.device import DeviceMatrix
from sparseinfer.kernels.expected import expected_h1_h3, within_down_bound
from sparseinfer.kernels.shapes import BenchShape
from sparseinfer.reference import mlp_sparse, order_contract as oc
from sparseinfer.reference.dtypes import BFLOAT16
from sparseinfer.reference.errors import SparseInferError
from sparseinfer.reference.signs import pack_signs

pytestmark = pytest.mark.emulated

NEW_SPARSE = {"predict": ["v4"], "gate_up": ["v6_paired"], "down": ["v5_narrow"], "mlp": ["sparse-paired"]}


def test_new_versions_are_in_the_registry_the_bench_and_the_traffic_model():
    assert set(NEW_SPARSE["predict"]) <= set(PREDICT) and set(NEW_SPARSE["gate_up"]) <= set(GATE_UP)
    assert set(NEW_SPARSE["down"]) <= set(DOWN) and "sparse-paired" in PIPELINES and "dense-gemv" in BASELINE
    assert all(GATE_UP[v].deterministic for v in NEW_SPARSE["gate_up"])
    assert all(DOWN[v].deterministic for v in NEW_SPARSE["down"]) and PIPELINES["sparse-paired"].deterministic
    assert not BASELINE["dense-gemv"].deterministic          # checked against the bound, not bit for bit
    targets = verify.bench_targets()
    for family, versions in NEW_SPARSE.items():
        assert all((family, v) in targets for v in versions)
    assert ("baseline", "dense-gemv") in targets
    d, k, rows = 5120, 13824, {"gate": 1100, "up": 1000, "down": 1000}

    def touched(version):
        return version.touched(d, k, "fp16", rows)
    # v6 reads the up row of every predicted-active row (1100), v5 only where h1 != 0 (1000)
    assert touched(GATE_UP["v6_paired"]) - touched(GATE_UP["v5_batched"]) == 100 * d * 2
    assert touched(DOWN["v5_narrow"]) == touched(DOWN["v4_batched"])
    assert touched(PREDICT["v4"]) == touched(PREDICT["v1"])
    assert touched(PIPELINES["sparse-paired"]) == touched(PACK_SIGNS["v1"]) + touched(GATE_UP["v6_paired"]) + touched(
        DOWN["v5_narrow"])
    assert touched(BASELINE["dense-gemv"]) == 3 * k * d * 2 + 2 * d * 4 + 3 * k * 4


# --- predict v4 ----------------------------------------------------------------------------

@pytest.mark.parametrize("d,k", [(5120, 37), (8200, 9), (300, 130), (33, 5), (4096, 4)])
@pytest.mark.parametrize("pad_words", [0, 3])
def test_predict_v4_counts_every_row_with_any_stride(emu, d, k, pad_words):
    """d 8200: 64 whole quads = two batches of 5 per lane plus a tail word; d 300: every other
    row unaligned when the stride is odd; k 37, 9, 5: the last warp's rows partly past k."""
    case = build_case(d, k, np.float16, 1000, seed=d + k, activation="relu", features=(), sparsity=0.5)
    words = pack_signs(case.w_gate)
    padded = np.zeros((k, words.shape[1] + pad_words), np.uint32)
    padded[:, :words.shape[1]] = words
    padded[:, words.shape[1]:] = 0xFFFFFFFF                 # words past ceil(d/32) must not be read
    cp = emu
    counts, zero = cp.empty(k, dtype=np.int32), cp.empty(k, dtype=np.uint8)
    launch = emulator.kernel("predict_rows_multi")
    grid = (-(-k // (sources.PREDICT_ROWS_PER_WARP * 8)),)
    launch(grid, (256,), (cp.asarray(padded), np.int64(padded.shape[1]), cp.asarray(pack_signs(case.x)),
                          np.int32(k), np.int32(d), np.int32(1000), counts, zero))
    assert_same(np.asarray(counts), case.counts, "predict v4 counts", case)
    assert_same(np.asarray(zero).astype(bool), case.predicted_zero, "predict v4 zero", case)


# --- gate_up v6 and down v5 at shapes with several batches ------------------------------------

@pytest.mark.parametrize("d,k,dtype", [(5120, 64, np.float16), (2091, 40, np.float32), (4096, 33, BFLOAT16),
                                       (97, 600, np.float16)])
@pytest.mark.parametrize("activation", ["relu", "fatrelu:0.01"])
def test_paired_pipeline_bit_for_bit(emu, d, k, dtype, activation):
    """d 5120 fp16: 20 chunks per lane = batches of 6, 6, 6, 2; d 2091 fp32: 522 whole chunks
    (16 or 17 per lane) and a scalar tail of 3; k 600: two down chunks, one partial."""
    case = build_case(d, k, dtype, 1000, seed=7, activation=activation, features=("neg_zero", "subnormal"),
                      sparsity=0.5)
    case.assert_nontrivial()
    mlp = SparseMLP(case.w_gate, case.w_up, case.w_down, activation, pipeline="sparse-paired")
    x = emu.asarray(case.x)
    h1, h3, zero, out = mlp.steps(x, 1000)
    want_h1, want_h3 = case.h1_h3()
    assert_same(np.asarray(h1), want_h1, "v6_paired h1", case)
    assert_same(np.asarray(h3), want_h3, "v6_paired h3", case)
    assert_same(np.asarray(zero).astype(bool), case.predicted_zero, "v6_paired zero", case)
    want_out, _ = mlp_sparse(case.x, case.w_gate, case.w_up, case.w_down, activation, 1.0)
    assert_same(np.asarray(out), want_out, "sparse-paired out", case)
    assert_same(np.asarray(DOWN["v5_narrow"].run(h3, mlp.w_down_t)),
                oc.down_projection(want_h3, np.ascontiguousarray(case.w_down.T)), "down v5_narrow", case)


MUTANTS = [
    # v6: the up row's chunks of a batch added last-to-first (the sum's order changes)
    ("gate_up", "common.cuh", "if (c + u * WARP_SIZE < n_vec) chunk_pair_dot_add<T>(acc_a, acc_b, wa[u], wb[u], x, "
                              "(c + u * WARP_SIZE) * V);",
     "if (c + (U - 1 - u) * WARP_SIZE < n_vec) chunk_pair_dot_add<T>(acc_a, acc_b, wa[U - 1 - u], wb[U - 1 - u], x, "
     "(c + (U - 1 - u) * WARP_SIZE) * V);"),
    # v6 (common.cuh: store_paired_row): h3 written even where h1 == 0 (+AS broken: h3 = 0 * h2 can be -0)
    ("gate_up", "common.cuh", "h3[row] = a != 0.0f ? __fmul_rn(a, z_up) : 0.0f;", "h3[row] = __fmul_rn(a, z_up);"),
    # v5: column slots laid out with DOWN_THREADS instead of the narrow tile
    ("down", "down.cu", "const int col0 = (blockIdx.x * TILE + ct) * V;",
     "const int col0 = (blockIdx.x * DOWN_THREADS + ct) * V;"),
]


@pytest.mark.parametrize("family,header,old,new", MUTANTS, ids=["v6-order", "v6-plus-as", "v5-tile"])
def test_bit_exact_checks_reject_mutants(emu, family, header, old, new):
    act = "fatrelu:0.01"
    case = build_case(2091, 40, np.float32, 1000, seed=3, activation=act, features=(), sparsity=0.5)
    # neuron 0: tiny gate weights with x's signs (no negative products: predicted active), its
    # gate below fatrelu's threshold so h1 = 0 (+AS), and up products all negative (0 * h2 = -0)
    case.w_gate[0] = np.copysign(np.float32(1e-6), case.x)
    case.w_up[0] = -np.abs(case.w_up[0]) * np.sign(case.x)
    assert not case.predicted_zero[0] and case.h1_h3()[0][0] == 0
    mlp = SparseMLP(case.w_gate, case.w_up, case.w_down, act, pipeline="sparse-paired")
    x = emu.asarray(case.x)

    def run():
        if family == "gate_up":
            _, h3, _ = GATE_UP["v6_paired"].run(mlp, x, ops.pack_x_signs(x), 1000)
            return np.asarray(h3), case.h1_h3()[1]
        h3 = case.h1_h3()[1]
        got = DOWN["v5_narrow"].run(emu.asarray(h3), mlp.w_down_t)
        return np.asarray(got), oc.down_projection(h3, np.ascontiguousarray(case.w_down.T))

    got, want = run()
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    with mutated(header, old, new):
        got, want = run()
    assert not np.array_equal(got.view(np.uint32), want.view(np.uint32)), "the mutant passed the bit-exact check"


# --- the strong dense baseline -------------------------------------------------------------

@pytest.mark.parametrize("d,k", [(1, 37), (31, 64), (97, 600), (300, 129), (5120, 48)])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, BFLOAT16])
@pytest.mark.parametrize("activation", ["relu", "fatrelu:0.01"])
def test_dense_gemv_within_the_rigorous_bound(emu, d, k, dtype, activation):
    case = build_case(d, k, dtype, 1000, seed=d * k, activation=activation, features=("subnormal",), sparsity=0.5)
    wg, wu, wd = (DeviceMatrix.from_host(n, w) for n, w in (("g", case.w_gate), ("u", case.w_up), ("w", case.w_down)))
    h1, h3, out = (np.asarray(a) for a in BASELINE["dense-gemv"].run(emu.asarray(case.x), wg, wu, wd, activation))
    w_down_t = np.ascontiguousarray(case.w_down.T)
    assert dense_mlp_verified(h1, h3, out, case.x, case.w_gate, case.w_up, w_down_t, activation)
    # today's kernel keeps the contract's order in each gate and up dot product: the dense bits
    want_h1, want_h3 = expected_h1_h3(case.x, case.w_gate, case.w_up, activation)
    assert_same(h1, want_h1, "dense-gemv h1", case)
    assert_same(h3, want_h3, "dense-gemv h3", case)
    # the bound is tight enough to reject a wrong result: one product dropped from one output
    # (the largest term of output 0), or one 16-byte chunk of an up row left out of h3
    j = 0
    terms = np.asarray(h3, np.float64) * w_down_t[:, j].astype(np.float64)
    i = int(np.argmax(np.abs(terms)))
    if abs(terms[i]) > 0:
        wrong = out.copy()
        wrong[j] = np.float32(out[j] - terms[i])
        assert not within_down_bound(wrong, h3, w_down_t)[j]
    n = int(np.argmax(np.abs(h3)))
    if h3[n] != 0:
        terms = case.w_up[n].astype(np.float64) * case.x
        chunks = np.add.reduceat(terms, np.arange(0, d, oc.vector_width(dtype)))
        bad = h3.copy()
        bad[n] = np.float32(h1[n] * (terms.sum() - chunks[np.argmax(np.abs(chunks))]))
        assert not gate_up_within_bound(h1, bad, case.x, case.w_gate, case.w_up, activation)[n]


def test_gate_up_bound_accepts_either_side_of_the_threshold_only_when_the_exact_value_is_that_close():
    x = np.ones(4, np.float32)
    w = np.array([[0.01, 0.0, 0.0, 0.0], [0.5, 0.0, 0.0, 0.0]], np.float32)   # exact gates 0.01 (at t) and 0.5
    u = np.array([[1.0, 0.0, 0.0, 0.0]] * 2, np.float32)                      # exact up values 1
    act = "fatrelu:0.01"
    ok = gate_up_within_bound(np.array([0.0, 0.5], np.float32), np.array([0.0, 0.5], np.float32), x, w, u, act)
    assert ok.tolist() == [True, True]             # 0.01 sits on the threshold: 0 is a valid float32 outcome
    ok = gate_up_within_bound(np.array([0.01, 0.0], np.float32), np.array([0.01, 0.0], np.float32), x, w, u, act)
    assert ok.tolist() == [True, False]            # 0.5 is far above it: 0 is wrong


def test_dense_gemv_checks_its_arguments(emu):
    g = DeviceMatrix.from_host("g", np.ones((8, 16), np.float16))
    x = emu.asarray(np.ones(16, np.float32))
    with pytest.raises(SparseInferError, match=r"w_down has shape \(8, 16\); expected 8 columns"):
        BASELINE["dense-gemv"].run(x, g, g, g, "relu")                # W_down^T given for W_down
    short = DeviceMatrix.from_host("w", np.ones((4, 8), np.float16))
    with pytest.raises(SparseInferError, match=r"w_down has shape \(4, 8\) fp16; expected \[d, k\] = \(16, 8\)"):
        BASELINE["dense-gemv"].run(x, g, g, short, "relu")
    with pytest.raises(SparseInferError, match="unknown activation 'swish'"):
        BASELINE["dense-gemv"].run(x, g, g, DeviceMatrix.from_host("w", np.ones((16, 8), np.float16)), "swish")


def test_bench_case_has_the_strong_dense_row_and_the_best_dense_ratio(emu):
    shape = BenchShape("prosparse-llama2-13b", 97, 600)
    rows = verify.verify_case(shape, 0.9, log=lambda s: None)
    assert {(r["kernel"], r["version"]) for r in rows} == set(verify.bench_targets())
    assert all(r["verified"] for r in rows), [r for r in rows if not r["verified"]]


def test_best_dense_is_the_faster_verified_dense_row():
    def row(kernel, version, us, verified=True, cublas=100.0):
        return {"kernel": kernel, "version": version, "verified": verified, "latency_us": us,
                "dense_baseline_us": cublas}

    rows = [row("mlp", "sparse-batched", 20.0), row("baseline", "dense-gemv", 80.0), row("down", "v1_chunks", 5.0),
            {"kernel": "mlp", "version": "sparse-fused", "verified": False, "error": "boom"}]
    harness.add_best_dense(rows)
    assert rows[0] | {} == {**rows[0], "strong_dense_us": 80.0, "best_dense_us": 80.0, "best_dense": "dense-gemv",
                            "speedup_vs_best_dense": 4.0}
    assert "best_dense_us" not in rows[2] and "best_dense_us" not in rows[3]
    slow = [row("mlp", "sparse-batched", 20.0), row("baseline", "dense-gemv", 120.0)]
    harness.add_best_dense(slow)
    assert (slow[0]["best_dense"], slow[0]["speedup_vs_best_dense"]) == ("cublas", 5.0)
    unverified = [row("mlp", "sparse-batched", 20.0), row("baseline", "dense-gemv", 10.0, verified=False)]
    harness.add_best_dense(unverified)
    assert unverified[0]["strong_dense_us"] is None and unverified[0]["best_dense"] == "cublas"
