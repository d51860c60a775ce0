"""The op library on block-quantized weights (q8_0, q4_0, q4_1): SparseMLP nodes with
weight_format / down_format / dense, and BlockMatMul nodes, in onnxruntime sessions against
reference/quant_mlp.py and the V = 1 row order bit for bit; the counters against the
reference trace's rows; bad inputs as one-line errors naming the node."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from sparseinfer.model_export import op_library
from sparseinfer.model_export.mlp_functions import pack_sign_words64
from sparseinfer.model_export.onnx_builder import IR_VERSION, OPSET
from sparseinfer.model_export.op_library import BLOCK_MATMUL_TYPE, DOMAIN
from sparseinfer.reference import block_quant as bq
from sparseinfer.reference import mlp_dense
from sparseinfer.reference import order_contract as oc
from sparseinfer.reference.activations import Activation
from sparseinfer.reference.alpha import MAX_ALPHA_MILLI
from sparseinfer.reference.quant_mlp import QuantizedMLPWeights, mlp_dense_quant, mlp_sparse_quant

from helpers import assert_bits_equal, raises_one_line
from test_op_library import _mlp_model, _session

pytestmark = pytest.mark.native

F32 = np.float32
NODE = "SparseMLP node 'layer/SparseMLP'"
MATMUL_NODE = f"{BLOCK_MATMUL_TYPE} node 'proj'"

formats = st.sampled_from(list(bq.FORMATS))
# W_down^T's format: the same as W_gate's (attribute absent or given), or Q8_0 (a re-blocked GGUF ffn_down)
down_formats = st.sampled_from([None, "same", "q8_0"])
seeds = st.integers(0, 2**31 - 1)


@st.composite
def mlp_shapes(draw):
    """(d, k): d whole blocks from one block up, k with tails of every task size (4 rows side by
    side, tasks of 256 rows at decode and 32 in prefill, chunks of 512); or a 4096-wide layer
    with a few rows."""
    if draw(st.booleans()):
        return 32 * draw(st.integers(1, 16)), draw(st.integers(1, 1100))
    return draw(st.sampled_from([4096, 4128])), draw(st.integers(1, 40))


def quantized_layer(rng, d: int, k: int, fmt: str, down: str | None):
    """Random normal weights in blocks (W_down^T in ``down``, None or "same": fmt) and x."""
    w_gate, w_up = (rng.standard_normal((k, d), dtype=F32) for _ in range(2))
    w_down = rng.standard_normal((d, k), dtype=F32)
    weights = QuantizedMLPWeights.quantize(w_gate, w_up, w_down, fmt, None if down in (None, "same") else down)
    return weights, rng.standard_normal(d).astype(F32)


def quant_model(weights: QuantizedMLPWeights, alpha_milli: int, act: Activation, outputs: int = 1, down=None,
                **attrs):
    """One SparseMLP node on the blocks; down_format written unless ``down`` is None (absent)."""
    attrs = {"weight_format": weights.fmt.name, **({} if down is None else {"down_format": weights.down_fmt.name}),
             **attrs}
    signs = pack_sign_words64(weights.dequantized()[0], groups=False)     # from the dequantized W_gate
    return _mlp_model(weights.gate, weights.up, weights.down_t, signs, alpha_milli, act, outputs=outputs, **attrs)


def counters(reset: bool = False) -> dict:
    return op_library.counters(op_library.cpu_library(), reset=reset)


# --- SparseMLP on blocks ---------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(fmt=formats, down=down_formats, shape=mlp_shapes(), alpha_milli=st.integers(600, 1400),
       act=st.sampled_from(["relu", "fatrelu:0.05", "fatrelu:-0.5"]), seed=seeds)
def test_one_token_is_the_sparse_reference_bit_for_bit(fmt, down, shape, alpha_milli, act, seed):
    """Output bits, the three masks, and the counters: the rows the predictor kept are the
    gate rows read, the +AS rows the up rows read (each d / 32 blocks)."""
    d, k = shape
    weights, x = quantized_layer(np.random.default_rng(seed), d, k, fmt, down)
    act = Activation.parse(act)
    session = _session(quant_model(weights, alpha_milli, act, outputs=4, down=down))
    counters(reset=True)
    out, predicted, computed, actual = session.run(None, {"x": x[None]})
    seen = counters()
    want, trace = mlp_sparse_quant(x, weights, act, alpha=alpha_milli / 1000)
    assert out.shape == (1, d) and predicted.shape == (k,)
    assert_bits_equal(out[0], want, f"{fmt}/{weights.down_fmt.name} sparse", f"d={d} k={k} seed={seed}")
    assert np.array_equal(predicted, trace.predicted_zero)
    assert np.array_equal(computed, trace.computed_up)
    assert np.array_equal(actual, trace.actual_zero)
    assert seen == {"decode_steps": 1, "rows": k, "rows_skipped": k - trace.rows["gate"],
                    "rows_computed": trace.rows["up"]}


def test_the_counted_rows_are_a_small_part_at_high_sparsity():
    """At about 0.9 sparsity the counters show a small share of the rows read (each d / 32
    blocks, QuantMLPTrace.weight_bytes_read), the trace's rows."""
    rng = np.random.default_rng(4)
    d, k = 256, 2048
    x = rng.standard_normal(d).astype(F32)
    # rows agree in sign with x on most columns (one in ten rows) or disagree (the others)
    row_sign = np.where(rng.random((k, 1)) < 0.1, 1, -1)
    w_gate = rng.standard_normal((k, d), dtype=F32)
    aligned = rng.random((k, d)) < 0.8
    w_gate[aligned] = (row_sign * np.sign(x) * np.abs(w_gate))[aligned]
    weights = QuantizedMLPWeights.quantize(w_gate, rng.standard_normal((k, d), dtype=F32),
                                           rng.standard_normal((d, k), dtype=F32), "q4_0")
    act = Activation.parse("relu")
    counters(reset=True)
    (out,) = _session(quant_model(weights, 1000, act)).run(None, {"x": x[None]})
    seen = counters()
    want, trace = mlp_sparse_quant(x, weights, act)
    assert_bits_equal(out[0], want, "q4_0 sparse")
    assert 0.05 * k < seen["rows_computed"] == trace.rows["up"] < 0.15 * k
    assert k - seen["rows_skipped"] == trace.rows["gate"] < 0.15 * k


