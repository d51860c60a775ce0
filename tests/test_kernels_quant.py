"""The block-quantized kernels (kernels/cuda/quant.cu: Q8_0, Q4_0, Q4_1) against reference/quant_mlp.py,
on a GPU and on the CPU emulation of the kernels.

Sign words and masks exactly; h1, h3 and the output bit for bit, for every format (W_down^T in
the layer's format or in Q8_0), on shapes whose d is whole blocks (32 and 96 included) and whose
k has tails and crosses the down projection's chunks. Each case first asserts it is non-trivial.
As tests/test_kernels_gpu.py, every test runs once per backend: ``gpu`` (marker ``gpu``, skipped
where there is no device) and ``emulated`` (marker ``emulated``: the same sources built for the
CPU, skipped where g++ is missing).
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given

from kernel_cases import (BACKENDS, QUANT_SHAPES, assert_same, build_quant_case, mutated, on_backend, quant_cases,
                          to_host)
from sparseinfer.kernels import (DOWN_QUANT, FAMILIES, GATE_UP_QUANT, PACK_SIGNS_QUANT, QUANT_PIPELINES,
                                 DeviceBlocks, DeviceMatrix, QuantSparseMLP, ops, quant_ops)
from sparseinfer.kernels.device import cupy
from sparseinfer.reference import order_contract as oc
from sparseinfer.reference.block_quant import FORMATS
from sparseinfer.reference.errors import SparseInferError
from sparseinfer.reference.quant_mlp import QuantizedMLPWeights, mlp_dense_quant, mlp_sparse_quant
from sparseinfer.reference.signs import pack_signs


@pytest.fixture(scope="module", autouse=True, params=BACKENDS)
def backend(request):
    """gpu: skipped by conftest where there is no device; emulated: the kernels on the CPU."""
    with on_backend(request.param) as name:
        yield name


def _blocks(name, blocks, fmt, d):
    return DeviceBlocks.from_host(name, blocks, fmt, d)


@given(case=quant_cases())
def test_sign_words_of_blocks_match_the_dequantized_weights(case):
    for name, blocks, fmt in (("w_gate", case.weights.gate, case.fmt), ("w_down_t", case.weights.down_t,
                                                                          case.down_fmt)):
        want = pack_signs(case.weights.dequantized()[0 if name == "w_gate" else 2])
        assert want.any() and (want != 0xFFFFFFFF).any(), f"trivial sign words: {case}"
        got = PACK_SIGNS_QUANT[fmt]["v1"].run(_blocks(name, blocks, fmt, case.base.d))
        assert_same(to_host(got), want, f"pack_signs_{fmt} v1 {name}", case)


@pytest.mark.parametrize("version", list(GATE_UP_QUANT["q4_0"]))
@given(case=quant_cases())
def test_gate_up_versions_match_the_reference_bit_for_bit(version, case):
    case.assert_nontrivial()
    mlp = QuantSparseMLP(case.weights, case.activation)
    assert_same(to_host(mlp.w_signs), case.w_signs, "QuantSparseMLP sign words", case)
    x = cupy().asarray(case.x)
    h1, h3, zero = GATE_UP_QUANT[case.fmt][version].run(mlp, x, ops.pack_x_signs(x), case.alpha_milli)
    want_h1, want_h3 = case.h1_h3(sparse=version != "dense")
    assert_same(to_host(h1), want_h1, f"gate_up_{case.fmt} {version} h1", case)
    assert_same(to_host(h3), want_h3, f"gate_up_{case.fmt} {version} h3", case)
    if zero is not None:
        assert_same(to_host(zero).astype(bool), case.predicted_zero, f"gate_up_{case.fmt} {version} zero mask", case)


@pytest.mark.parametrize("version", list(DOWN_QUANT["q4_0"]))
@given(case=quant_cases())
def test_down_versions_match_the_reference_bit_for_bit(version, case):
    case.assert_nontrivial()
    _, h3 = case.h1_h3()
    w_down_t = case.weights.dequantized()[2]
    got = DOWN_QUANT[case.down_fmt][version].run(cupy().asarray(h3),
                                                 _blocks("w_down_t", case.weights.down_t, case.down_fmt, case.base.d))
    want = oc.down_projection(h3, w_down_t)
    assert np.abs(want).max() > 0
    assert_same(to_host(got), want, f"down_{case.down_fmt} {version}", case)


@pytest.mark.parametrize("kind", ["sparse", "dense"])
@given(case=quant_cases())
def test_quant_mlp_matches_the_reference(kind, case):
    case.assert_nontrivial()
    mlp = QuantSparseMLP(case.weights, case.activation, pipeline=f"{kind}-{case.fmt}")
    alpha = case.alpha_milli / 1000
    if kind == "dense":
        assert_same(to_host(mlp(case.x, alpha)), mlp_dense_quant(case.x, case.weights, case.activation),
                    f"dense-{case.fmt}", case)
        return
    want, want_trace = mlp_sparse_quant(case.x, case.weights, case.activation, alpha)
    got, trace = mlp(case.x, alpha, trace=True)
    for field in ("predicted_zero", "actual_zero", "computed_gate", "computed_up", "computed_down"):
        assert_same(getattr(trace, field), getattr(want_trace, field), f"trace {field}", case)
    assert trace.summary() == want_trace.summary()
    assert_same(to_host(got), want, f"sparse-{case.fmt}", case)


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("d,k", QUANT_SHAPES)
def test_every_format_at_every_shape(fmt, d, k):
    """Each format at each shape once (Hypothesis draws only some of these pairs): every pipeline's
    output and the paired kernel's h1 / h3, with W_down^T in Q8_0 beside 4-bit gate and up."""
    down_fmt = "q8_0" if fmt != "q8_0" else None
    case = build_quant_case(d, k, np.float16, 1000, d + k, "fatrelu:0.01", (), fmt, down_fmt)
    case.assert_nontrivial()
    mlp = QuantSparseMLP(case.weights, case.activation)
    assert_same(to_host(mlp(case.x)), mlp_sparse_quant(case.x, case.weights, case.activation)[0], f"sparse-{fmt}", case)
    dense = mlp.with_pipeline(f"dense-{fmt}")
    assert dense.w_gate is mlp.w_gate
    assert_same(to_host(dense(case.x)), mlp_dense_quant(case.x, case.weights, case.activation), f"dense-{fmt}", case)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_a_misaligned_x_gives_the_same_bits(fmt):
    """x 4 bytes past an allocation: the block kernels load x a float at a time, and the blocks' fields
    with 1- and 2-byte loads (blocks are 2-byte aligned), so every load stays aligned."""
    cp = cupy()
    case = build_quant_case(320, 129, np.float32, 1000, 5, "relu", (), fmt)
    case.assert_nontrivial()
    buf = cp.zeros(case.base.d + 1, dtype=cp.float32)
    buf[1:] = cp.asarray(case.x)
    x = buf[1:]
    address = x.data.ptr if hasattr(x.data, "ptr") else x.ctypes.data
    assert address % 16 == 4
    for pipeline in (f"sparse-{fmt}", f"dense-{fmt}"):
        mlp = QuantSparseMLP(case.weights, case.activation, pipeline=pipeline)
        assert_same(to_host(mlp(x)), to_host(mlp(case.x)), f"{pipeline} on a misaligned x", case)


