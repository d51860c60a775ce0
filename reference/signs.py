"""The SparseInfer predictor: sign packing, XOR + popcount, and paper eq. 2.

Bit layout (the authors' released code, ggml-cuda.cu): bit ``j % 32`` of word ``j // 32``
holds the sign of element ``j`` (least significant bit first); a bit is 1 iff the element
is ``< 0``, so -0.0 packs as 0. Padding bits past ``d`` are 0.

Eq. 2 (paper Sec. III): row i is predicted zero when ``alpha * N_pos < N_neg``. α is held
as an exact integer in thousandths, ``alpha_milli = round(alpha * 1000)``, and the test is
``1000 * N_neg > alpha_milli * N_pos`` with ``N_pos = d - N_neg`` counted over the ``d``
real elements only (the released code counts padding as positive and holds α in
hundredths; thousandths is a superset).
"""
from __future__ import annotations

import math

import numpy as np

from .alpha import MAX_ALPHA_MILLI
from .dtypes import SIGN_PACK_DTYPES, check_dtype, check_no_nan
from .errors import SparseInferError

BITS_PER_WORD = 32
BYTES_PER_WORD = 4   # one uint32 sign word


def words_per_row(d: int) -> int:
    """Number of uint32 sign words for ``d`` elements: ceil(d / 32)."""
    return -(-int(d) // BITS_PER_WORD)


def pack_signs(a) -> np.ndarray:
    """Pack the sign bits of the last axis of ``a`` into uint32 words, shape (..., ceil(d/32))."""
    a = np.asarray(a)
    check_dtype("pack_signs input", a, SIGN_PACK_DTYPES)
    if a.ndim == 0 or a.shape[-1] == 0:
        raise SparseInferError(f"pack_signs needs a last axis of length >= 1, got shape {a.shape}")
    check_no_nan("pack_signs input", a)
    d = a.shape[-1]
    n_words = words_per_row(d)
    negative = a < 0
    if n_words * BITS_PER_WORD != d:
        pad = [(0, 0)] * (a.ndim - 1) + [(0, n_words * BITS_PER_WORD - d)]
        negative = np.pad(negative, pad)
    packed = np.packbits(negative, axis=-1, bitorder="little")  # (..., 4 * n_words) bytes
    return np.ascontiguousarray(packed).view("<u4").astype(np.uint32, copy=False)


def _check_words(name: str, words: np.ndarray, d: int) -> None:
    if words.dtype != np.uint32:
        raise SparseInferError(f"{name} has dtype {words.dtype}; expected uint32 sign words")
    if words.ndim == 0 or words.shape[-1] != words_per_row(d):
        raise SparseInferError(
            f"{name} has shape {words.shape}; expected last axis ceil(d/32) = {words_per_row(d)} for d = {d}")


def tail_mask(d: int) -> np.uint32:
    rem = d % BITS_PER_WORD
    return np.uint32(0xFFFFFFFF if rem == 0 else (1 << rem) - 1)


def negative_product_counts(w_signs, x_signs, d: int) -> np.ndarray:
    """N_neg per row: popcount(w_signs[i] XOR x_signs) over the ``d`` real elements, int32.

    ``w_signs``: (..., ceil(d/32)) uint32; ``x_signs``: (ceil(d/32),) uint32.
    """
    d = int(d)
    if d < 1:
        raise SparseInferError(f"d must be >= 1, got {d}")
    w_signs = np.asarray(w_signs)
    x_signs = np.asarray(x_signs)
    _check_words("w_signs", w_signs, d)
    _check_words("x_signs", x_signs, d)
    if x_signs.ndim != 1:
        raise SparseInferError(f"x_signs must be one vector of words, got shape {x_signs.shape}")
    xor = np.bitwise_xor(w_signs, x_signs)
    xor[..., -1] &= tail_mask(d)
    return np.bitwise_count(xor).sum(axis=-1, dtype=np.int32)


def alpha_to_milli(alpha: float) -> int:
    """α as an exact integer in thousandths (1.03 -> 1030), within 0.001..MAX_ALPHA_MILLI/1000
    so that eq. 2's integer arithmetic cannot overflow. A float between two thousandths (more
    than the binary representation error away) is an error, never rounded."""
    a = float(alpha)
    if not math.isfinite(a) or a <= 0:
        raise SparseInferError(f"alpha must be a finite number > 0, got {alpha!r}")
    milli = round(a * 1000)
    if not 1 <= milli <= MAX_ALPHA_MILLI:
        raise SparseInferError(f"alpha {alpha!r} is outside the supported range, 0.001 to {MAX_ALPHA_MILLI // 1000:,}")
    if abs(a * 1000 - milli) > 1e-6 * milli:
        raise SparseInferError(f"alpha {alpha!r} has more than 3 decimals (alpha is held in thousandths)")
    return int(milli)


def zero_rows_from_counts(n_neg, d: int, alpha_milli: int) -> np.ndarray:
    """Eq. 2 on integer counts: ``1000 * N_neg > alpha_milli * (d - N_neg)``."""
    n_neg = np.asarray(n_neg, dtype=np.int64)
    return 1000 * n_neg > int(alpha_milli) * (int(d) - n_neg)


def predict_zero_rows(w_signs, x_signs, d: int, alpha: float) -> np.ndarray:
    """Bool mask, True where the row is predicted zero (skippable) at conservativeness α."""
    counts = negative_product_counts(w_signs, x_signs, d)
    return zero_rows_from_counts(counts, d, alpha_to_milli(alpha))