@settings(max_examples=15, deadline=None)
@given(fmt=formats, down=down_formats, shape=mlp_shapes(),
       tokens=st.one_of(st.integers(2, 4), st.integers(15, 35)),            # one group of tokens, or several
       act=st.sampled_from(["relu", "fatrelu:0.05", "silu"]), seed=seeds)
def test_several_tokens_are_the_dense_reference_bit_for_bit(fmt, down, shape, tokens, act, seed):
    d, k = shape
    rng = np.random.default_rng(seed)
    weights, _ = quantized_layer(rng, d, k, fmt, down)
    xs = rng.standard_normal((1, tokens, d)).astype(F32)
    out, predicted = _session(quant_model(weights, 1000, Activation.parse(act), outputs=2, down=down)).run(
        None, {"x": xs})
    assert out.shape == xs.shape and predicted.shape == (0,)
    for t in range(tokens):
        assert_bits_equal(out[0, t], mlp_dense_quant(xs[0, t], weights, act), f"{fmt} dense", f"token {t} seed={seed}")


@settings(max_examples=10, deadline=None)
@given(fmt=formats, down=down_formats, shape=mlp_shapes(), act=st.sampled_from(["relu", "fatrelu:0.05", "silu"]),
       seed=seeds)
def test_a_dense_node_runs_one_token_densely(fmt, down, shape, act, seed):
    """dense = 1: the dense baseline in the same arithmetic, no predictor (masks [0])."""
    d, k = shape
    weights, x = quantized_layer(np.random.default_rng(seed), d, k, fmt, down)
    counters(reset=True)
    out, predicted = _session(quant_model(weights, 1000, Activation.parse(act), outputs=2, down=down,
                                          dense=1)).run(None, {"x": x[None]})
    assert predicted.shape == (0,) and counters()["decode_steps"] == 0
    assert_bits_equal(out[0], mlp_dense_quant(x, weights, act), f"{fmt} dense = 1", f"d={d} k={k} seed={seed}")


