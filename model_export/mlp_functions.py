"""The sparse MLP's custom ops, carried in the model as local ONNX functions.

Domain ``ai.onnx.contrib``: onnxruntime runs a function body made of standard ops when
no kernel is registered for (domain, name), and a registered kernel with the same domain
and name overrides the body; onnxruntime-extensions registers Python ops only in this
domain. The decoder's native path (``native_mlp.py``) registers one there; because such
Python ops receive copies of their inputs, it fuses each layer's four ops into one op fed
x alone, at load time, leaving the file as exported.

Ops (one decode token; x is the MLP input):

* ``SignPack`` (target cpu): x [1, d] float -> sign words [words_per_row64(d)] uint64.
  Bit j of the packed stream is 1 iff x_j < 0 (-0.0 packs as 0), least significant bit first,
  zero padding (to whole groups of GROUP_WORDS words): ``reference.pack_signs``, two of its
  uint32 words per uint64 word (little-endian), 64 bits per XOR on a 64-bit CPU.
* ``PredictZeroRows`` (cpu): (x words, W_gate words [k, words_per_row64(d)] uint64) -> zero
  [k] bool. XOR, then an arithmetic popcount summed per row = N_neg (SWAR: masks, shifts,
  Split + adds of the words lane by lane, one multiply on [k]; the CPU EP has BitwiseXor
  and BitShift but no popcount; see ``_row_counts``), then paper
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
from sparseinfer.reference.errors import SparseInferError

from .onnx_builder import OPSET, GraphBuilder

DOMAIN = "ai.onnx.contrib"
WORD_BITS = 64
TARGETS = ("cpu", "cuda")
# PredictZeroRows sums the words of a row in uint64 SWAR lanes, splitting them in groups of
# GROUP_WORDS words (rows are zero-padded to a whole number of groups; zero words of both
# x and W XOR to zero and count nothing). Up to MAX_GROUPS groups the 16-bit lanes cannot
# overflow (see _row_counts): d <= MAX_GROUPS * GROUP_WORDS * 64 = 31744.
GROUP_WORDS = 16
MAX_GROUPS = 31


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
    """uint64 words per row: ceil(d/64), padded up to a whole number of GROUP_WORDS groups."""
    groups = -(-int(d) // (WORD_BITS * GROUP_WORDS))
    if groups > MAX_GROUPS:
        raise SparseInferError(f"hidden size {d} too large for the cpu predictor (at most "
                               f"{MAX_GROUPS * GROUP_WORDS * WORD_BITS}); export with --target cuda")
    return groups * GROUP_WORDS


def pack_sign_words64(w: np.ndarray) -> np.ndarray:
    """W_gate [k, d] -> [k, words_per_row64(d)] uint64, the reference's uint32 words paired."""
    from sparseinfer.reference.signs import pack_signs

    words32 = pack_signs(w)
    n32 = words32.shape[-1]
    pad = 2 * words_per_row64(np.shape(w)[-1]) - n32
    words32 = np.pad(words32, [(0, 0)] * (words32.ndim - 1) + [(0, pad)])
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


def _row_counts(b: FunctionBuilder, v: str, n_words: int, scope: str) -> str:
    """Popcount of each row of uint64 words [k, n_words] -> [k] int64, exactly.

    SWAR (Hacker's Delight 5-1) up to per-byte counts (<= 8 per byte lane), then the
    words are summed lane-wise before any horizontal add: the G = n_words / GROUP_WORDS
    groups are Split and added (byte lanes <= 8 G), bytes widened to 16-bit lanes (<= 16 G),
    the 16 words halved four times (<= 256 G), and one multiply adds the four lanes
    (<= 1024 G); G <= MAX_GROUPS = 31 keeps bytes < 256 and the sum < 65536. This replaces
    a per-word multiply, a Cast and a ReduceSum over the whole [k, n_words] tensor (the two costliest ops of the
    body on the CPU EP; ReduceSum on int64 also rounds sums above 2^53, so lane sums must
    not go through it).
    """
    u64 = np.uint64

    def shr(a, n):
        return b.op("BitShift", [a, b.const(n, u64)], scope, direction="RIGHT")

    def band(a, m):
        return b.op("BitwiseAnd", [a, b.const(m, u64)], scope)

    def add_parts(a, parts):
        outs = b.make_node("Split", [a], scope, n_out=parts, axis=-1, num_outputs=parts)
        total = outs[0]
        for o in outs[1:]:
            total = b.make_add(total, o, scope)
        return total

    v = b.make_sub(v, band(shr(v, 1), 0x5555555555555555), scope)
    v = b.make_add(band(v, 0x3333333333333333), band(shr(v, 2), 0x3333333333333333), scope)
    v = band(b.make_add(v, shr(v, 4), scope), 0x0F0F0F0F0F0F0F0F)           # byte lanes <= 8
    groups = n_words // GROUP_WORDS
    if groups > 1:
        v = add_parts(v, groups)                                              # [k, 16], <= 8 G
    v = b.make_add(band(v, 0x00FF00FF00FF00FF), band(shr(v, 8), 0x00FF00FF00FF00FF), scope)
    for _ in range(GROUP_WORDS.bit_length() - 1):                             # 16 -> 1 words
        v = add_parts(v, 2)
    v = shr(b.make_mul(v, b.const(0x0001000100010001, u64), scope), 48)
    return b.make_reshape(b.make_cast(v, TensorProto.INT64, scope), [-1], scope)


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
    n_neg = _row_counts(b, xor, words_per_row64(d), scope)
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
