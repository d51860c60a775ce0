"""The sparse MLP's custom ops, carried in the model as local ONNX functions.

Domain ``ai.onnx.contrib``: onnxruntime runs a function body made of standard ops when
no kernel is registered for (domain, name), and a registered kernel with the same domain
and name overrides the body; onnxruntime-extensions registers Python ops only in this
domain, so a faster kernel can later replace a body without touching the graph.

Ops (one decode token; x is the MLP input):

* ``SignPack`` (target cpu): x [1, d] float -> sign words [ceil(d/64)] uint64. Bit j of
  the packed stream is 1 iff x_j < 0 (-0.0 packs as 0), least significant bit first,
  zero padding: exactly ``reference.pack_signs``, two of its uint32 words per uint64
  word (little-endian), 64 bits per XOR on a 64-bit CPU.
* ``PredictZeroRows`` (cpu): (x words, W_gate words [k, ceil(d/64)] uint64) -> zero [k]
  bool. XOR, then an arithmetic popcount (SWAR: masks, shifts, adds and one multiply; the
  CPU EP has BitwiseXor and BitShift but no popcount), sum per row = N_neg, then paper
  eq. 2 on integers: ``1000 * N_neg > alpha_milli * (d - N_neg)``. Attribute
  ``alpha_milli`` (α in thousandths) is baked per layer.
* ``SignPackInt8`` (target cuda): x -> ±1 int8 [1, d] (-1 iff x < 0).
* ``PredictZeroRowsInt8`` (cuda): (±1 x, ±1 W_gate^T [d, k] int8) -> zero [k] bool via
  MatMulInteger: dot = N_pos - N_neg = d - 2 N_neg, so eq. 2 becomes
  ``1000 (d - dot) > alpha_milli (d + dot)``, exact in int64. (The CUDA EP has no
  bitwise ops; MatMulInteger runs there for int8 x int8.)
* ``SparseGateUp``: (x^T [d, 1], zero [k], W_gate [k, d], W_up [k, d]) -> (h3 [n], rows
  [n]). Gathers the rows not predicted zero (NonZero -> Gather -> MatMul), applies the
  activation, then (+AS) keeps only rows whose h1 is non-zero for the up projection.
* ``SparseDown``: (h3 [n], rows [n], W_down^T [k, d]) -> out [1, d], gathering only those
  rows of W_down^T.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from sparseinfer.reference.activations import Activation

from .onnx_builder import OPSET, GraphBuilder

DOMAIN = "ai.onnx.contrib"
WORD_BITS = 64
TARGETS = ("cpu", "cuda")


class FunctionBuilder(GraphBuilder):
    """Builds a function body: constants become Constant nodes (functions hold no initializers)."""

    def const(self, value, dtype=np.int64) -> str:
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.make_node("Constant", [], "const",
                                               value=onnx.numpy_helper.from_array(arr))[0]
        return self._consts[key]

    def attr_const(self, attr: str, scope: str) -> str:
        """A Constant whose int value is the function attribute ``attr``."""
        out = self.make_node("Constant", [], scope)[0]
        ref = onnx.AttributeProto(name="value_int", ref_attr_name=attr, type=onnx.AttributeProto.INT)
        self.nodes[-1].attribute.append(ref)
        return out

    def function(self, name, inputs, outputs, attributes=()) -> onnx.FunctionProto:
        return helper.make_function(DOMAIN, name, inputs, outputs, self.nodes,
                                    [helper.make_opsetid("", OPSET)], attributes=list(attributes))


def words_per_row64(d: int) -> int:
    return -(-int(d) // WORD_BITS)


def pack_sign_words64(w: np.ndarray) -> np.ndarray:
    """W_gate [k, d] -> [k, ceil(d/64)] uint64, the reference's uint32 words paired."""
    from sparseinfer.reference.signs import pack_signs

    words32 = pack_signs(w)
    n32 = words32.shape[-1]
    if n32 % 2:
        words32 = np.pad(words32, [(0, 0)] * (words32.ndim - 1) + [(0, 1)])
    return np.ascontiguousarray(words32).view("<u8").astype(np.uint64, copy=False)


def int8_signs_t(w: np.ndarray) -> np.ndarray:
    """W_gate [k, d] -> ±1 int8 [d, k] (-1 iff w < 0), MatMulInteger's B."""
    return np.ascontiguousarray(np.where(np.asarray(w) < 0, -1, 1).astype(np.int8).T)


def sign_pack(d: int) -> onnx.FunctionProto:
    b = FunctionBuilder()
    n_words = words_per_row64(d)
    neg = b.make_cast(b.op("Less", ["x", b.const(0.0, np.float32)], "SignPack"), TensorProto.INT64, "SignPack")
    flat = b.make_reshape(neg, [-1], "SignPack")
    padded = b.op("Pad", [flat, b.const([0, n_words * WORD_BITS - d])], "SignPack")
    halves = b.make_reshape(padded, [n_words, 2, 32], "SignPack")
    weights = b.const([1 << j for j in range(32)])
    packed = b.op("ReduceSum", [b.make_mul(halves, weights, "SignPack"), b.const([-1])], "SignPack", keepdims=0)
    u = b.make_cast(packed, TensorProto.UINT64, "SignPack")                     # [n_words, 2]
    lo = b.make_reshape(b.make_gather(u, b.const([0]), "SignPack", axis=1), [-1], "SignPack")
    hi = b.make_reshape(b.make_gather(u, b.const([1]), "SignPack", axis=1), [-1], "SignPack")
    shifted = b.op("BitShift", [hi, b.const(32, np.uint64)], "SignPack", direction="LEFT")
    b.make_node("Add", [lo, shifted], "SignPack")
    b.nodes[-1].output[0] = "words"
    return b.function("SignPack", ["x"], ["words"])