# Changes to quant.cu that the bit-exact comparisons above must catch (the emulator builds the
# changed source; the GPU run has no such switch).
MUTATIONS = {
    "nibble halves swapped": ("q4_0", "e < 16 ? (byte & 15u) : (byte >> 4)", "e < 16 ? (byte >> 4) : (byte & 15u)"),
    "q4_1 min dropped": ("q4_1", "return HAS_MIN ? __fadd_rn(v, fp16_bits_to_float(m_bits)) : v;", "return v;"),
    "q4 down columns misplaced": ("q4_0", "4 * p + (v & 3) + 16 * (v >> 2)", "8 * p + v"),
    "products fused into the sums": ("q8_0", "acc_a = __fadd_rn(acc_a, __fmul_rn(lane_value<F>(wa[u], lane), xv[u]));",
                                     "acc_a = fmaf(lane_value<F>(wa[u], lane), xv[u], acc_a);"),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_a_changed_kernel_fails_the_comparison(mutation, backend):
    if backend != "emulated":
        pytest.skip("the emulator builds the changed source")
    fmt, old, new = MUTATIONS[mutation]
    case = build_quant_case(256, 513, np.float32, 1000, 9, "relu", ("subnormal",), fmt)
    case.assert_nontrivial()
    want = mlp_sparse_quant(case.x, case.weights, case.activation)[0]
    assert_same(to_host(QuantSparseMLP(case.weights, case.activation)(case.x)), want, "unchanged", case)
    with mutated("quant.cu", old, new):
        got = to_host(QuantSparseMLP(case.weights, case.activation)(case.x))
    assert not np.array_equal(got.view(np.uint32), want.view(np.uint32)), f"{mutation} went unnoticed"


def test_the_verifier_reports_a_changed_kernel(backend):
    """verify-kernels' rows for a format whose kernel changed say MISMATCH; the other formats' still verify."""
    if backend != "emulated":
        pytest.skip("the emulator builds the changed source")
    from sparseinfer.kernels.shapes import BenchShape
    from sparseinfer.kernels.verify import verify_case

    _, old, new = MUTATIONS["nibble halves swapped"]
    with mutated("quant.cu", old, new):
        rows = verify_case(BenchShape("prosparse-llama2-7b", 64, 97), 0.9, log=lambda s: None)
    failed = {(r["kernel"], r["version"]) for r in rows if not r["verified"]}
    nibbles = {(f"{step}_{fmt}", v) for fmt in ("q4_0", "q4_1") for step in ("pack_signs", "gate_up", "down")
               for v in FAMILIES[f"{step}_{fmt}"]} | {("mlp_quant", f"{kind}-{fmt}") for fmt in ("q4_0", "q4_1")
                                                      for kind in ("sparse", "dense")}
    assert failed == nibbles, failed                  # every 4-bit row; Q8_0's and the float kernels' verify


def test_bad_layers_and_arguments_are_one_line_errors():
    case = build_quant_case(64, 97, np.float32, 1000, 3, "relu", (), "q4_0")
    with pytest.raises(SparseInferError, match="QuantSparseMLP takes QuantizedMLPWeights, got tuple"):
        QuantSparseMLP(case.weights.dequantized(), "relu")
    with pytest.raises(SparseInferError, match=r"unknown pipeline 'sparse-q8_0' for q4_0 weights; expected one of "
                                               r"sparse-q4_0, dense-q4_0"):
        QuantSparseMLP(case.weights, "relu", pipeline="sparse-q8_0")
    with pytest.raises(SparseInferError, match="silu has no exact zeros"):
        QuantSparseMLP(case.weights, "silu")
    mlp = QuantSparseMLP(case.weights, "relu")
    with pytest.raises(SparseInferError, match="unknown pipeline 'sparse-batched' for q4_0 weights"):
        mlp.with_pipeline("sparse-batched")
    x = cupy().asarray(case.x)
    float_rows = DeviceMatrix.from_host("w", case.base.w_gate)
    with pytest.raises(SparseInferError, match="w_gate must be DeviceBlocks"):
        quant_ops.gate_up_mask(x, float_rows, mlp.w_up, "relu", launch=GATE_UP_QUANT["q4_0"]["dense"].launches[0])
    other = QuantizedMLPWeights.quantize(case.base.w_gate, case.base.w_up, case.base.w_down, "q4_1")
    with pytest.raises(SparseInferError, match=r"w_up \(97, 64\) q4_1 does not match w_gate \(97, 64\) q4_0"):
        quant_ops.gate_up_mask(x, mlp.w_gate, _blocks("w_up", other.up, "q4_1", 64), "relu",
                               launch=GATE_UP_QUANT["q4_0"]["dense"].launches[0])
    with pytest.raises(SparseInferError, match=r"x has shape \(32,\); expected \[64\]"):
        mlp(case.x[:32])
    with pytest.raises(SparseInferError, match=r"h3 has shape \(5,\); expected \[97\]"):
        DOWN_QUANT["q4_0"]["v1_chunks"].run(cupy().asarray(np.ones(5, np.float32)), mlp.w_down_t)
    bad = case.weights.gate.copy()
    bad[3, 18:20] = np.array([0x00, 0x7C], np.uint8)        # block 1 of row 3: fp16 scale +Inf
    with pytest.raises(SparseInferError, match="w_gate: q4_0 block 1 of row 3 .* has scale d = inf"):
        _blocks("w_gate", bad, "q4_0", 64)


def test_quant_pipelines_are_registered_per_format():
    assert set(QUANT_PIPELINES) == {f"{kind}-{fmt}" for kind in ("sparse", "dense") for fmt in FORMATS}
    assert all(p.deterministic and p.weights in FORMATS for p in QUANT_PIPELINES.values())
