"""MatMulNBits from Q4_0 / Q8_0 blocks: the repacking, and onnxruntime's result against the reference."""
import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from onnx import TensorProto, helper

from sparseinfer.model_export import quant_linear as ql
from sparseinfer.model_export.onnx_builder import MS_DOMAIN, make_model
from sparseinfer.reference import block_quant as bq
from sparseinfer.reference.errors import SparseInferError
from sparseinfer.reference.order_contract import rigorous_error_bound

EXACT_FORMATS = [bq.Q4_0, bq.Q8_0]
NAME = "/model/layers.0/attn/q_proj/MatMulNBits"
# (input shape without K, N, K): several blocks a row, several rows, odd N, rank-3 input
SHAPES = [((1,), 1, 32), ((3,), 7, 96), ((2, 5), 33, 256), ((4,), 129, 160)]


def nibble_bytes(n_blocks):
    return arrays(np.uint8, (n_blocks, bq.BLOCK // 2))


@given(st.integers(1, 6).flatmap(nibble_bytes))
def test_repacking_round_trips(b):
    assert np.array_equal(ql.gguf_nibbles(ql.nbits_nibbles(b)), b)
    assert np.array_equal(ql.nbits_nibbles(ql.gguf_nibbles(b)), b)


def test_repacked_bytes_hold_consecutive_codes_low_first():
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 16, (5, bq.BLOCK)).astype(np.uint8)
    gguf_layout = codes[:, :16] | (codes[:, 16:] << 4)      # byte j: code j low, code j + 16 high
    out = ql.nbits_nibbles(gguf_layout)
    for j in range(16):
        assert np.array_equal(out[:, j] & 0x0F, codes[:, 2 * j])
        assert np.array_equal(out[:, j] >> 4, codes[:, 2 * j + 1])
    assert not np.array_equal(out, gguf_layout)


def test_q8_0_codes_are_offset_by_128():
    w = np.random.default_rng(2).standard_normal((3, 64)).astype(np.float32)
    blocks = bq.quantize(w, bq.Q8_0)
    nb = ql.matmul_nbits_weights(blocks, bq.Q8_0, 3, 64)
    q = blocks.reshape(3, 2, bq.Q8_0.block_bytes)[..., 2:].view(np.int8).astype(np.int32)
    assert nb.bits == 8 and np.array_equal(nb.b.astype(np.int32), q + 128)
    assert np.array_equal(nb.scales, blocks.reshape(3, 2, -1)[..., :2].copy().view("<f2")[..., 0].astype(np.float32))


def session(nodes, inits, k, n, rank):
    dims = ["m"] if rank == 2 else ["b", "s"]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims + [k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, dims + [n])], initializer=inits)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(make_model(graph, extra_domains=[MS_DOMAIN]).SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])


def wrongly_repacked(weights, fmt):
    """B as a careless exporter would write it: GGUF's own nibble order (q4_0), or the int8
    codes without the + 128 (q8_0)."""
    return ql.gguf_nibbles(weights.b) if fmt is bq.Q4_0 else weights.b ^ np.uint8(0x80)