def test_a_dense_node_on_float_weights_is_the_dense_mlp():
    rng = np.random.default_rng(6)
    d, k = 100, 300
    w_gate, w_up = (rng.standard_normal((k, d), dtype=F32) for _ in range(2))
    w_down = rng.standard_normal((d, k), dtype=F32)
    x = rng.standard_normal(d).astype(F32)
    model = _mlp_model(w_gate, w_up, np.ascontiguousarray(w_down.T), pack_sign_words64(w_gate), 1000,
                       Activation.parse("relu"), outputs=2, dense=1)
    out, predicted = _session(model).run(None, {"x": x[None]})
    assert predicted.shape == (0,)
    assert_bits_equal(out[0], mlp_dense(x, w_gate, w_up, w_down, "relu"), "float dense = 1")


def test_dense_and_sparse_differ_only_where_the_predictor_skips_live_rows():
    """The same node with and without dense = 1: equal where the predictor skips only zero rows
    (the largest alpha: nothing predicted zero here), and the dense one is what mlp_dense_quant says."""
    weights, x = quantized_layer(np.random.default_rng(2), 128, 700, "q4_1", None)
    act = Activation.parse("relu")
    sparse = _session(quant_model(weights, MAX_ALPHA_MILLI, act, outputs=2)).run(None, {"x": x[None]})
    dense = _session(quant_model(weights, MAX_ALPHA_MILLI, act, dense=1)).run(None, {"x": x[None]})[0]
    assert not sparse[1].any()
    assert_bits_equal(sparse[0], dense, "alpha 0.001 sparse vs dense")
    assert np.count_nonzero(dense) == dense.size


@pytest.mark.parametrize("fmt", bq.FORMATS)
def test_silu_runs_approximately_with_the_references_bits(fmt):
    """No exact zeros: the predicted rows are taken as zero, as mlp_sparse_quant(approximate=True)."""
    weights, x = quantized_layer(np.random.default_rng(9), 256, 1500, fmt, None)
    act = Activation.parse("silu")
    out, predicted, computed, actual = _session(quant_model(weights, 980, act, outputs=4)).run(None, {"x": x[None]})
    want, trace = mlp_sparse_quant(x, weights, act, alpha=0.98, approximate=True)
    assert 0.3 < trace.predicted_zero.mean() < 0.7
    assert_bits_equal(out[0], want, f"{fmt} silu")
    for got, mask in ((predicted, trace.predicted_zero), (computed, trace.computed_up), (actual, trace.actual_zero)):
        assert np.array_equal(got, mask)


def test_results_do_not_depend_on_the_thread_count():
    weights, x = quantized_layer(np.random.default_rng(3), 320, 2100, "q8_0", "q8_0")
    model = quant_model(weights, 950, Activation.parse("relu"))
    xs = np.random.default_rng(4).standard_normal((1, 19, 320)).astype(F32)
    for feed in (x[None], xs):
        one, two = (_session(model, threads=t).run(None, {"x": feed})[0] for t in (1, 2))
        assert_bits_equal(one, two, "1 thread vs 2")
        assert np.count_nonzero(one)


@pytest.mark.ort_cuda
@pytest.mark.parametrize("fmt,down", [("q8_0", None), ("q4_0", "q8_0"), ("q4_1", "same")])
def test_a_quantized_node_on_the_cuda_provider_is_the_reference_bit_for_bit(fmt, down):
    """The library's CUDA kernel on blocks (quant.cu through sparse_mlp_cuda.cu): one token's
    output and masks are mlp_sparse_quant's, several tokens and a dense node's token are
    mlp_dense_quant's, as on the CPU provider."""
    reason = op_library.cuda_unavailable_reason()
    if reason:
        pytest.skip(f"CUDA op library skipped: {reason}")
    rng = np.random.default_rng(1)
    weights, x = quantized_layer(rng, 320, 1100, fmt, down)
    xs = np.stack([x, rng.standard_normal(320).astype(F32), rng.standard_normal(320).astype(F32)])

    def cuda_session(model):
        opts = ort.SessionOptions()
        opts.register_custom_ops_library(str(op_library.build(cuda=True).cuda))
        session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CUDAExecutionProvider"])
        assert session.get_providers()[0] == "CUDAExecutionProvider"
        return session

    act = Activation.parse("relu")
    sparse = cuda_session(quant_model(weights, 1000, act, outputs=4, down=down))
    out, predicted, computed, actual = sparse.run(None, {"x": x[None]})
    want, trace = mlp_sparse_quant(x, weights, act)
    assert trace.predicted_zero.any() and (~trace.predicted_zero).any()
    assert_bits_equal(out[0], want, f"{fmt} CUDA sparse")
    assert np.array_equal(predicted, trace.predicted_zero) and np.array_equal(computed, trace.computed_up)
    assert np.array_equal(actual, trace.actual_zero)
    (many, *_) = sparse.run(None, {"x": xs[None]})
    (one_dense,) = cuda_session(quant_model(weights, 1000, act, down=down, dense=1)).run(None, {"x": x[None]})
    for t in range(xs.shape[0]):
        assert_bits_equal(many[0, t], mlp_dense_quant(xs[t], weights, act), f"{fmt} CUDA prefill token {t}")
    assert_bits_equal(one_dense[0], mlp_dense_quant(x, weights, act), f"{fmt} CUDA dense = 1")


