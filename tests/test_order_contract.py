"""The vectorised order-contract emulation against a literal, scalar transcription of it."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sparseinfer.reference import order_contract as oc

from helpers import WEIGHT_DTYPES, assert_bits_equal
from sparseinfer.kernels.shapes import TAIL_DS

F32 = np.float32


def scalar_warp_dot(w_row, x):
    """One row, lane by lane, element by element, exactly as order_contract.py's docstring reads."""
    d = len(x)
    v_width = oc.vector_width(w_row.dtype)
    lanes = [F32(0.0)] * oc.WARP_SIZE
    t = 0
    while t * oc.WARP_SIZE * v_width < d:
        for lane in range(oc.WARP_SIZE):
            for v in range(v_width):
                j = (t * oc.WARP_SIZE + lane) * v_width + v
                if j < d:
                    lanes[lane] = F32(lanes[lane] + F32(F32(w_row[j]) * x[j]))
        t += 1
    for offset in oc.BUTTERFLY_OFFSETS:
        lanes = [F32(lanes[lane] + lanes[lane ^ offset]) for lane in range(oc.WARP_SIZE)]
    assert len({float(v) for v in lanes}) == 1 or any(np.isnan(lanes))  # all lanes agree
    return lanes[0]


def scalar_block_dot(w_row, x):
    """One row of dequantized block weights (V = 1), as the contract's block section reads:
    lane l adds w[32 t + l] * x[32 t + l] for t = 0, 1, ...; then the butterfly."""
    lanes = [F32(0.0)] * 32
    for t in range(len(x) // 32):
        for lane in range(32):
            j = 32 * t + lane
            lanes[lane] = F32(lanes[lane] + F32(w_row[j] * x[j]))
    for offset in (16, 8, 4, 2, 1):
        lanes = [F32(lanes[lane] + lanes[lane ^ offset]) for lane in range(32)]
    return lanes[0]


def scalar_down(h3, w_t, chunk, sub_chunks):
    k, d = w_t.shape
    sub = chunk // sub_chunks
    out = np.zeros(d, F32)
    for j in range(d):
        total = F32(0.0)
        for c0 in range(0, k, chunk):
            partial = F32(0.0)
            for s0 in range(c0, c0 + chunk, sub):
                q = F32(0.0)
                for i in range(s0, min(s0 + sub, k)):
                    if h3[i] != 0:
                        q = F32(q + F32(h3[i] * F32(w_t[i, j])))
                partial = F32(partial + q)
            total = F32(total + partial)
        out[j] = total
    return out


def _widely_scaled(rng, shape):
    # mixed magnitudes make the order visible in the low bits
    return (rng.standard_normal(shape) * np.exp2(rng.integers(-8, 8, shape))).astype(F32)


@pytest.mark.parametrize("dtype", WEIGHT_DTYPES, ids=lambda t: np.dtype(t).name)
@given(d=st.one_of(st.sampled_from(TAIL_DS), st.integers(1, 600)), seed=st.integers(0, 2**32 - 1))
def test_warp_dot_rows_equals_scalar_transcription(dtype, d, seed):
    rng = np.random.default_rng(seed)
    w = _widely_scaled(rng, (3, d)).astype(dtype)
    x = _widely_scaled(rng, d)
    got = oc.warp_dot_rows(w, x)
    want = np.array([scalar_warp_dot(w[i], x) for i in range(3)], F32)
    assert_bits_equal(got, want, "warp_dot_rows", f"d={d} dtype={np.dtype(dtype).name} seed={seed}")


@given(blocks=st.integers(1, 20), seed=st.integers(0, 2**32 - 1))
def test_block_order_equals_scalar_transcription(blocks, seed):
    rng = np.random.default_rng(seed)
    w = _widely_scaled(rng, (3, 32 * blocks))
    x = _widely_scaled(rng, 32 * blocks)
    got = oc.warp_dot_rows(w, x, v_width=oc.BLOCK_VECTOR_WIDTH)
    want = np.array([scalar_block_dot(w[i], x) for i in range(3)], F32)
    assert_bits_equal(got, want, "warp_dot_rows, V = 1", f"blocks={blocks} seed={seed}")


def test_block_order_differs_from_the_fp32_order():
    """V = 1 and V = 4 are different orders: on this data they give other bits for most rows,
    so which one a kernel follows is checked, not assumed."""
    assert oc.BLOCK_VECTOR_WIDTH == 1
    rng = np.random.default_rng(9)
    w = _widely_scaled(rng, (64, 4096))
    x = _widely_scaled(rng, 4096)
    v1 = oc.warp_dot_rows(w, x, v_width=oc.BLOCK_VECTOR_WIDTH)
    v4 = oc.warp_dot_rows(w, x)
    assert np.array_equal(v4, oc.warp_dot_rows(w, x, v_width=4))
    assert (v1 != v4).sum() > 32
    np.testing.assert_allclose(v1, oc.exact_rows(w, x), rtol=1e-3, atol=1e-3 * np.abs(oc.exact_rows(w, x)).max())


def test_order_is_not_plain_sequential():
    """The contract's order really differs from a left-to-right sum on some data (it is not vacuous)."""
    rng = np.random.default_rng(7)
    differs = 0
    for _ in range(20):
        w = _widely_scaled(rng, (1, 1000))
        x = _widely_scaled(rng, 1000)
        seq = F32(0)
        for j in range(1000):
            seq = F32(seq + F32(w[0, j] * x[j]))
        differs += oc.warp_dot_rows(w, x)[0] != seq
    assert differs > 0


@pytest.mark.parametrize("chunk,sub_chunks", [(1, 1), (7, 1), (64, 4), (12, 3), (oc.DOWN_ROW_CHUNK, oc.DOWN_SUB_CHUNKS)])
@given(k=st.integers(1, 1100), d=st.integers(1, 12), density=st.floats(0.0, 1.0),
       seed=st.integers(0, 2**32 - 1))
def test_down_projection_equals_scalar_transcription(chunk, sub_chunks, k, d, density, seed):
    rng = np.random.default_rng(seed)
    h3 = np.where(rng.random(k) < density, _widely_scaled(rng, k), F32(0)).astype(F32)
    w_t = _widely_scaled(rng, (k, d)).astype(np.float16)
    assert_bits_equal(oc.down_projection(h3, w_t, chunk, sub_chunks), scalar_down(h3, w_t, chunk, sub_chunks),
                      "down_projection", f"k={k} d={d} chunk={chunk}/{sub_chunks} seed={seed}")


def test_skipping_zero_rows_is_bit_identical_to_adding_them():
    """Why a sparse kernel equals dense on the true zero set: 0 * w adds nothing."""
    rng = np.random.default_rng(3)
    k, d = 700, 50
    h3 = _widely_scaled(rng, k)
    h3[rng.random(k) < 0.9] = 0
    h3[::7] = -0.0
    w_t = _widely_scaled(rng, (k, d))
    # dense transcription that adds every row, zero or not
    chunk, sub = oc.DOWN_ROW_CHUNK, oc.DOWN_ROW_CHUNK // oc.DOWN_SUB_CHUNKS
    out = np.zeros(d, F32)
    for c0 in range(0, k, chunk):
        partial = np.zeros(d, F32)
        for s0 in range(c0, c0 + chunk, sub):
            q = np.zeros(d, F32)
            for i in range(s0, min(s0 + sub, k)):
                q = q + h3[i] * w_t[i]
            partial = partial + q
        out = out + partial
    assert (h3 == 0).sum() > 0 and (h3 != 0).sum() > 0
    assert_bits_equal(oc.down_projection(h3, w_t), out, "down_projection vs dense")


@given(n=st.integers(1, 3000), seed=st.integers(0, 2**32 - 1))
def test_error_bound_covers_any_order(n, seed):
    """A random-order and a pairwise float32 sum both stay within gamma_n * sum|terms| of exact."""
    rng = np.random.default_rng(seed)
    a = _widely_scaled(rng, n)
    b = _widely_scaled(rng, n)
    terms = (a * b).astype(F32)  # products rounded once
    exact = a.astype(np.float64) @ b.astype(np.float64)
    bound = oc.rigorous_error_bound(np.abs(a.astype(np.float64) * b.astype(np.float64)).sum(), n)
    shuffled = F32(0)
    for t in rng.permutation(terms):
        shuffled = F32(shuffled + t)
    pairwise = terms.sum(dtype=F32)
    assert abs(float(shuffled) - exact) <= bound
    assert abs(float(pairwise) - exact) <= bound


def test_down_projection_error_bound_is_tight_enough_to_catch_a_dropped_row():
    rng = np.random.default_rng(5)
    k, d = 4000, 64
    h3 = rng.standard_normal(k).astype(F32)
    w_t = rng.standard_normal((k, d)).astype(F32)
    ref = oc.down_projection(h3, w_t)
    bound = oc.down_projection_error_bound(h3, w_t)
    exact = h3.astype(np.float64) @ w_t.astype(np.float64)
    assert np.all(np.abs(ref - exact) <= bound)
    dropped = h3.copy()
    dropped[123] = 0
    wrong = oc.down_projection(dropped, w_t)
    assert np.any(np.abs(wrong - exact) > bound)


def test_contract_constants():
    """Changing these changes the contract the kernels are checked against: do it deliberately."""
    assert oc.WARP_SIZE == 32 and oc.BUTTERFLY_OFFSETS == (16, 8, 4, 2, 1)
    assert oc.DOWN_ROW_CHUNK % (oc.DOWN_SUB_CHUNKS * oc.WARP_SIZE) == 0  # kernels list rows by 32-row ballots


def test_vector_width_is_16_bytes():
    from sparseinfer.reference.dtypes import BFLOAT16
    assert [oc.vector_width(t) for t in (np.float32, np.float16, BFLOAT16)] == [4, 8, 8]


def _pinned_case():
    rng = np.random.default_rng(20261129)
    w = rng.standard_normal((37, 1100)).astype(F32)
    x = rng.standard_normal(1100).astype(F32)
    wt = rng.standard_normal((1300, 96)).astype(F32)
    h3 = rng.standard_normal(1300).astype(F32)
    h3[rng.random(1300) < 0.6] = 0
    return w, x, wt, h3


def _digest(a) -> str:
    import hashlib
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]


def test_the_contract_is_pinned_by_fixed_outputs():
    """The bits of the contract's row dot products and down projection on one fixed input,
    recorded on 2026-11-29: a change of the order (lanes, vector width, butterfly, chunk or
    sub-chunk sizes) changes them, so it cannot pass unnoticed. The same input in another
    chunking gives other bits, so the digests do pin the constants."""
    w, x, wt, h3 = _pinned_case()
    assert _digest(oc.warp_dot_rows(w, x)) == "2c8e46580d582410"
    assert _digest(oc.down_projection(h3, wt)) == "149518f1e1c8b677"
    assert _digest(oc.down_projection(h3, wt, row_chunk=256)) != "149518f1e1c8b677"
    assert _digest(oc.down_projection(h3, wt, sub_chunks=2)) != "149518f1e1c8b677"
