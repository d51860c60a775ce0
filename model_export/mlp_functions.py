"""The sparse MLP's custom op, ``SparseMLP`` in domain ``ai.sparseinfer``, and its ONNX function body.

A sparse export holds one ``SparseMLP`` node per layer. Two implementations run it:

* the native op library (``op_library.py``, ``native/sparse_mlp_op.cc``): any onnxruntime
  host that registers it (``SessionOptions.register_custom_ops_library``) runs the node as
  one native kernel, on the CPU or the CUDA provider; a registered kernel overrides the
  function body of the same domain and name;
* the function body carried in the model (a local ONNX function of standard ops), which
  every onnxruntime runs when the library is not registered, with the same masks.

The node (one layer; the contract is the native op's, ``native/sparse_mlp_op.cc``):
inputs x [..., d], W_gate and W_up [k, d], W_down^T [k, d], W_gate's sign words
[k, words_per_row64(d)] uint64, and (``--target cuda`` exports) W_gate's ±1 int8 signs
[d, k], read only by the body; attributes ``alpha_milli`` (α in thousandths, per layer),
``activation`` and ``threshold``; outputs ``out`` (x's shape) and, in debug exports,
``predicted_zero``, ``computed`` (rows whose up and down products are computed, +AS) and
``actual_zero`` (bool [k] for one token, [0] for several).

One token (``Size(x) == d``) is the decode step, run sparse; more tokens (prefill, or a
batch) run the dense MLP, as in the paper. The choice is inside the op, so the graph has no
control flow of its own (a CUDA graph can capture a decode step that uses the native op);
the body makes it with an ``If``.

The body's decode branch (one token; x is the MLP input):

* sign packing (target cpu): x -> sign words [words_per_row64(d)] uint64.
  Bit j of the packed stream is 1 iff x_j < 0 (-0.0 packs as 0), least significant bit first,
  zero padding (to whole groups of GROUP_WORDS words): ``reference.pack_signs``, two of its
  uint32 words per uint64 word (little-endian), 64 bits per XOR on a 64-bit CPU.
* predictor (cpu): XOR with W_gate's words, then an arithmetic popcount summed per row =
  N_neg (SWAR: masks, shifts, Split + adds of the words lane by lane, one multiply on [k];
  the CPU EP has BitwiseXor and BitShift but no popcount; see ``_row_counts``), then paper
  eq. 2 on integers: ``1000 * N_neg > alpha_milli * (d - N_neg)``.
* sign packing and predictor (target cuda): ±1 int8 x, then MatMulInteger with the ±1
  W_gate^T: dot = N_pos - N_neg = d - 2 N_neg, so eq. 2 becomes
  ``1000 (d - dot) > alpha_milli (d + dot)``, exact in int64. (The CUDA EP has no bitwise
  ops; MatMulInteger runs there for int8 x int8.)
* gate and up: gathers the rows not predicted zero (NonZero -> Gather -> MatMul), applies
  the activation, then (+AS) keeps only rows whose h1 is non-zero for the up projection.
* down: gathers only those rows of W_down^T.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from sparseinfer.reference.activations import GELU_TANH_K1, GELU_TANH_K2, INV_SQRT2, Activation
from sparseinfer.reference.errors import SparseInferError

from .onnx_builder import BOOL, FLOAT, OPSET, GraphBuilder
from .op_library import DOMAIN, OP_TYPE
DEBUG_OUTPUTS = ("predicted_zero", "computed", "actual_zero")
WORD_BITS = 64
TARGETS = ("cpu", "cuda")
# The predictor sums the words of a row in uint64 SWAR lanes, splitting them in groups of
# GROUP_WORDS words (rows are zero-padded to a whole number of groups; zero words of both
# x and W XOR to zero and count nothing). Up to MAX_GROUPS groups the 16-bit lanes cannot
# overflow (see _row_counts): d <= MAX_GROUPS * GROUP_WORDS * 64 = 31744.
GROUP_WORDS = 16
MAX_GROUPS = 31


class FunctionBuilder(GraphBuilder):
    """Builds a function body or one of its branches: constants become Constant nodes
    (functions hold no initializers)."""

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


def words_per_row64(d: int) -> int:
    """uint64 words per row: ceil(d/64), padded up to a whole number of GROUP_WORDS groups."""
    groups = -(-int(d) // (WORD_BITS * GROUP_WORDS))
    if groups > MAX_GROUPS:
        raise SparseInferError(f"hidden size {d} too large for the cpu predictor (at most "
                               f"{MAX_GROUPS * GROUP_WORDS * WORD_BITS}); export with --target cuda")
    return groups * GROUP_WORDS


def pack_sign_words64(w: np.ndarray, groups: bool = True) -> np.ndarray:
    """W_gate [k, d] -> [k, words_per_row64(d)] uint64, the reference's uint32 words paired.

    ``groups=False``: ceil(d / 64) words, no group padding (what the native op needs; the
    cpu target's function body needs the groups).
    """
    from sparseinfer.reference.signs import pack_signs

    words32 = pack_signs(w)
    n32 = words32.shape[-1]
    d = np.shape(w)[-1]
    pad = 2 * (words_per_row64(d) if groups else -(-d // WORD_BITS)) - n32
    words32 = np.pad(words32, [(0, 0)] * (words32.ndim - 1) + [(0, pad)])
    return np.ascontiguousarray(words32).view("<u8").astype(np.uint64, copy=False)


def int8_signs_t(w: np.ndarray) -> np.ndarray:
    """W_gate [k, d] -> ±1 int8 [d, k] (-1 iff w < 0), MatMulInteger's B."""
    return np.ascontiguousarray(np.where(np.asarray(w) < 0, -1, 1).astype(np.int8).T)


def _sign_pack(b: FunctionBuilder, x_row: str, d: int) -> str:
    sc = "SignPack"
    n_words = words_per_row64(d)
    neg = b.make_cast(b.op("Less", [x_row, b.const(0.0, np.float32)], sc), TensorProto.INT64, sc)
    flat = b.make_reshape(neg, [-1], sc)
    padded = b.op("Pad", [flat, b.const([0, n_words * WORD_BITS - d])], sc)
    halves = b.make_reshape(padded, [n_words, 2, 32], sc)
    weights = b.const([1 << j for j in range(32)])
    packed = b.op("ReduceSum", [b.make_mul(halves, weights, sc), b.const([-1])], sc, keepdims=0)
    u = b.make_cast(packed, TensorProto.UINT64, sc)                                   # [n_words, 2]
    lo = b.make_reshape(b.make_gather(u, b.const([0]), sc, axis=1), [-1], sc)
    hi = b.make_reshape(b.make_gather(u, b.const([1]), sc, axis=1), [-1], sc)
    shifted = b.op("BitShift", [hi, b.const(32, np.uint64)], sc, direction="LEFT")
    return b.make_add(lo, shifted, sc)


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


def _eq2(b: FunctionBuilder, twice_neg: str, twice_pos: str, alpha: str, scope: str) -> str:
    """Paper eq. 2 on (scaled) integer counts: 1000 * N_neg > alpha_milli * N_pos."""
    lhs = b.make_mul(twice_neg, b.const(1000), scope)
    rhs = b.make_mul(twice_pos, alpha, scope)
    return b.op("Greater", [lhs, rhs], scope)


def _predict_words(b: FunctionBuilder, x_row: str, w_words: str, d: int, alpha: str) -> str:
    sc = "PredictZeroRows"
    xor = b.op("BitwiseXor", [w_words, _sign_pack(b, x_row, d)], sc)
    n_neg = _row_counts(b, xor, words_per_row64(d), sc)
    return _eq2(b, n_neg, b.make_sub(b.const(d), n_neg, sc), alpha, sc)


def _predict_int8(b: FunctionBuilder, x_row: str, w_signs_t: str, d: int, alpha: str) -> str:
    sc = "PredictZeroRowsInt8"
    neg = b.op("Less", [x_row, b.const(0.0, np.float32)], sc)
    x_signs = b.make_where(neg, b.const(-1, np.int8), b.const(1, np.int8), sc)
    dot = b.make_reshape(b.op("MatMulInteger", [x_signs, w_signs_t], sc), [-1], sc)
    dot = b.make_cast(dot, TensorProto.INT64, sc)                        # N_pos - N_neg
    return _eq2(b, b.make_sub(b.const(d), dot, sc), b.make_add(b.const(d), dot, sc), alpha, sc)


def activation_keeps(b: GraphBuilder, z: str, act: Activation, scope: str, dtype=np.float32) -> str:
    """Bool mask where the activation passes z (of ``dtype``) through (relu: z > 0; fatrelu: z >= T)."""
    if act.kind == "relu":
        return b.op("Greater", [z, b.const(0.0, dtype)], scope)
    return b.op("GreaterOrEqual", [z, b.const(act.threshold, dtype)], scope)


def apply_activation(b: GraphBuilder, z: str, act: Activation, scope: str, dtype=np.float32) -> str:
    """h1 of z: relu / fatrelu exactly; silu z Sigmoid(z), gelu_tanh z Sigmoid(z (K1 + K2 z^2)),
    gelu 0.5 z (1 + Erf(z / sqrt 2)) through onnxruntime's Sigmoid and Erf (within
    ``Activation.error_bound`` of the reference, reference/activations.py)."""
    if act.sparse_capable:
        return b.make_where(activation_keeps(b, z, act, scope, dtype), z, b.const(0.0, dtype), scope)
    if act.kind == "gelu":
        erf = b.op("Erf", [b.make_mul(z, b.const(INV_SQRT2, dtype), scope)], scope)
        return b.make_mul(b.make_mul(z, b.const(0.5, dtype), scope), b.make_add(b.const(1.0, dtype), erf, scope),
                          scope)
    y = z
    if act.kind == "gelu_tanh":                   # 0.5 (1 + tanh(v)) = sigmoid(2 v)
        z2 = b.make_mul(b.const(GELU_TANH_K2, dtype), b.make_mul(z, z, scope), scope)
        y = b.make_mul(z, b.make_add(b.const(GELU_TANH_K1, dtype), z2, scope), scope)
    return b.make_mul(z, b.op("Sigmoid", [y], scope), scope)


def _rows_f32(b: FunctionBuilder, w: str, rows: str, weight_type, sc: str) -> str:
    """The listed rows of a weight matrix, in float32 (fp16 weights widened exactly)."""
    got = b.make_gather(w, rows, sc)
    return got if weight_type == FLOAT else b.make_cast(got, FLOAT, sc)


def _f32(b: FunctionBuilder, w: str, weight_type, sc: str) -> str:
    return w if weight_type == FLOAT else b.make_cast(w, FLOAT, sc)


def _gate_up(b: FunctionBuilder, x_t: str, zero: str, act: Activation, weight_type=FLOAT) -> tuple[str, str]:
    """(h3 [n], rows [n]): the kept rows' gate, then up for those whose h1 is non-zero (+AS)."""
    sc = "SparseGateUp"
    idx = b.make_nonzero_flat(b.op("Not", [zero], sc), sc)
    z = b.make_reshape(b.make_matmul(_rows_f32(b, "w_gate", idx, weight_type, sc), x_t, sc), [-1], sc)
    h1 = apply_activation(b, z, act, sc)
    live = b.make_nonzero_flat(b.op("Not", [b.op("Equal", [h1, b.const(0.0, np.float32)], sc)], sc), sc)
    rows = b.make_gather(idx, live, sc)
    up = b.make_reshape(b.make_matmul(_rows_f32(b, "w_up", rows, weight_type, sc), x_t, sc), [-1], sc)
    return b.make_mul(b.make_gather(h1, live, sc), up, sc), rows


def _down(b: FunctionBuilder, h3: str, rows: str, weight_type=FLOAT) -> str:
    sc = "SparseDown"
    return b.make_matmul(b.make_unsqueeze(h3, [0], sc), _rows_f32(b, "w_down_t", rows, weight_type, sc), sc)


def _returns(b: FunctionBuilder, values, names, kinds) -> None:
    """Identity nodes onto the branch's declared outputs."""
    for value, name, kind in zip(values, names, kinds):
        b.nodes.append(helper.make_node("Identity", [value], [name], name=b._unique(f"{name}/Identity")))
        b.add_output(name, kind, None)


def _decode_branch(root: FunctionBuilder, d: int, k: int, act: Activation, target: str, alpha: str,
                   x_shape: str, names, debug: bool, weight_type) -> onnx.GraphProto:
    b = FunctionBuilder(root=root)
    x_row, x_t = b.make_reshape("x", [1, d], "decode"), b.make_reshape("x", [d, 1], "decode")
    zero = _predict_words(b, x_row, "w_signs", d, alpha) if target == "cpu" else \
        _predict_int8(b, x_row, "w_signs_int8_t", d, alpha)
    h3, rows = _gate_up(b, x_t, zero, act, weight_type)
    values = [b.op("Reshape", [_down(b, h3, rows, weight_type), x_shape], "decode")]
    if debug:
        counts = b.op("ScatterElements", [b.const(np.zeros(k, np.int64)), rows,
                                          b.op("Expand", [b.const(1), b.make_shape(rows, "debug")], "debug")], "debug")
        full_gate = b.make_reshape(b.make_matmul(_f32(b, "w_gate", weight_type, "debug"), x_t, "debug"), [-1],
                                   "debug")
        # h1 == 0 (a kept z = +0.0 counts: fatrelu with a threshold <= 0); silu, gelu: a negative gate
        actual = b.op("Equal", [apply_activation(b, full_gate, act, "debug"), b.const(0.0, np.float32)], "debug") \
            if act.sparse_capable else b.op("Less", [full_gate, b.const(0.0, np.float32)], "debug")
        values += [zero, b.make_cast(counts, BOOL, "debug"), actual]
    _returns(b, values, [f"decode_{n}" for n in names], [FLOAT, BOOL, BOOL, BOOL])
    return b.make_graph("decode")


def _prefill_branch(root: FunctionBuilder, d: int, act: Activation, x_shape: str, names,
                    debug: bool, weight_type) -> onnx.GraphProto:
    """Several tokens: the dense MLP, the same weights (W_gate and W_up as [k, d]; fp16 ones
    widened to float32 here, every call: the body is the fallback, the op library the fast path)."""
    b = FunctionBuilder(root=root)
    x2t = b.make_transpose(b.make_reshape("x", [-1, d], "prefill"), [1, 0], "prefill")
    gate = b.make_transpose(b.make_matmul(_f32(b, "w_gate", weight_type, "gate_proj"), x2t, "gate_proj"), [1, 0],
                            "gate_proj")
    up = b.make_transpose(b.make_matmul(_f32(b, "w_up", weight_type, "up_proj"), x2t, "up_proj"), [1, 0], "up_proj")
    h3 = b.make_mul(apply_activation(b, gate, act, "act"), up, "act")
    values = [b.op("Reshape", [b.make_matmul(h3, _f32(b, "w_down_t", weight_type, "down_proj"), "down_proj"),
                               x_shape], "prefill")]
    if debug:
        empty = b.make_cast(b.const(np.zeros(0, np.int64)), BOOL, "debug")
        values += [empty] * 3
    _returns(b, values, [f"prefill_{n}" for n in names], [FLOAT, BOOL, BOOL, BOOL])
    return b.make_graph("prefill")


def sparse_mlp_function(d: int, k: int, act: Activation, target: str, debug: bool = False,
                        weight_type=FLOAT) -> onnx.FunctionProto:
    """The body of ``SparseMLP`` for one export (d, k, activation, target and the weights'
    element type, FLOAT or FLOAT16, are the model's); x and out are float32."""
    if target not in TARGETS:
        raise SparseInferError(f"unknown target {target!r}; expected cpu or cuda")
    names = ("out", *DEBUG_OUTPUTS) if debug else ("out",)
    b = FunctionBuilder()
    alpha = b.attr_const("alpha_milli", "alpha")
    x_shape = b.make_shape("x", "x")
    one_token = b.op("Equal", [b.op("Size", ["x"], "x"), b.const(d)], "x")
    b.nodes.append(helper.make_node(
        "If", [one_token], list(names), name=b._unique("If"),
        then_branch=_decode_branch(b, d, k, act, target, alpha, x_shape, names, debug, weight_type),
        else_branch=_prefill_branch(b, d, act, x_shape, names, debug, weight_type)))
    inputs = ["x", "w_gate", "w_up", "w_down_t", "w_signs"] + (["w_signs_int8_t"] if target == "cuda" else [])
    return helper.make_function(DOMAIN, OP_TYPE, inputs, list(names), b.nodes, [helper.make_opsetid("", OPSET)],
                                attributes=["alpha_milli", "activation", "threshold"])