# --- BlockMatMul -----------------------------------------------------------------------------

def matmul_model(w_blocks, fmt, name: str = "proj", **attrs):
    node = helper.make_node(BLOCK_MATMUL_TYPE, ["x", "w"], ["y"], domain=DOMAIN, name=name,
                            **({"weight_format": fmt} if fmt is not None else {}), **attrs)
    graph = helper.make_graph([node], "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w_blocks, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, 1)])
    model.ir_version = IR_VERSION
    return model


@settings(max_examples=30, deadline=None)
@given(fmt=formats, blocks=st.one_of(st.integers(1, 12), st.sampled_from([128, 129])), n=st.integers(1, 300),
       lead=st.sampled_from([(), (1,), (2,), (1, 3), (1, 17), (2, 20)]), seed=seeds)
def test_block_matmul_is_the_v1_row_order_bit_for_bit(fmt, blocks, n, lead, seed):
    """Every x[..., :] (one token, or several in groups) times every row: warp_dot_rows of the
    dequantized W with V = 1."""
    rng = np.random.default_rng(seed)
    d = 32 * blocks
    w = bq.quantize(rng.standard_normal((n, d), dtype=F32), fmt)
    x = (rng.standard_normal((*lead, d)) * np.exp2(rng.integers(-6, 6, (*lead, d)))).astype(F32)
    (y,) = _session(matmul_model(w, fmt)).run(None, {"x": x})
    assert y.shape == (*lead, n)
    deq = bq.dequantize(w, fmt, d)
    want = np.stack([oc.warp_dot_rows(deq, row, v_width=oc.BLOCK_VECTOR_WIDTH) for row in x.reshape(-1, d)])
    assert_bits_equal(y.reshape(-1, n), want, f"{fmt} BlockMatMul", f"d={d} n={n} x{x.shape} seed={seed}")


def test_block_matmul_propagates_nan_as_matmul_does():
    w = bq.quantize(np.random.default_rng(0).standard_normal((5, 64), dtype=F32), "q4_1")
    x = np.ones((2, 64), F32)
    x[1, 3] = np.nan
    (y,) = _session(matmul_model(w, "q4_1")).run(None, {"x": x})
    assert np.isfinite(y[0]).all() and np.isnan(y[1]).all()


# --- bad inputs: one line naming the node, and the session goes on ------------------------------

def test_wrong_byte_widths_are_refused_naming_the_node_and_tensor():
    weights, x = quantized_layer(np.random.default_rng(0), 96, 40, "q4_0", "q8_0")
    act = Activation.parse("relu")
    signs = pack_sign_words64(weights.dequantized()[0], groups=False)
    wrong_down = _mlp_model(weights.gate, weights.up, weights.down_t, signs, 1000, act, weight_format="q4_0")
    raises_one_line(lambda: _session(wrong_down).run(None, {"x": x[None]}), NODE,
                   "W_down^T is uint8 [40, 102]; expected uint8 [40, 54]: d = 96 in q4_0 blocks of 18 bytes")
    short_up = _mlp_model(weights.gate, weights.up[:, :-1].copy(), weights.down_t, signs, 1000, act,
                          weight_format="q4_0", down_format="q8_0")
    raises_one_line(lambda: _session(short_up).run(None, {"x": x[None]}), NODE, "W_up is uint8 [40, 53]; expected")
    as_float = _mlp_model(weights.gate.astype(F32), weights.up, weights.down_t, signs, 1000, act,
                          weight_format="q4_0", down_format="q8_0")
    raises_one_line(lambda: _session(as_float).run(None, {"x": x[None]}), NODE,
                   "W_gate is [40, 54]; expected uint8 [k, 54]")
    blocks_without_format = _mlp_model(weights.gate, weights.up, weights.down_t, signs, 1000, act)
    raises_one_line(lambda: _session(blocks_without_format).run(None, {"x": x[None]}), NODE,
                   "W_gate must be float32 or float16 (uint8 blocks need the weight_format attribute)")
    session = _session(quant_model(weights, 1000, act, down="q8_0"))
    raises_one_line(lambda: session.run(None, {"x": x[None, :64]}), NODE,
                   "W_gate is uint8 [40, 54]; expected uint8 [k, 36]: d = 64 in q4_0 blocks")
    raises_one_line(lambda: session.run(None, {"x": np.zeros((1, 100), F32)}), NODE,
                   "x has shape [1, 100]; its last axis d must be a positive multiple of 32")
    assert session.run(None, {"x": x[None]})[0].shape == (1, 96)


@pytest.mark.parametrize("attr,value,message", [
    ("weight_format", "q5_0", "weight_format 'q5_0' is not a supported block format; expected one of "),
    ("down_format", "q4_k", "down_format 'q4_k' is not a supported block format; expected one of "),
    ("dense", 2, "dense is 2; expected 0 or 1"),
])
def test_unknown_formats_are_refused_when_the_session_is_made(attr, value, message):
    weights, _ = quantized_layer(np.random.default_rng(0), 64, 8, "q8_0", None)
    model = quant_model(weights, 1000, Activation.parse("relu"), **{attr: value})
    raises_one_line(lambda: _session(model), NODE, message + (", ".join(bq.FORMATS) if "expected one" in message else ""))


def test_a_down_format_without_a_weight_format_is_refused():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 64), dtype=F32)
    model = _mlp_model(w, w, w, pack_sign_words64(w), 1000, Activation.parse("relu"), down_format="q8_0")
    raises_one_line(lambda: _session(model), NODE, "down_format 'q8_0' needs a weight_format")


