"""The op library's CUDA launcher (model_export/native/sparse_mlp_cuda.cu) on block-quantized
weights (Q8_0, Q4_0, Q4_1; W_down^T in the layer's format or in Q8_0), without a GPU.

The launcher's host code, built by g++ against kernels/cuda/cpu_emulation.h, runs quant.cu's
kernels on the CPU emulator (tests/native_cuda.py). One token equals
``mlp_sparse_quant(mode="predicted+actual")`` bit for bit, with its predicted, computed and
actual masks; several tokens, and one token of a dense call, equal ``mlp_dense_quant`` per
token. Cases come from tests/kernel_cases.py's ``quant_cases`` (d whole blocks, k with tails
and across the down projection's chunks of 512 rows, sign rows with their own stride and
garbage past the row, outputs and scratch starting as 0xFF bytes), each checked non-trivial.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent))

import native_cuda as nc  # noqa: E402
from helpers import assert_bits_equal  # noqa: E402
from kernel_cases import QuantCase, build_quant_case, quant_cases  # noqa: E402

from sparseinfer.reference.activations import Activation  # noqa: E402
from sparseinfer.reference.block_quant import FORMATS  # noqa: E402
from sparseinfer.reference.quant_mlp import QuantizedMLPWeights, mlp_dense_quant, mlp_sparse_quant  # noqa: E402
from sparseinfer.reference.signs import pack_signs  # noqa: E402

pytestmark = pytest.mark.emulated
FEW = settings().max_examples
INVALID_VALUE = 1                # cudaErrorInvalidValue


def padded_signs(weights: QuantizedMLPWeights, pad: int, seed: int) -> np.ndarray:
    """uint32 [k, d / 32 + pad]: the dequantized W_gate's sign words, then garbage words."""
    words = pack_signs(weights.dequantized()[0])
    rng = np.random.default_rng(seed)
    out = rng.integers(0, 2**32, (words.shape[0], words.shape[1] + pad), dtype=np.uint64).astype(np.uint32)
    out[:, :words.shape[1]] = words
    return out


def run(weights: QuantizedMLPWeights, x: np.ndarray, activation, alpha_milli: int, pad: int = 0, masks: bool = True,
        scratch_buf=None, **override) -> nc.Result:
    """One call on the layer's blocks; x is [n_tokens, d]; ``override``: fields of the arguments."""
    return nc.call(np.ascontiguousarray(x, dtype=np.float32), weights.gate, weights.up, weights.down_t,
                   padded_signs(weights, pad, alpha_milli), weights.d, weights.k, activation, alpha_milli,
                   weights.fmt.name, weights.down_fmt.name, masks=masks, scratch_buf=scratch_buf, override=override)


def check_decode(case: QuantCase, activation, pad: int = 0, masks: bool = True):
    return check_decode_on(case.weights, case.x, activation, case.alpha_milli, pad, masks, str(case))


def check_decode_on(w: QuantizedMLPWeights, x: np.ndarray, activation, alpha_milli: int, pad: int = 0,
                    masks: bool = True, case: str = ""):
    got = run(w, x[None], activation, alpha_milli, pad, masks=masks)
    assert got.rc == 0, f"{nc.error_text(got.rc)} ({case})"
    want, trace = mlp_sparse_quant(x, w, activation, alpha=alpha_milli / 1000, mode="predicted+actual",
                                   approximate=not Activation.parse(activation).sparse_capable)
    assert_bits_equal(got.out[0], want, "out", case)
    if masks:
        for name, mask in (("predicted_zero", trace.predicted_zero), ("computed", trace.computed_up),
                           ("actual_zero", trace.actual_zero)):
            np.testing.assert_array_equal(getattr(got, name), mask.astype(np.uint8), err_msg=f"{name} ({case})")
    return got, trace


def check_dense(weights: QuantizedMLPWeights, xs: np.ndarray, activation, **kw):
    """Every token of xs [n, d] is mlp_dense_quant's bits; the masks stay unwritten."""
    got = run(weights, xs, activation, 1000, **kw)
    assert got.rc == 0, nc.error_text(got.rc)
    for t in range(xs.shape[0]):
        assert_bits_equal(got.out[t], mlp_dense_quant(xs[t], weights, activation), f"out[token {t}]",
                          f"{weights.fmt.name}/{weights.down_fmt.name}")
    assert all((m == nc.UNWRITTEN).all() for m in (got.predicted_zero, got.computed, got.actual_zero))
    return got