def _popcount64(b: FunctionBuilder, v: str, scope: str) -> str:
    """SWAR popcount of uint64 words (Hacker's Delight 5-1, with a multiply to sum bytes)."""
    u64 = np.uint64

    def shr(a, n):
        return b.op("BitShift", [a, b.const(n, u64)], scope, direction="RIGHT")

    def band(a, m):
        return b.op("BitwiseAnd", [a, b.const(m, u64)], scope)

    v = b.make_sub(v, band(shr(v, 1), 0x5555555555555555), scope)
    v = b.make_add(band(v, 0x3333333333333333), band(shr(v, 2), 0x3333333333333333), scope)
    v = band(b.make_add(v, shr(v, 4), scope), 0x0F0F0F0F0F0F0F0F)
    return shr(b.make_mul(v, b.const(0x0101010101010101, u64), scope), 56)


def _eq2(b: FunctionBuilder, twice_neg: str, twice_pos: str, scope: str) -> str:
    """Paper eq. 2 on (scaled) integer counts: 1000 * N_neg > alpha_milli * N_pos."""
    alpha = b.attr_const("alpha_milli", scope)
    lhs = b.make_mul(twice_neg, b.const(1000), scope)
    rhs = b.make_mul(twice_pos, alpha, scope)
    out = b.make_node("Greater", [lhs, rhs], scope)
    b.nodes[-1].output[0] = "zero"
    return out[0]


def predict_zero_rows(d: int) -> onnx.FunctionProto:
    b = FunctionBuilder()
    scope = "PredictZeroRows"
    xor = b.op("BitwiseXor", ["w_words", "x_words"], scope)
    counts = b.make_cast(_popcount64(b, xor, scope), TensorProto.INT64, scope)
    n_neg = b.op("ReduceSum", [counts, b.const([-1])], scope, keepdims=0)
    _eq2(b, n_neg, b.make_sub(b.const(d), n_neg, scope), scope)
    return b.function("PredictZeroRows", ["x_words", "w_words"], ["zero"], ["alpha_milli"])


def sign_pack_int8() -> onnx.FunctionProto:
    b = FunctionBuilder()
    neg = b.op("Less", ["x", b.const(0.0, np.float32)], "SignPackInt8")
    b.make_node("Where", [neg, b.const(-1, np.int8), b.const(1, np.int8)], "SignPackInt8")
    b.nodes[-1].output[0] = "signs"
    return b.function("SignPackInt8", ["x"], ["signs"])


def predict_zero_rows_int8(d: int) -> onnx.FunctionProto:
    b = FunctionBuilder()
    scope = "PredictZeroRowsInt8"
    dot = b.make_reshape(b.op("MatMulInteger", ["x_signs", "w_signs_t"], scope), [-1], scope)
    dot = b.make_cast(dot, TensorProto.INT64, scope)                     # N_pos - N_neg
    _eq2(b, b.make_sub(b.const(d), dot, scope), b.make_add(b.const(d), dot, scope), scope)
    return b.function("PredictZeroRowsInt8", ["x_signs", "w_signs_t"], ["zero"], ["alpha_milli"])


def activation_keeps(b: GraphBuilder, z: str, act: Activation, scope: str) -> str:
    """Bool mask where the activation passes z through (relu: z > 0; fatrelu: z >= T)."""
    if act.kind == "relu":
        return b.op("Greater", [z, b.const(0.0, np.float32)], scope)
    return b.op("GreaterOrEqual", [z, b.const(act.threshold, np.float32)], scope)


def apply_activation(b: GraphBuilder, z: str, act: Activation, scope: str) -> str:
    if act.kind == "silu":
        return b.make_mul(z, b.op("Sigmoid", [z], scope), scope)
    return b.make_where(activation_keeps(b, z, act, scope), z, b.const(0.0, np.float32), scope)


def sparse_gate_up(act: Activation) -> onnx.FunctionProto:
    b = FunctionBuilder()
    scope = "SparseGateUp"
    idx = b.make_nonzero_flat(b.op("Not", ["zero"], scope), scope)
    z = b.make_reshape(b.make_matmul(b.make_gather("w_gate", idx, scope), "x_t", scope), [-1], scope)
    h1 = apply_activation(b, z, act, scope)
    live = b.make_nonzero_flat(b.op("Not", [b.op("Equal", [h1, b.const(0.0, np.float32)], scope)], scope), scope)
    rows = b.make_gather(idx, live, scope)
    up = b.make_reshape(b.make_matmul(b.make_gather("w_up", rows, scope), "x_t", scope), [-1], scope)
    b.make_node("Mul", [b.make_gather(h1, live, scope), up], scope)
    b.nodes[-1].output[0] = "h3"
    b.make_node("Identity", [rows], scope)
    b.nodes[-1].output[0] = "rows"
    return b.function("SparseGateUp", ["x_t", "zero", "w_gate", "w_up"], ["h3", "rows"])


def sparse_down() -> onnx.FunctionProto:
    b = FunctionBuilder()
    scope = "SparseDown"
    h3 = b.make_unsqueeze("h3", [0], scope)
    b.make_node("MatMul", [h3, b.make_gather("w_down_t", "rows", scope)], scope)
    b.nodes[-1].output[0] = "out"
    return b.function("SparseDown", ["h3", "rows", "w_down_t"], ["out"])


def mlp_functions(d: int, act: Activation, target: str) -> list[onnx.FunctionProto]:
    """The functions a sparse export needs for ``target`` (cpu or cuda)."""
    predictor = [sign_pack(d), predict_zero_rows(d)] if target == "cpu" else \
        [sign_pack_int8(), predict_zero_rows_int8(d)]
    return predictor + [sparse_gate_up(act), sparse_down()]