@pytest.mark.parametrize("tokens", [1, 3])
def test_nan_in_x_is_refused_naming_the_node(tokens):
    weights, _ = quantized_layer(np.random.default_rng(0), 64, 30, "q4_1", None)
    session = _session(quant_model(weights, 1000, Activation.parse("relu")))
    x = np.ones((1, tokens, 64), F32)
    x[0, -1, 5] = np.nan
    where = "index 5" if tokens == 1 else f"token {tokens - 1}, index 5"
    raises_one_line(lambda: session.run(None, {"x": x}), NODE, f"x contains NaN at {where}")
    assert session.run(None, {"x": np.ones((1, tokens, 64), F32)})[0].shape == (1, tokens, 64)


def test_block_matmul_bad_inputs_name_the_node():
    w = bq.quantize(np.random.default_rng(0).standard_normal((6, 64), dtype=F32), "q8_0")
    raises_one_line(lambda: _session(matmul_model(w, None)), MATMUL_NODE, "needs the weight_format attribute")
    raises_one_line(lambda: _session(matmul_model(w, "q2_k")), MATMUL_NODE,
                   "weight_format 'q2_k' is not a supported block format")
    session = _session(matmul_model(w, "q4_0"))                  # q8_0 bytes read as q4_0: the wrong width
    raises_one_line(lambda: session.run(None, {"x": np.ones((1, 64), F32)}), MATMUL_NODE,
                   "W is uint8 [6, 68]; expected uint8 [n, 36]: d = 64 in q4_0 blocks of 18 bytes")
    session = _session(matmul_model(w, "q8_0"))
    raises_one_line(lambda: session.run(None, {"x": np.ones((1, 48), F32)}), MATMUL_NODE,
                   "x has shape [1, 48]; its last axis d must be a positive multiple of 32")
    raises_one_line(lambda: session.run(None, {"x": np.ones((1, 96), F32)}), MATMUL_NODE,
                   "W is uint8 [6, 68]; expected uint8 [n, 102]")
    assert session.run(None, {"x": np.ones((3, 64), F32)})[0].shape == (3, 6)


