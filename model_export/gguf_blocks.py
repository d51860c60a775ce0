"""A GGUF weight matrix as ``reference.block_quant`` blocks, without touching what it need not.

:func:`tensor_blocks` takes one ``gguf.GGUFReader`` tensor (``reader.tensors`` item) of a
weight matrix, [rows, cols] with its blocks along cols (GGUF lists the dimensions fastest
first: ``tensor.shape`` is [cols, rows]):

* Q8_0, Q4_0, Q4_1 keep their own format, bytes as in the file (never dequantized and
  quantized again), whatever format was chosen for the rest;
* the K-quants Q4_K, Q5_K, Q6_K (most hub GGUFs) and F32 / F16 / BF16 are dequantized by the
  ``gguf`` package and quantized to the chosen format, with a one-line note saying so;
* any other type is refused, naming it and the supported ones, and so is a NaN or Inf fp16
  scale or min in any block (the legacy formats' ``d`` / ``m``, the K-quants' ``d`` / ``dmin``).

A GGUF ffn_down is [d, ff] with its blocks along ff: 32 neurons share a block, which sparsity
cannot skip. :func:`down_blocks` turns it into W_down^T [ff, d] with blocks along d
(``reference.quant_mlp.reblock_down``), in Q8_0 by default (``DOWN_POLICIES``: ``q8_0`` or
``same``, the format of the gate and up blocks). Measured with ``reblock_down_errors`` against
the file's own dequantized ffn_down, on all 30 layers of SmolLM2-135M-Instruct's Q4_1 GGUF:
relative Frobenius error 0.0064 in Q8_0 against 0.088 re-quantized to Q4_1 (layer 0), 13.6x
to 14.5x lower (median 14.3x), for only the bytes of the active rows.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from sparseinfer.reference.block_quant import BLOCK, FORMATS, BlockFormat, block_format, check_blocks, quantize
from sparseinfer.reference.errors import SparseInferError
from sparseinfer.reference.quant_mlp import DOWN_OPTIONS, reblock_down

DOWN_POLICIES = DOWN_OPTIONS          # ("same", "q8_0")
DEFAULT_DOWN_POLICY = "q8_0"          # measured above: about 14x lower error than "same" for Q4_1
KEPT_TYPES = tuple(f.name.upper() for f in FORMATS.values())              # Q8_0, Q4_0, Q4_1
# K-quant type -> byte offsets of its fp16 fields in a 256-weight super-block
K_QUANT_SCALES = {"Q4_K": {"d": 0, "dmin": 2}, "Q5_K": {"d": 0, "dmin": 2}, "Q6_K": {"d": 208}}
FLOAT_TYPES = ("F32", "F16", "BF16")
CONVERTED_TYPES = tuple(K_QUANT_SCALES) + FLOAT_TYPES


class TensorBlocks(NamedTuple):
    """``blocks`` uint8 [rows, cols / 32 * fmt.block_bytes] in ``fmt``; ``note``: one line saying
    what was converted or re-blocked, None when the file's bytes travel as they are."""

    fmt: BlockFormat
    blocks: np.ndarray
    note: str | None

    @property
    def cols(self) -> int:
        return self.blocks.shape[1] // self.fmt.block_bytes * BLOCK


def _matrix_shape(tensor, name: str) -> tuple[int, int]:
    dims = [int(n) for n in tensor.shape]
    if len(dims) != 2:
        raise SparseInferError(f"{name}: GGUF tensor of shape {dims} (fastest first); expected a 2-D weight matrix")
    return dims[1], dims[0]


def _type_name(tensor) -> str:
    return tensor.tensor_type.name


def _kept_format(tensor) -> BlockFormat | None:
    return FORMATS.get(_type_name(tensor).lower()) if _type_name(tensor) in KEPT_TYPES else None


