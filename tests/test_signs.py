"""Sign packing, negative-product counts and the eq. 2 predictor against naive definitions."""
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sparseinfer.reference import (SparseInferError, alpha_to_milli, negative_product_counts, pack_signs,
                                   predict_zero_rows, words_per_row)
from sparseinfer.reference.dtypes import BFLOAT16

from sparseinfer.kernels.shapes import TAIL_DS

FLOATS = st.floats(allow_nan=False, allow_infinity=True, width=32)
SPECIALS = st.sampled_from([0.0, -0.0, 1e-45, -1e-45, np.inf, -np.inf, 1.0, -1.0])


def _cast(a, dtype):
    with np.errstate(over="ignore"):  # float32 -> float16 overflow becomes +-inf, still a sign
        return a.astype(dtype)


def _arrays(dtype, shape):
    if dtype == np.int8:
        return hnp.arrays(np.int8, shape)
    elems = st.one_of(FLOATS, SPECIALS)
    return hnp.arrays(np.float32, shape, elements=elems).map(lambda a: _cast(a, dtype))


def _naive_bit(words, j):
    return (int(words[j // 32]) >> (j % 32)) & 1


@pytest.mark.parametrize("dtype", [np.float32, np.float16, BFLOAT16, np.int8], ids=str)
@given(data=st.data(), d=st.one_of(st.sampled_from(TAIL_DS), st.integers(1, 200)))
def test_pack_signs_matches_elementwise_sign(dtype, data, d):
    a = data.draw(_arrays(dtype, (3, d)))
    words = pack_signs(a)
    assert words.dtype == np.uint32 and words.shape == (3, words_per_row(d))
    for r in range(3):
        for j in range(words_per_row(d) * 32):
            expected = int(j < d and bool(a[r, j] < 0))  # padding bits are 0; -0.0 packs as 0
            assert _naive_bit(words[r], j) == expected, (r, j, a[r, j] if j < d else "pad")


def test_negative_zero_packs_as_positive_and_bit_order_is_lsb_first():
    a = np.array([-0.0, -1.0, 0.0, 2.0] + [1.0] * 28 + [-3.0], dtype=np.float32)
    words = pack_signs(a)
    assert words.tolist() == [0b10, 0b1]


def test_pack_signs_rejects_nan_with_its_index():
    a = np.zeros((2, 40), dtype=np.float16)
    a[1, 33] = np.nan
    with pytest.raises(ValueError, match=r"NaN at index \(1, 33\)"):
        pack_signs(a)


def test_pack_signs_rejects_unsupported_dtype():
    with pytest.raises(SparseInferError, match="dtype float64"):
        pack_signs(np.zeros(4))


@given(d=st.integers(1, 300), k=st.integers(1, 20), seed=st.integers(0, 2**32 - 1))
def test_counts_equal_naive_count(d, k, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, d)).astype(np.float32)
    x = rng.standard_normal(d).astype(np.float32)
    counts = negative_product_counts(pack_signs(w), pack_signs(x), d)
    naive = ((w < 0) != (x < 0)).sum(axis=1)
    assert counts.dtype == np.int32
    np.testing.assert_array_equal(counts, naive)


def test_counts_ignore_padding_bits():
    d = 33
    rng = np.random.default_rng(0)
    w = pack_signs(rng.standard_normal((5, d)).astype(np.float32))
    x = pack_signs(rng.standard_normal(d).astype(np.float32))
    dirty = w.copy()
    dirty[:, -1] |= np.uint32(0xFFFFFFFE)  # garbage in the 31 padding bits
    np.testing.assert_array_equal(negative_product_counts(dirty, x, d), negative_product_counts(w, x, d))


def test_counts_reject_mismatched_word_count():
    with pytest.raises(SparseInferError, match=r"ceil\(d/32\) = 2"):
        negative_product_counts(np.zeros((3, 3), np.uint32), np.zeros(2, np.uint32), 40)


@given(d=st.integers(1, 400), seed=st.integers(0, 2**32 - 1),
       alpha_milli=st.integers(900, 1100))
def test_predictor_is_eq2_in_exact_arithmetic(d, seed, alpha_milli):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((64, d)).astype(np.float16)
    x = rng.standard_normal(d).astype(np.float32)
    mask = predict_zero_rows(pack_signs(w), pack_signs(x), d, alpha_milli / 1000)
    n_neg = ((w < 0) != (x < 0)).sum(axis=1)
    alpha = Fraction(alpha_milli, 1000)
    expected = [alpha * (d - n) < n for n in n_neg]
    assert mask.tolist() == expected


@given(seed=st.integers(0, 2**32 - 1), a1=st.integers(900, 1100), a2=st.integers(900, 1100))
def test_raising_alpha_never_adds_a_zero_row(seed, a1, a2):
    lo, hi = sorted((a1, a2))
    rng = np.random.default_rng(seed)
    d = 128
    w = pack_signs(rng.standard_normal((500, d)).astype(np.float32))
    x = pack_signs(rng.standard_normal(d).astype(np.float32))
    m_lo = predict_zero_rows(w, x, d, lo / 1000)
    m_hi = predict_zero_rows(w, x, d, hi / 1000)
    assume(m_lo.any())
    assert not (m_hi & ~m_lo).any()


def test_ties_are_kept_at_alpha_one():
    # N_neg == N_pos: 1000 * N_neg > 1000 * N_pos is false, the row is computed
    d = 64
    w = np.ones((1, d), np.float32)
    x = np.concatenate([np.ones(32), -np.ones(32)]).astype(np.float32)
    assert not predict_zero_rows(pack_signs(w), pack_signs(x), d, 1.0)[0]
    assert predict_zero_rows(pack_signs(w), pack_signs(x), d, 0.999)[0]


def test_alpha_to_milli_is_exact_and_checked():
    assert alpha_to_milli(1.03) == 1030 and alpha_to_milli(1.0) == 1000 and alpha_to_milli(0.999) == 999
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(SparseInferError):
            alpha_to_milli(bad)
