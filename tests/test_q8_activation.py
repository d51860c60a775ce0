"""Int8 activations (accuracy level 4): reference/q8_activation.py's quantization and row dot
products against their definitions (the op's kernels against them: test_block_quant_cpu.py and
test_op_library_quant.py)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseinfer.reference import block_quant as bq
from sparseinfer.reference import order_contract as oc
from sparseinfer.reference import q8_activation as q8
from sparseinfer.reference.activations import Activation
from sparseinfer.reference.errors import SparseInferError
from sparseinfer.reference.quant_mlp import QuantizedMLPWeights, mlp_dense_quant, mlp_sparse_quant

from helpers import assert_bits_equal, raises_one_line

F32 = np.float32
formats = st.sampled_from(list(bq.FORMATS))
seeds = st.integers(0, 2**31 - 1)


def scaled_x(rng, d: int) -> np.ndarray:
    """Blocks of widely different magnitudes (one all zero), a few exact zeros."""
    x = (rng.standard_normal(d) * np.exp2(rng.integers(-20, 10, d // 32)).repeat(32)).astype(F32)
    x[rng.random(d) < 0.05] = 0
    x[:32] = 0 if d > 32 else x[:32]
    return x


# --- the reference ---------------------------------------------------------------------------

@given(blocks=st.integers(1, 20), seed=seeds)
def test_quantized_x_is_within_half_a_step(blocks, seed):
    rng = np.random.default_rng(seed)
    x = scaled_x(rng, 32 * blocks)
    codes, scales = q8.quantize_activation(x)
    xb, cb = x.reshape(-1, 32).astype(np.float64), codes.reshape(-1, 32).astype(np.float64)
    assert np.all(np.abs(cb) <= 127)
    amax = np.abs(xb).max(axis=1)
    assert np.array_equal(scales, (amax / 127).astype(F32))
    # each code is the nearest step (ties: either), and the block's largest element takes +-127
    err = np.abs(xb - cb * scales[:, None].astype(np.float64))
    assert np.all(err <= scales[:, None] * (0.5 + 2.0 ** -20))
    live = amax > 0
    assert np.all(np.abs(cb[live]).max(axis=1) == 127)
    assert not cb[~live].any()


def test_quantize_activation_rounds_ties_to_even_and_clamps_subnormal_scales():
    x = np.zeros(64, F32)
    x[0], x[1], x[2] = 127.0, 2.5, -0.5         # s = 1: 2.5 -> 2, -0.5 -> -0 (ties to even)
    x[32] = np.float32(2.0 ** -140)             # s subnormal: x / s exceeds 127 before the clamp
    x[33] = -x[32]
    codes, scales = q8.quantize_activation(x)
    assert scales[0] == 1 and list(codes[:3]) == [127, 2, 0]
    assert 0 < scales[1] < np.finfo(F32).tiny and codes[32] == 127 and codes[33] == -127


def test_non_finite_x_is_refused_with_its_index():
    x = np.ones(64, F32)
    x[40] = np.inf
    raises_one_line(lambda: q8.quantize_activation(x), "x[40] = inf", "finite", error=SparseInferError)


@settings(max_examples=40, deadline=None)
@given(fmt=formats, blocks=st.integers(1, 20), rows=st.integers(1, 6), seed=seeds)
def test_row_dots_are_the_exact_sum_within_float32_roundings(fmt, blocks, rows, seed):
    """Against an independent float64 sum of every weight (D c + M, unrounded) times every
    dequantized x code: the 16-lane float32 order may differ from it only by its roundings, at
    most 4 a group's term (q4_1), d / 64 lane additions and the 4 of the butterfly, relative to
    the sum of the terms' magnitudes (|D c| + |M| a weight: q4_1's two parts are rounded apart),
    plus an absolute 2^-149 a rounding for results that underflow."""
    rng = np.random.default_rng(seed)
    d = 32 * blocks
    w = rng.standard_normal((rows, d)).astype(F32) * F32(rng.uniform(0.01, 10))
    blocks_ = bq.quantize(w, fmt)
    codes, scales = q8.quantize_activation(scaled_x(rng, d))
    x_deq = codes.astype(np.float64) * np.repeat(scales.astype(np.float64), 32)
    dw, mw, c = (None if a is None else a.astype(np.float64) for a in bq.fields_and_codes(blocks_, fmt, d))
    scaled = (dw[..., None] * c).reshape(rows, d)
    lo = 0.0 if mw is None else np.repeat(mw, 32, axis=1)
    got = q8.q8_row_dots(blocks_, fmt, d, codes, scales)
    magnitude = ((np.abs(scaled) + np.abs(lo)) * np.abs(x_deq)).sum(axis=1)
    roundings = 4 + d // 64 + 4
    bound = oc.rigorous_error_bound(magnitude, roundings) + roundings * d * 2.0 ** -149
    assert np.all(np.abs(got.astype(np.float64) - (scaled + lo) @ x_deq) <= bound)


def test_int8_activations_change_the_mlp_a_little_not_nothing():
    rng = np.random.default_rng(3)
    d, k = 256, 300
    weights = QuantizedMLPWeights.quantize(*(rng.standard_normal(s, dtype=F32) for s in ((k, d), (k, d), (d, k))), "q4_0")
    x = rng.standard_normal(d).astype(F32)
    exact, int8 = mlp_dense_quant(x, weights, "relu"), mlp_dense_quant(x, weights, "relu", int8_activations=True)
    rel = np.linalg.norm(int8 - exact) / np.linalg.norm(exact)
    assert 0 < rel < 0.05
    sparse, _ = mlp_sparse_quant(x, weights, "relu", mode="oracle", int8_activations=True)
    assert_bits_equal(sparse, int8, "oracle sparse = dense, int8 activations")