def _other_tokens(x: np.ndarray, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([x] + [(x * rng.choice([-1, 1], x.size) * rng.uniform(0.5, 2, x.size)).astype(np.float32)
                           for _ in range(n - 1)])


@settings(max_examples=FEW)
@given(case=quant_cases(), pad=st.sampled_from([0, 1, 3, 30]), masks=st.booleans())
@example(case=build_quant_case(256, 513, np.float32, 1000, 7, "relu", (), "q4_0", "q8_0"), pad=30, masks=True)
@example(case=build_quant_case(96, 600, np.float32, 1040, 3, "fatrelu:0.01", ("neg_zero",), "q4_1"), pad=1,
         masks=True)
@example(case=build_quant_case(320, 129, np.float32, 960, 5, "relu", ("ties",), "q8_0"), pad=0, masks=False)
def test_one_token_on_blocks_is_the_sparse_reference_bit_for_bit(case, pad, masks):
    case.assert_nontrivial()
    check_decode(case, case.activation, pad, masks)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_silu_and_gelu_on_blocks_skip_the_predicted_rows_with_the_references_bits(fmt, activation):
    """No exact zeros: predicted rows are taken as zero (approximate); actual_zero marks a
    negative gate."""
    case = build_quant_case(320, 600, np.float32, 1000, 11, "relu", (), fmt, sparsity=0.5)
    _, trace = check_decode(case, activation)
    assert trace.predicted_zero.any() and (~trace.predicted_zero).any() and trace.actual_zero.any()


@settings(max_examples=FEW)
@given(case=quant_cases(), n_tokens=st.sampled_from([1, 2, 3]))
@example(case=build_quant_case(256, 513, np.float32, 1000, 9, "relu", (), "q4_0", "q8_0"), n_tokens=3)
def test_prefill_and_dense_calls_on_blocks_run_the_dense_reference(case, n_tokens):
    """n_tokens > 1 runs the dense pipeline token by token; one token needs dense = 1 (a dense
    node) and reads no sign words."""
    xs = _other_tokens(case.x, n_tokens, case.base.seed)
    check_dense(case.weights, xs, case.activation, **({"dense": 1, "w_signs": None} if n_tokens == 1 else {}))


def test_the_fixed_layer_tells_formats_and_thread_orders_apart():
    """A Q4_0 layer (Gaussian weights: the predictor skips live rows too) with W_down^T in Q8_0,
    with the emulator's threads in either order, gives the reference's bits; told W_down^T is
    Q4_0 (its blocks read as 18 bytes) the launcher gives other bits, and so does the dense call."""
    rng = np.random.default_rng(21)
    d, k = 256, 1100
    w = QuantizedMLPWeights.quantize(*(rng.standard_normal(s, dtype=np.float32) for s in ((k, d), (k, d), (d, k))),
                                     "q4_0", "q8_0")
    x = rng.standard_normal(d).astype(np.float32)
    for reverse in (False, True):
        with nc.emulation_order(reverse):
            got, trace = check_decode_on(w, x, "relu", 1000, pad=2, case=f"reverse={reverse}")
    assert (trace.predicted_zero & ~trace.actual_zero).any() and (~trace.predicted_zero & trace.actual_zero).any()
    misread = run(w, x[None], "relu", 1000, down_dtype=nc.WEIGHTS["q4_0"])
    assert misread.rc == 0 and (misread.out.view(np.uint32) != got.out.view(np.uint32)).any()
    dense = check_dense(w, x[None], "relu", dense=1)
    assert (dense.out.view(np.uint32) != got.out.view(np.uint32)).any()


def test_one_scratch_serves_block_and_float_calls_in_turn():
    """The scratch (never cleared) carries nothing from one call to the next: a Q4_1 token, a
    Q8_0 prefill, the Q4_1 token again."""
    a = build_quant_case(96, 600, np.float32, 1000, 31, "fatrelu:0.01", (), "q4_1")
    b = build_quant_case(96, 600, np.float32, 1000, 32, "relu", (), "q8_0")
    scratch = nc.poisoned(nc.emulated_library().sparseinfer_cuda_scratch_bytes(3, 96, 600), np.uint8)
    first, _ = check_decode(a, a.activation)
    run_a = run(a.weights, a.x[None], a.activation, a.alpha_milli, scratch_buf=scratch)
    assert_bits_equal(run_a.out[0], first.out[0], "q4_1 token, shared scratch")
    check_dense(b.weights, _other_tokens(b.x, 3, 5), "relu", scratch_buf=scratch)
    again = run(a.weights, a.x[None], a.activation, a.alpha_milli, scratch_buf=scratch)
    assert_bits_equal(again.out[0], first.out[0], "q4_1 token after a q8_0 prefill")


def test_invalid_block_arguments_are_refused_before_any_launch():
    """Part blocks (d not a multiple of 32), a float W_down^T beside block gate and up (or block
    W_down^T beside float ones), an unknown code, a bad dense flag: cudaErrorInvalidValue, every
    output untouched."""
    case = build_quant_case(64, 97, np.float32, 1000, 41, "relu", (), "q4_0")
    w = case.weights
    for override in (dict(d=48), dict(d=63), dict(down_dtype=nc.WEIGHTS["fp32"]), dict(down_dtype=nc.WEIGHTS["fp16"]),
                     dict(down_dtype=9), dict(weight_dtype=nc.WEIGHTS["fp32"], down_dtype=nc.WEIGHTS["q4_0"]),
                     dict(dense=3), dict(sign_stride=1)):
        got = run(w, case.x[None], "relu", 1000, **override)
        assert got.rc == INVALID_VALUE, override
        assert (got.out.view(np.uint8) == nc.UNWRITTEN).all() and (got.predicted_zero == nc.UNWRITTEN).all()
    assert set(nc.WEIGHTS) == {"fp32", "fp16", *FORMATS}