def _check_k_quant_scales(tensor, name: str, rows: int) -> None:
    from gguf import GGML_QUANT_SIZES

    block_bytes = GGML_QUANT_SIZES[tensor.tensor_type][1]
    super_blocks = np.asarray(tensor.data).reshape(-1, block_bytes)
    per_row = super_blocks.shape[0] // rows
    for field, offset in K_QUANT_SCALES[_type_name(tensor)].items():
        values = super_blocks[:, offset:offset + 2].copy().view("<f2")[:, 0]
        bad = ~np.isfinite(values)
        if bad.any():
            i = int(np.argmax(bad))
            raise SparseInferError(f"{name}: {_type_name(tensor)} block {i % per_row} of row {i // per_row} (block {i} "
                                   f"overall) has {field} = {values[i]}; a block's scales must be finite")


def _float_matrix(tensor, name: str) -> np.ndarray:
    """The weights of a K-quant or float tensor, [rows, cols] (float32, or float16 for F16)."""
    from gguf.quants import dequantize

    rows, cols = _matrix_shape(tensor, name)
    kind = _type_name(tensor)
    if kind not in CONVERTED_TYPES:
        raise SparseInferError(f"{name}: GGUF type {kind} is not supported; supported: {', '.join(KEPT_TYPES)} "
                               f"(kept as they are) and {', '.join(CONVERTED_TYPES)} (converted to the chosen format)")
    if kind in K_QUANT_SCALES:
        _check_k_quant_scales(tensor, name, rows)
    data = np.asarray(tensor.data)
    w = data if kind in ("F32", "F16") else dequantize(data, tensor.tensor_type)
    return w.reshape(rows, cols)


def tensor_blocks(tensor, fmt, name: str | None = None) -> TensorBlocks:
    """The blocks of a GGUF weight matrix (module docstring): a Q8_0 / Q4_0 / Q4_1 tensor in its
    own format, a read-only view of the file's bytes; any other supported type quantized to
    ``fmt`` with a note ``"{name}: Q4_K converted to q4_0"``. ``name`` defaults to the tensor's."""
    fmt = block_format(fmt)
    name = name or tensor.name
    rows, cols = _matrix_shape(tensor, name)
    kept = _kept_format(tensor)
    if kept is not None:
        blocks = np.asarray(tensor.data).reshape(rows, -1)
        check_blocks(blocks, kept, name, cols)
        return TensorBlocks(kept, blocks, None)
    w = _float_matrix(tensor, name)
    return TensorBlocks(fmt, quantize(w, fmt, name), f"{name}: {_type_name(tensor)} converted to {fmt.name}")


def down_blocks(tensor, fmt, policy: str = DEFAULT_DOWN_POLICY, name: str | None = None) -> TensorBlocks:
    """A GGUF ffn_down [d, ff] (blocks along ff) as W_down^T [ff, d] blocks along d, in Q8_0
    (``policy`` 'q8_0') or in the format of the layer's gate and up blocks ('same': the file's
    own for Q8_0 / Q4_0 / Q4_1, else ``fmt``). A Q8_0 / Q4_0 / Q4_1 file's blocks are
    dequantized exactly and re-blocked; any other supported type is dequantized and quantized
    once, transposed. The note says what was done."""
    fmt = block_format(fmt)
    name = name or tensor.name
    if policy not in DOWN_POLICIES:
        raise SparseInferError(f"{name}: unknown ffn_down policy {policy!r}; "
                               f"expected one of {', '.join(DOWN_POLICIES)}")
    d, ff = _matrix_shape(tensor, name)
    kept = _kept_format(tensor)
    if kept is not None:
        blocks, target = reblock_down(tensor_blocks(tensor, kept, name).blocks, kept, ff, policy, name)
    else:
        target = fmt if policy == "same" else block_format(policy)
        blocks = quantize(np.ascontiguousarray(_float_matrix(tensor, name).T), target, f"{name} transposed")
    note = (f"{name}: {_type_name(tensor)} [{d}, {ff}] with blocks along {ff} re-blocked as W_down^T [{ff}, {d}] "
            f"in {target.name} with blocks along {d} (ffn_down policy {policy})")
    return TensorBlocks(target, blocks, note)
