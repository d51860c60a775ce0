"""The gated MLP on block-quantized weights (order contract: "Block-quantized weights").

Weights are neuron-major, blocks along d: W_gate, W_up and W_down^T are each [k, d] in
``block_quant`` blocks, so skipping neuron i skips row i's bytes in all three. The op's
arithmetic is the float32 MLP of ``mlp.py`` on the dequantized rows, its row dot products with
``V = order_contract.BLOCK_VECTOR_WIDTH`` (one block per iteration of the 32 lanes), with the
sign words packed from the dequantized W_gate; or, with ``int8_activations`` (onnxruntime's
accuracy level 4), the gate and up row dot products on x quantized per block
(``q8_activation.py``), the rest unchanged.

A GGUF file's ffn_down is [d, k] with its blocks along k (32 neurons share a block), which
sparsity cannot skip; :func:`reblock_down` turns it into W_down^T blocks along d, by one of
``DOWN_OPTIONS``: ``same`` (dequantize, transpose, quantize to the file's format) or ``q8_0``
(dequantize, transpose, quantize to Q8_0). :func:`reblock_down_errors` measures both against
the file's own dequantized ffn_down.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .block_quant import Q8_0, BlockFormat, block_format, check_blocks, dequantize, quantize
from .errors import SparseInferError
from .mlp import MLPTrace, mlp_dense, mlp_sparse
from .order_contract import BLOCK_VECTOR_WIDTH
from .q8_activation import q8_row_dots, quantize_activation
from .signs import BYTES_PER_WORD, pack_signs

DOWN_OPTIONS = ("same", "q8_0")


@dataclass(frozen=True)
class QuantizedMLPWeights:
    """One layer's MLP weights in blocks: ``gate``, ``up`` in ``fmt`` and ``down_t`` (W_down^T)
    in ``down_fmt``, each uint8 [k, d / 32 * block_bytes]."""

    fmt: BlockFormat
    down_fmt: BlockFormat
    d: int
    k: int
    gate: np.ndarray
    up: np.ndarray
    down_t: np.ndarray

    def __post_init__(self):
        for name, blocks, fmt in self._tensors():
            check_blocks(blocks, fmt, name, self.d)
            if np.shape(blocks)[0] != self.k:
                raise SparseInferError(f"{name}: {np.shape(blocks)[0]} rows; expected k = {self.k} (one per neuron)")

    def _tensors(self):
        return (("w_gate", self.gate, self.fmt), ("w_up", self.up, self.fmt), ("w_down_t", self.down_t, self.down_fmt))

    @classmethod
    def quantize(cls, w_gate, w_up, w_down, fmt, down_fmt=None) -> "QuantizedMLPWeights":
        """From float weights in Hugging Face layouts (w_down [d, k]); ``down_fmt`` defaults to ``fmt``."""
        fmt = block_format(fmt)
        down_fmt = fmt if down_fmt is None else block_format(down_fmt)
        k, d = np.shape(w_gate)
        return cls(fmt, down_fmt, d, k, quantize(w_gate, fmt, "w_gate"), quantize(w_up, fmt, "w_up"),
                   quantize(np.ascontiguousarray(np.asarray(w_down).T), down_fmt, "w_down_t"))

    def dequantized(self):
        """(w_gate, w_up, w_down_t), float32 [k, d] each: the weights the op computes with."""
        return tuple(dequantize(blocks, fmt, self.d, name) for name, blocks, fmt in self._tensors())


@dataclass
class QuantMLPTrace(MLPTrace):
    """An :class:`MLPTrace` whose ``weight_dtype`` is the block format (gate/up) and whose
    byte counts are whole blocks: a computed row reads d / 32 blocks."""

    down_format: str = ""

    @property
    def weight_bytes_read(self) -> dict:
        row_bytes = {step: block_format(self.down_format if step == "down" else self.weight_dtype).row_bytes(self.d)
                     for step in ("gate", "up", "down")}
        b = {step: n * row_bytes[step] for step, n in self.rows.items()}
        b["predictor"] = self.predictor_xor_words * BYTES_PER_WORD
        b["total"] = sum(b.values())
        return b


def int8_row_dots(x, weights: QuantizedMLPWeights):
    """``dots(which, rows)`` (see ``mlp.float_row_dots``) on x quantized per block: the
    contract's int8-activation row dot products of W_gate's and W_up's blocks."""
    codes, scales = quantize_activation(np.asarray(x), "x")
    blocks = {"gate": (weights.gate, "w_gate"), "up": (weights.up, "w_up")}

    def dots(which, rows=None):
        w, name = blocks[which]
        return q8_row_dots(w if rows is None else w[rows], weights.fmt, weights.d, codes, scales, name)
    return dots