# --- int8 activations (accuracy_level 4) ------------------------------------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(fmt=formats, down=st.sampled_from([None, "q8_0"]), shape=mlp_shapes(), alpha_milli=st.integers(600, 1400),
       act=st.sampled_from(["relu", "fatrelu:0.05"]), seed=seeds)
def test_one_token_at_level_4_is_the_int8_reference_bit_for_bit(fmt, down, shape, alpha_milli, act, seed):
    d, k = shape
    weights, x = quantized_layer(np.random.default_rng(seed), d, k, fmt, down)
    act = Activation.parse(act)
    counters(reset=True)
    out, predicted, computed, actual = _session(quant_model(weights, alpha_milli, act, outputs=4, down=down,
                                                              accuracy_level=4)).run(None, {"x": x[None]})
    want, trace = mlp_sparse_quant(x, weights, act, alpha=alpha_milli / 1000, int8_activations=True)
    assert_bits_equal(out[0], want, f"{fmt} sparse, int8 activations", f"d={d} k={k} seed={seed}")
    assert np.array_equal(predicted, trace.predicted_zero)
    assert np.array_equal(computed, trace.computed_up)
    assert np.array_equal(actual, trace.actual_zero)
    assert counters()["rows_computed"] == trace.rows["up"]


@settings(max_examples=10, deadline=None)
@given(fmt=formats, shape=mlp_shapes(), tokens=st.integers(2, 5), dense_node=st.booleans(),
       act=st.sampled_from(["relu", "silu"]), seed=seeds)
def test_prefill_and_dense_nodes_at_level_4_are_the_int8_dense_reference(fmt, shape, tokens, dense_node, act, seed):
    d, k = shape
    rng = np.random.default_rng(seed)
    weights, _ = quantized_layer(rng, d, k, fmt, None)
    n = 1 if dense_node else tokens
    xs = rng.standard_normal((1, n, d)).astype(F32)
    attrs = {"accuracy_level": 4, **({"dense": 1} if dense_node else {})}
    (out,) = _session(quant_model(weights, 1000, Activation.parse(act), **attrs)).run(None, {"x": xs})
    for t in range(n):
        assert_bits_equal(out[0, t], mlp_dense_quant(xs[0, t], weights, act, int8_activations=True),
                          f"{fmt} dense, int8 activations", f"token {t} seed={seed}")


@pytest.mark.parametrize("fmt", list(bq.FORMATS))
@pytest.mark.parametrize("tokens", [4, 5, 6, 7, 9])
def test_prefill_at_level_4_in_tiles_of_rows_and_tokens_is_the_reference(fmt, tokens):
    """The prefill's rows x tokens tiles and their tails: tokens past a multiple of 4, a row task
    of 5 rows (k = 37: 32 + 5), and 17 blocks a row (a scale run of 16, then a lone block)."""
    rng = np.random.default_rng(tokens)
    d, k = 32 * 17, 37
    weights, _ = quantized_layer(rng, d, k, fmt, None)
    xs = rng.standard_normal((1, tokens, d)).astype(F32)
    (out,) = _session(quant_model(weights, 1000, Activation.parse("silu"), accuracy_level=4)).run(None, {"x": xs})
    for t in range(tokens):
        assert_bits_equal(out[0, t], mlp_dense_quant(xs[0, t], weights, "silu", int8_activations=True),
                          f"{fmt} prefill, int8 activations", f"token {t} of {tokens}")


def test_level_4_refuses_an_infinite_x_and_bad_levels():
    weights, x = quantized_layer(np.random.default_rng(1), 64, 40, "q4_0", None)
    x[0] = np.inf
    session = _session(quant_model(weights, 1000, Activation.parse("relu"), accuracy_level=4))
    raises_one_line(lambda: session.run(None, {"x": x[None]}), "SparseMLP node 'layer/SparseMLP'", "index 0",
                    "finite")
    raises_one_line(lambda: _session(quant_model(weights, 1000, Activation.parse("relu"), accuracy_level=2)),
                    "accuracy_level is 2")
    w = np.ones((40, 64), F32)
    raises_one_line(lambda: _session(_mlp_model(w, w, np.ones((40, 64), F32), pack_sign_words64(w), 1000,
                                                  Activation.parse("relu"), accuracy_level=4)),
                    "accuracy_level 4", "block weight_format")
