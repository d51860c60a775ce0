"""Constructed boundary cases: random data never lands exactly on an edge, so these put it there.

One construction (:func:`edge_case`) makes, row by row, gate dot products that are exactly
the activation's threshold, just below and just above it, and exactly +0.0 (every product
+-0.0, or the threshold's product cancelled), and x with exact +0.0 and -0.0 entries. Each
dot product is exact in any summation order (the threshold's product alone in lane 0's
chunks, every other lane's products cancelling in pairs within one chunk, or zero), so the
edge is the same for every implementation. Its sign bits put rows exactly on eq. 2's
boundary (N_neg = floor(d/2): kept; one more: predicted zero), with x's -0.0 entries under
both positive and negative weights, so a packer that read -0.0 as negative flips masks.

Checked on that data: every kernel version and pipeline (emulated, and with the ``gpu``
marker on a GPU), the op library's host kernel and the ONNX function bodies (h1 / h3 /
outputs bit for bit where the contract holds, masks exactly; relu's strict ``z > 0`` against
fatrelu's ``z >= T``, the sign of every zero), and every sign packer on x's signed zeros.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from kernel_cases import BACKENDS, assert_same, on_backend, to_host
from sparseinfer.kernels import BASELINE, DOWN, GATE_UP, PACK_SIGNS, PIPELINES, PREDICT, SparseMLP, emulator, ops
from sparseinfer.kernels.device import DeviceMatrix, cupy
from sparseinfer.kernels.expected import expected_h1_h3, within_down_bound
from sparseinfer.reference import mlp_dense, mlp_sparse, order_contract as oc
from sparseinfer.reference.activations import Activation
from sparseinfer.reference.dtypes import BFLOAT16, WEIGHT_DTYPES
from sparseinfer.reference.signs import negative_product_counts, pack_signs, zero_rows_from_counts

ALPHA_MILLI = 1000
# gate z of a row as a multiple of x[0] = T: at it, just below and above (exact in bf16 too),
# its negation, and zero through a +0.0 or a -0.0 weight (z = +0.0 either way)
GATE_FACTORS = (1.0, 1.0 - 2.0 ** -8, 1.0 + 2.0 ** -7, -1.0, 0.0, -0.0)
# (activation, T = x[0]): relu at 0 (z = +0.0 is dropped), fatrelu at its threshold (z = T is kept)
# and at a threshold of 0 or below it (z = +0.0 is kept: h1 = +0.0 from the kept branch)
EDGES = (("relu", 0.25), ("fatrelu:0.25", 0.25), ("fatrelu:0.01", float(np.float32(0.01))),
         ("fatrelu:0", 0.25), ("fatrelu:-0.25", -0.25))
SHAPES = ((64, 150), (97, 600), (300, 129))
_PAIR_X = np.array([1.0, -1.0, 0.5, -2.0], np.float32)
_SMALL = np.array([1.0, -1.0, 0.5, -0.5, 2.0, -0.25], np.float32)


@dataclass
class EdgeCase:
    d: int
    k: int
    dtype: np.dtype
    activation: str
    x: np.ndarray
    w_gate: np.ndarray
    w_up: np.ndarray
    w_down: np.ndarray
    z: np.ndarray              # the gate dot products (float32), the same in any summation order

    def __str__(self):
        return f"edge case d={self.d} k={self.k} dtype={np.dtype(self.dtype).name} act={self.activation}"

    @property
    def alpha_milli(self):
        return ALPHA_MILLI

    @property
    def counts(self):
        return negative_product_counts(pack_signs(self.w_gate), pack_signs(self.x), self.d)

    @property
    def predicted_zero(self):
        return zero_rows_from_counts(self.counts, self.d, ALPHA_MILLI)

    def h1_h3(self, sparse=True):
        return expected_h1_h3(self.x, self.w_gate, self.w_up, self.activation, self.predicted_zero if sparse else None)


def edge_case(d: int, k: int, dtype, activation: str, threshold: float, seed: int = 0) -> EdgeCase:
    """See the module's docstring. Element j lies in chunk c = j // V, which lane c % 32 adds."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    v = oc.vector_width(dtype)
    chunk = np.arange(d) // v
    lane0 = chunk % oc.WARP_SIZE == 0
    first_of_chunk = np.arange(d) % v == 0
    pair_a = ~lane0 & first_of_chunk & (np.arange(d) + 1 < np.minimum((chunk + 1) * v, d))
    pair_b = np.roll(pair_a, 1)                           # the next element, same chunk
    x = np.zeros(d, np.float32)
    x[0] = threshold
    x[pair_a] = rng.choice(_PAIR_X, int(pair_a.sum()))
    x[pair_b] = x[pair_a]
    rest = ~(pair_a | pair_b) & (np.arange(d) > 0)        # zero products: x = +-0 or w = +-0
    rest_idx = np.flatnonzero(rest)
    kinds = np.arange(rest_idx.size) % 4                  # x +0.0, x -0.0 (weights steer signs), x != 0 (w +-0)
    x[rest_idx[kinds == 0]] = 0.0
    x[rest_idx[kinds == 1]] = -0.0
    x[rest_idx[kinds >= 2]] = rng.choice(_SMALL, int((kinds >= 2).sum()))
    steer = rest_idx[kinds <= 1]                          # x = +-0.0: a weight's sign moves N_neg, not z

    w = np.zeros((k, d), np.float32)
    w[:, rest_idx[kinds >= 2]] = np.where(rng.random((k, int((kinds >= 2).sum()))) < 0.5, -0.0, 0.0)
    w[:, pair_a] = rng.choice(_SMALL, (k, int(pair_a.sum())))
    w[:, pair_b] = -w[:, pair_a]                          # each pair cancels: its lane ends at +0.0
    w[:, 0] = np.resize(GATE_FACTORS, k)
    w[:, steer] = np.abs(rng.choice(_SMALL, (k, steer.size)))
    # eq. 2 at alpha 1: N_neg = floor(d/2) is kept, one more is predicted zero; a third of the
    # rows each, the last third left as they come
    n_neg = negative_product_counts(pack_signs(w), pack_signs(x), d)
    targets = np.where(np.arange(k) % 3 == 2, n_neg, d // 2 + np.arange(k) % 3)
    for i in range(k):
        flip = targets[i] - n_neg[i]
        assert 0 <= flip <= steer.size, f"cannot steer row {i} to {targets[i]} negative products"
        w[i, rng.permutation(steer)[:flip]] *= -1
    w_gate = w.astype(dtype)
    w_up = rng.choice(_SMALL, (k, d)).astype(dtype)
    w_up[:, 0] = 0                                        # h2 exact in any order (no T)
    w_down = rng.choice(_SMALL, (d, k)).astype(dtype)
    z = w_gate[:, 0].astype(np.float32) * x[0] + np.float32(0.0)    # one rounding, and a sum from +0.0
    return EdgeCase(d, k, dtype, activation, x, w_gate, w_up, w_down, z)


def test_the_edge_case_sits_on_every_edge():
    """The construction itself: exact z in any order at the threshold, below, above and +0.0;
    rows on both sides of eq. 2's boundary; x's -0.0 under weights of both signs."""
    for act, t in EDGES:
        case = edge_case(97, 600, np.float16, act, t)
        thr = Activation.parse(act).threshold if act != "relu" else 0.0
        z32 = oc.warp_dot_rows(case.w_gate, case.x)
        backwards = np.zeros(case.k, np.float32)                                # another order: last to first
        for j in range(case.d - 1, -1, -1):
            backwards += case.w_gate[:, j].astype(np.float32) * case.x[j]
        assert np.array_equal(z32, case.z) and np.array_equal(backwards, case.z)  # exact in either order
        assert (case.z == thr).any() and (case.z < thr).any() and (case.z > thr).any()
        assert not np.signbit(oc.warp_dot_rows(case.w_gate, case.x)[case.z == 0]).any()    # +0.0, never -0.0
        counts, d = case.counts, case.d
        assert set(counts.tolist()) >= {d // 2, d // 2 + 1}
        zero = case.predicted_zero
        assert zero.any() and (~zero).any() and not zero[counts == d // 2].any() and zero[counts == d // 2 + 1].all()
        neg_zero = np.flatnonzero((case.x == 0) & np.signbit(case.x))
        # a packer reading -0.0 as negative would push a kept row on the boundary over it (a -0.0
        # under a positive weight) and pull a predicted-zero one back (under a negative weight)
        tie, over = counts == d // 2, counts == d // 2 + 1
        assert neg_zero.size and (case.w_gate[np.ix_(tie, neg_zero)] > 0).any(axis=1).all()
        assert (case.w_gate[np.ix_(over, neg_zero)] < 0).any(axis=1).all()
        h1, h3 = case.h1_h3()
        at = ~zero & (case.z == thr)                          # kept by fatrelu (h1 = T), dropped by relu
        assert at.any() and np.array_equal(h1[at].view(np.uint32),
                                           np.full(int(at.sum()), np.float32(thr)).view(np.uint32))
        below, above = ~zero & (case.z < thr), ~zero & (case.z > thr)
        assert below.any() and not h1[below].view(np.uint32).any()             # +0.0
        assert above.any() and np.array_equal(h1[above].view(np.uint32), case.z[above].view(np.uint32))
        _, h3_dense = case.h1_h3(sparse=False)
        assert (np.signbit(h3_dense) & (h3_dense == 0)).any()                   # dense h3 = +0 * (h2 < 0) = -0.0


def test_sign_packers_read_signed_zeros_as_positive():
    """The reference's packer on x's +-0.0 entries, against bits set by hand, and the export's
    64-bit words (model_export) on weights with +-0.0, against the reference's."""
    from sparseinfer.model_export.mlp_functions import pack_sign_words64

    x = np.array([0.0, -0.0, -1.0, 2.0, -0.0, -1e-40, 0.0, -3.0] * 5, np.float32)
    want = sum(1 << j for j in range(x.size) if x[j] < 0)
    assert int(pack_signs(x)[1]) << 32 | int(pack_signs(x)[0]) == want
    case = edge_case(300, 129, np.float32, "relu", 0.25)
    w = case.w_gate.copy()
    w[:, :5] = [0.0, -0.0, -1.0, -0.0, 1.0]
    words = pack_sign_words64(w)
    assert np.array_equal(words.view(np.uint32)[:, :pack_signs(w).shape[1]], pack_signs(w))
    assert (pack_signs(w)[:, 0] & 0b11111).tolist() == [0b00100] * w.shape[0]


# --- every kernel version, emulated (and on a GPU) ---------------------------------------------

@pytest.fixture(scope="module", params=BACKENDS)
def backend(request):
    """gpu: skipped by conftest where there is no device; emulated: the kernels on the CPU."""
    with on_backend(request.param) as name:
        yield name


def _cases():
    return [pytest.param(d, k, dt, act, t, id=f"{d}x{k}-{np.dtype(dt).name}-{act}")
            for (d, k), dt in zip(SHAPES, WEIGHT_DTYPES) for act, t in EDGES]


@pytest.mark.parametrize("d,k,dtype,act,t", _cases())
def test_every_kernel_version_on_the_edges(backend, d, k, dtype, act, t):
    case = edge_case(d, k, dtype, act, t, seed=d)
    cp = cupy()
    x = cp.asarray(case.x)
    x_signs = ops.pack_x_signs(x)
    assert_same(to_host(x_signs), pack_signs(case.x), "pack_x_signs", case)
    for version, v in PACK_SIGNS.items():
        assert_same(to_host(v.run(DeviceMatrix.from_host("w", case.w_gate))), pack_signs(case.w_gate),
                    f"pack_signs {version}", case)
    w_signs = cp.asarray(pack_signs(case.w_gate))
    for version, v in PREDICT.items():
        counts, zero, _, _ = v.run(w_signs, x_signs, d, ALPHA_MILLI)
        assert_same(to_host(counts), case.counts, f"predict {version} counts", case)
        assert_same(to_host(zero).astype(bool), case.predicted_zero, f"predict {version} zero", case)

    mlp = SparseMLP(case.w_gate, case.w_up, case.w_down, act)
    for version, v in GATE_UP.items():
        h1, h3, _ = v.run(mlp, x, x_signs, ALPHA_MILLI)
        want_h1, want_h3 = case.h1_h3(sparse=version != "dense")
        assert_same(to_host(h1), want_h1, f"gate_up {version} h1", case)
        assert_same(to_host(h3), want_h3, f"gate_up {version} h3", case)
    h1, h3, _ = (to_host(a) for a in BASELINE["dense-gemv"].run(
        x, mlp.w_gate, mlp.w_up, DeviceMatrix.from_host("w_down", case.w_down), act))
    want_h1, want_h3 = case.h1_h3(sparse=False)
    assert_same(h1, want_h1, "dense-gemv h1", case)
    assert_same(h3, want_h3, "dense-gemv h3", case)

    # the down projection on the dense h3 (its -0.0 entries skipped like +0.0), and on zeros only
    w_down_t = np.ascontiguousarray(case.w_down.T)
    for h3 in (want_h3, np.where(np.arange(k) % 2, np.float32(-0.0), np.float32(0.0))):
        want = oc.down_projection(h3, w_down_t)
        for version, v in DOWN.items():
            got = to_host(v.run(cp.asarray(h3), mlp.w_down_t))
            if v.deterministic or not h3.any():
                assert_same(got, want, f"down {version}", case)          # all-zero h3: out is +0.0, not -0.0
            else:
                assert within_down_bound(got, h3, w_down_t).all(), f"down {version} ({case})"

    want_sparse, trace = mlp_sparse(case.x, case.w_gate, case.w_up, case.w_down, act, ALPHA_MILLI / 1000)
    want_dense = mlp_dense(case.x, case.w_gate, case.w_up, case.w_down, act)
    for name, pipe in PIPELINES.items():
        got = to_host(mlp.with_pipeline(name)(case.x, ALPHA_MILLI / 1000))
        want = want_sparse if pipe.sparse else want_dense
        if pipe.deterministic:
            assert_same(got, want, f"pipeline {name}", case)
        else:
            assert within_down_bound(got, case.h1_h3()[1], w_down_t).all(), f"pipeline {name} ({case})"
    assert trace.computed_up.any() and (trace.computed_gate & ~trace.computed_up).any()


# --- the op library's host kernel and the ONNX function bodies -------------------------------

def _onnx_outputs(case, library: bool):
    from test_op_library import _mlp_model, _session

    from sparseinfer.model_export.mlp_functions import pack_sign_words64

    model = _mlp_model(case.w_gate, case.w_up, np.ascontiguousarray(case.w_down.T), pack_sign_words64(case.w_gate),
                       ALPHA_MILLI, Activation.parse(case.activation), outputs=4, function=not library)
    out, predicted, computed, actual = _session(model, library=library).run(None, {"x": case.x[None]})
    return out[0], predicted, computed, actual


def _check_onnx(case, library: bool):
    want, trace = mlp_sparse(case.x, case.w_gate, case.w_up, case.w_down, case.activation, ALPHA_MILLI / 1000)
    out, predicted, computed, actual = _onnx_outputs(case, library)
    what = "op library" if library else "ONNX function body"
    assert_same(predicted, trace.predicted_zero, f"{what} predicted_zero", case)
    assert_same(computed, trace.computed_up, f"{what} computed", case)
    assert_same(actual, trace.actual_zero, f"{what} actual_zero", case)
    assert trace.predicted_zero.any() and trace.computed_up.any() and (trace.computed_gate & ~trace.computed_up).any()
    if library:                       # the host kernel keeps the contract's order: the reference's bits
        assert_same(out, want, f"{what} out", case)
    else:                             # MatMul's order: within the bound of the reference's h3
        assert within_down_bound(out, case.h1_h3()[1], np.ascontiguousarray(case.w_down.T)).all(), what


@pytest.mark.native
@pytest.mark.parametrize("act,t", EDGES, ids=[a for a, _ in EDGES])
def test_op_library_host_kernel_on_the_edges(act, t):
    _check_onnx(edge_case(97, 600, np.float32, act, t), library=True)


# The bodies' MatMul adds in its own order (blocked, with FMA): only a dyadic T keeps every
# partial sum exact there, so fatrelu:0.01's edge is the kernels' and the host kernel's alone.
# Where fatrelu's threshold is 0 or below, a kept z = +0.0 gives h1 = +0.0: actually zero (h1 == 0)
# in the reference and in the bodies' actual_zero alike.
DYADIC_EDGES = [pytest.param(a, t, id=a) for a, t in EDGES if (t * 2**8).is_integer()]


@pytest.mark.parametrize("act,t", DYADIC_EDGES)
def test_onnx_function_bodies_on_the_edges(act, t):
    _check_onnx(edge_case(97, 600, np.float32, act, t), library=False)


EDGE_MUTANTS = [
    # fatrelu strict: z = T dropped
    ("activation.h", "if (kind == ACT_FATRELU) return z >= threshold ? z : 0.0f;",
     "if (kind == ACT_FATRELU) return z > threshold ? z : 0.0f;"),
    # the sign packer reading -0.0 as negative
    ("signs.cu", "__device__ __forceinline__ bool is_negative(float v) { return v < 0.0f; }",
     "__device__ __forceinline__ bool is_negative(float v) { return v < 0.0f || (v == 0.0f && 1.0f / v < 0.0f); }"),
]


@pytest.mark.emulated
@pytest.mark.parametrize("src,old,new", EDGE_MUTANTS, ids=["fatrelu-strict", "minus-zero-negative"])
def test_the_edge_cases_reject_mutants(src, old, new):
    """Each mutant changes what happens on an edge only: the edge case must reject it."""
    from kernel_cases import mutated

    if emulator.unavailable_reason():
        pytest.skip(emulator.unavailable_reason())
    case = edge_case(97, 600, np.float16, "fatrelu:0.25", 0.25)
    want, _ = mlp_sparse(case.x, case.w_gate, case.w_up, case.w_down, case.activation, 1.0)
    with emulator.installed():
        mlp = SparseMLP(case.w_gate, case.w_up, case.w_down, case.activation, pipeline="sparse-fused")
        assert_same(to_host(mlp(case.x)), want, "unmutated", case)
        with mutated(src, old, new):
            got = to_host(SparseMLP(case.w_gate, case.w_up, case.w_down, case.activation,
                                  pipeline="sparse-fused")(case.x))
        assert not np.array_equal(got.view(np.uint32), want.view(np.uint32)), "the mutant passed the edge case"