def _row_dots(x, weights, int8_activations: bool):
    return int8_row_dots(x, weights) if int8_activations else None


def mlp_dense_quant(x, weights: QuantizedMLPWeights, activation, int8_activations: bool = False) -> np.ndarray:
    """Dense MLP output [d] float32 on the dequantized weights, in the order contract
    (``int8_activations``: the gate and up rows on x quantized per block)."""
    w_gate, w_up, w_down_t = weights.dequantized()
    return mlp_dense(x, w_gate, w_up, w_down_t.T, activation, w_down_t=w_down_t, v_width=BLOCK_VECTOR_WIDTH,
                     row_dots=_row_dots(x, weights, int8_activations))


def mlp_sparse_quant(x, weights: QuantizedMLPWeights, activation, alpha=1.0, mode="predicted+actual",
                     w_signs=None, approximate: bool = False, int8_activations: bool = False):
    """Sparse MLP on the dequantized weights: (output [d] float32, QuantMLPTrace).
    ``w_signs`` defaults to ``pack_signs`` of the dequantized W_gate; ``int8_activations`` as in
    :func:`mlp_dense_quant`."""
    w_gate, w_up, w_down_t = weights.dequantized()
    if w_signs is None:
        w_signs = pack_signs(w_gate)
    out, trace = mlp_sparse(x, w_gate, w_up, w_down_t.T, activation, alpha=alpha, mode=mode, w_signs=w_signs,
                            w_down_t=w_down_t, approximate=approximate, v_width=BLOCK_VECTOR_WIDTH,
                            row_dots=_row_dots(x, weights, int8_activations))
    fields = dict(vars(trace), weight_dtype=weights.fmt.name)
    return out, QuantMLPTrace(**fields, down_format=weights.down_fmt.name)


# --- a GGUF ffn_down (blocks along k) to W_down^T blocks along d ----------------------------

def _option_format(option: str, fmt: BlockFormat) -> BlockFormat:
    if option not in DOWN_OPTIONS:
        raise SparseInferError(f"unknown ffn_down option {option!r}; expected one of {', '.join(DOWN_OPTIONS)}")
    return fmt if option == "same" else Q8_0


def reblock_down(down_blocks, fmt, k: int, option: str, name: str = "ffn_down"):
    """GGUF ffn_down uint8 [d, k / 32 * block_bytes] -> (W_down^T blocks [k, d / 32 * ...], their format)."""
    fmt = block_format(fmt)
    target = _option_format(option, fmt)
    w_down = dequantize(down_blocks, fmt, k, name)
    return quantize(np.ascontiguousarray(w_down.T), target, f"{name} transposed"), target


def reblock_down_errors(down_blocks, fmt, k: int, name: str = "ffn_down") -> dict:
    """Per option: {"format", "max_abs", "rel_frobenius"} of the re-blocked W_down^T against the
    file's own dequantized ffn_down (float64 norms; rel_frobenius is 0 for an all-zero tensor)."""
    fmt = block_format(fmt)
    reference = dequantize(down_blocks, fmt, k, name).T.astype(np.float64)
    d = reference.shape[1]
    norm = float(np.linalg.norm(reference))
    result = {}
    for option in DOWN_OPTIONS:
        blocks, target = reblock_down(down_blocks, fmt, k, option, name)
        diff = dequantize(blocks, target, d, name).astype(np.float64) - reference
        err = float(np.linalg.norm(diff))
        result[option] = {"format": target.name, "max_abs": float(np.abs(diff).max()),
                          "rel_frobenius": err / norm if norm else 0.0}
    return result