@pytest.mark.parametrize("fmt", EXACT_FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("lead,n,k", SHAPES)
def test_onnxruntime_matches_reference(fmt, lead, n, k):
    rng = np.random.default_rng(n * 1000 + k)
    w = rng.standard_normal((n, k)).astype(np.float32) * np.exp2(rng.integers(-6, 4, (n, k // bq.BLOCK))).repeat(
        bq.BLOCK, axis=1).astype(np.float32)
    x = rng.standard_normal(lead + (k,)).astype(np.float32)
    blocks = bq.quantize(w, fmt, "w")
    made = ql.make_matmul_nbits(NAME, "x", "y", blocks, fmt, n, k, accuracy_level=0)
    y = session([made.node], made.initializers, k, n, len(lead) + 1).run(None, {"x": x})[0]

    w_deq = bq.dequantize(blocks, fmt, k).astype(np.float64)
    exact = x.astype(np.float64) @ w_deq.T
    bound = rigorous_error_bound(np.abs(x.astype(np.float64)) @ np.abs(w_deq).T, k)
    assert y.shape == lead + (n,) and y.dtype == np.float32
    assert np.all(np.abs(y - exact) <= bound)

    weights = ql.matmul_nbits_weights(blocks, fmt, n, k)
    wrong = helper.make_node(ql.OP_TYPE, ["x", "B_wrong", "scales"], ["y"], domain=MS_DOMAIN, K=k, N=n,
                             bits=weights.bits, block_size=bq.BLOCK)
    inits = [helper.make_tensor("B_wrong", TensorProto.UINT8, weights.b.shape, wrongly_repacked(weights, fmt).tobytes(),
                                raw=True),
             helper.make_tensor("scales", TensorProto.FLOAT, weights.scales.shape, weights.scales.ravel())]
    y_wrong = session([wrong], inits, k, n, len(lead) + 1).run(None, {"x": x})[0]
    assert np.abs(y_wrong - exact).max() > 1e3 * bound.max()


@pytest.mark.parametrize("fmt", EXACT_FORMATS, ids=lambda f: f.name)
def test_node_form(fmt):
    w = np.random.default_rng(3).standard_normal((5, 64)).astype(np.float32)
    made_names = []

    def record(name, array):
        made_names.append((name, array.dtype, array.shape))
        return helper.make_tensor(name, TensorProto.FLOAT, [1], [0.0])

    made = ql.make_matmul_nbits(NAME, "in", "out", bq.quantize(w, fmt), fmt, 5, 64, accuracy_level=4,
                                make_tensor=record)
    attrs = {a.name: helper.get_attribute_value(a) for a in made.node.attribute}
    bits = 4 if fmt is bq.Q4_0 else 8
    assert (made.node.op_type, made.node.domain, made.node.name) == ("MatMulNBits", "com.microsoft", NAME)
    assert list(made.node.input) == ["in", f"{NAME}/B", f"{NAME}/scales"] and list(made.node.output) == ["out"]
    assert attrs == {"K": 64, "N": 5, "bits": bits, "block_size": 32, "accuracy_level": 4}
    assert made_names == [(f"{NAME}/B", np.uint8, (5, 2, 32 * bits // 8)), (f"{NAME}/scales", np.float32, (5, 2))]


def test_q4_1_is_not_representable():
    w = np.random.default_rng(4).standard_normal((2, 32)).astype(np.float32)
    assert ql.matmul_nbits_bits(bq.Q4_1) is None
    assert ql.make_matmul_nbits(NAME, "x", "y", bq.quantize(w, bq.Q4_1), "q4_1", 2, 32) is None
    assert [ql.matmul_nbits_bits(f) for f in EXACT_FORMATS] == [4, 8]


def test_bad_blocks_are_refused():
    w = np.random.default_rng(5).standard_normal((3, 64)).astype(np.float32)
    blocks = bq.quantize(w, bq.Q4_0)
    with pytest.raises(SparseInferError, match=f"^{NAME}: 3 rows of blocks; expected N = 4"):
        ql.make_matmul_nbits(NAME, "x", "y", blocks, bq.Q4_0, 4, 64)
    with pytest.raises(SparseInferError, match=f"^{NAME}: accuracy_level 5 is not one of"):
        ql.make_matmul_nbits(NAME, "x", "y", blocks, bq.Q4_0, 3, 64, accuracy_level=5)
    bad = blocks.copy()
    bad[2, bq.Q4_0.block_bytes:bq.Q4_0.block_bytes + 2] = np.array([np.inf], "<f2").view(np.uint8)
    with pytest.raises(SparseInferError, match=f"^{NAME}: q4_0 block 1 of row 2 .* scale d = inf"):
        ql.make_matmul_nbits(NAME, "x", "y", bad, bq.Q4_0, 3, 64)
    with pytest.raises(SparseInferError, match="nibble bytes must be uint8"):
        ql.nbits_nibbles(np.zeros((2, 15), np.uint8))
