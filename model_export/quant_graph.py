"""The nodes of a quantized export (``ExportOptions(quantize=...)``): linear layers and MLPs on
block-quantized weights (``quant_weights``).

* A linear layer is onnxruntime's ``MatMulNBits`` (``quant_linear``) where it holds the blocks'
  format exactly and runs it fast: Q4_0 at any accuracy level, Q8_0 at level 4 (int8
  activations) only, since onnxruntime's 8-bit kernel for float32 activations is 40x slower
  (``quant_linear.matmul_nbits_fast``). Otherwise (Q4_1, and Q8_0 at the exact level 0) it is
  the op library's ``BlockMatMul`` (domain ai.sparseinfer, attribute ``weight_format``: y = x .
  W^T, each output element the V = 1 dot product of the order contract on the dequantized row,
  bit-exact with the reference).
* A sparse MLP is one ``SparseMLP`` node whose W_gate, W_up and W_down^T are uint8 blocks
  (attributes ``weight_format`` for W_gate and W_up, ``down_format`` for W_down^T; at accuracy
  level 4 ``accuracy_level`` = 4: the gate and up rows on int8 activations, as MatMulNBits' level
  4); its sign words are packed from the dequantized W_gate, as the reference packs them.
* A dense MLP is three MatMulNBits around the activation where they run gate, up and down (W_down
  in blocks along k), else one SparseMLP node with ``dense`` = 1, the dense MLP in the op's
  arithmetic.

The op library's nodes carry no function body (standard ops cannot read GGUF block bytes), so
an export that holds them runs only where the library is registered.
"""
from __future__ import annotations

import numpy as np
from onnx import numpy_helper

from .gguf_blocks import TensorBlocks
from .mlp_functions import apply_activation, pack_sign_words64
from .op_library import BLOCK_MATMUL_TYPE, DOMAIN
from .quant_linear import INT8_ACTIVATIONS, make_matmul_nbits, matmul_nbits_fast
from .quant_weights import QuantLayer, dequantized

# attributes of a SparseMLP node on blocks
WEIGHT_FORMAT, DOWN_FORMAT, DENSE, ACCURACY_LEVEL = "weight_format", "down_format", "dense", "accuracy_level"


def _make_tensor(g):
    external = g.root.external
    return external.tensor if external else (lambda name, array: numpy_helper.from_array(array, name))


def linear(g, x: str, tb: TensorBlocks, scope: str, weight_name: str, accuracy_level: int = 0) -> str:
    """x [..., in] @ W^T -> [..., rows of ``tb``]: MatMulNBits where it holds ``tb.fmt`` with a fast
    kernel (``quant_linear.matmul_nbits_fast``), else BlockMatMul on the blocks (initializer
    ``{weight_name}.{fmt}``)."""
    n_out = tb.blocks.shape[0]
    if matmul_nbits_fast(tb.fmt, accuracy_level):
        name = g._unique(f"{scope}/MatMulNBits")
        made = make_matmul_nbits(name, x, f"{name}/output_0", tb.blocks, tb.fmt, n_out, tb.cols, accuracy_level,
                                 _make_tensor(g))
        g.nodes.append(made.node)
        g.root.initializers.extend(made.initializers)
        return made.node.output[0]
    return g.op(BLOCK_MATMUL_TYPE, [x, g.initializer(f"{weight_name}.{tb.fmt.name}", tb.blocks)], scope, domain=DOMAIN,
                **{WEIGHT_FORMAT: tb.fmt.name})


def dense_mlp_nbits(g, x: str, lw: QuantLayer, act, scope: str, pre: str, accuracy_level: int = 0) -> str:
    """gate, up and down as MatMulNBits (W_down [d, k] in blocks along k), the activation between."""
    gate = linear(g, x, lw.gate, f"{scope}/gate_proj", f"{pre}.gate_proj.weight", accuracy_level)
    up = linear(g, x, lw.up, f"{scope}/up_proj", f"{pre}.up_proj.weight", accuracy_level)
    h3 = g.make_mul(apply_activation(g, gate, act, f"{scope}/act"), up, f"{scope}/act")
    return linear(g, h3, lw.down, f"{scope}/down_proj", f"{pre}.down_proj.weight", accuracy_level)


def sparse_mlp_inputs(g, x: str, lw: QuantLayer, pre: str, dense: bool, accuracy_level: int = 0) -> tuple[list[str], dict]:
    """A SparseMLP node's inputs (x, W_gate, W_up, W_down^T blocks, sign words of the dequantized
    W_gate) and its block attributes (at ``accuracy_level`` 4, as MatMulNBits', the gate and up
    rows on int8 activations: reference/q8_activation.py)."""
    fmt = lw.gate.fmt.name
    inputs = [x, g.initializer(f"{pre}.gate_proj.weight.{fmt}", lw.gate.blocks),
              g.initializer(f"{pre}.up_proj.weight.{fmt}", lw.up.blocks),
              g.initializer(f"{pre}.down_proj.weight_t.{lw.down.fmt.name}", lw.down.blocks),
              g.initializer(f"{pre}.gate_proj.sign_words",
                            pack_sign_words64(dequantized(lw.gate, f"{pre}.gate_proj.weight"), groups=False))]
    attrs = {WEIGHT_FORMAT: fmt, DOWN_FORMAT: lw.down.fmt.name, **({DENSE: 1} if dense else {}),
             **({ACCURACY_LEVEL: accuracy_level} if accuracy_level == INT8_ACTIVATIONS else {})}
    return inputs, attrs


def attention_columns(heads: int, head_dim: int, padded: int) -> np.ndarray:
    """int64 indices of the real columns of an attention output whose heads are padded to
    ``padded`` (export.pad_head_rows' layout: each rotary half padded at its end)."""
    half, padded_half = head_dim // 2, padded // 2
    cols = (np.arange(heads)[:, None, None] * padded + np.arange(2)[None, :, None] * padded_half
            + np.arange(half)[None, None, :])
    return cols.reshape(-1).astype(np.int64)
