"""Linear layers on block-quantized weights as onnxruntime's ``MatMulNBits`` (com.microsoft).

``MatMulNBits`` computes ``Y = A @ W^T`` for a constant ``W`` [N, K] held in blocks of
``block_size`` weights along K (onnxruntime's contrib operator schema):

* ``B``: uint8 [N, K / block_size, block_size * bits / 8], the codes of each block packed in
  order, low bits first: with 4 bits, byte ``j`` holds code ``2j`` in its low nibble and code
  ``2j + 1`` in its high nibble; with 8 bits, one code a byte;
* ``scales``: [N, K / block_size], of A's type (float32 here);
* weight = ``(code - zero_point) * scale``; with no ``zero_points`` input the zero point is
  ``2^(bits - 1)``: 8 for 4 bits, 128 for 8 bits.

Which ``reference.block_quant`` formats it holds exactly (``BlockFormat.matmulnbits_zero_point``):

* ``q4_0``: bits 4, block size 32, the block's nibble codes unchanged (GGUF's value is
  ``d * (q - 8)``), scale = the fp16 ``d`` widened to float32, default zero point 8. Only the
  nibble order differs: GGUF's byte ``j`` holds code ``j`` (low) and code ``j + 16`` (high);
  :func:`nbits_nibbles` repacks it losslessly (:func:`gguf_nibbles` is its inverse).
* ``q8_0``: bits 8, block size 32, code ``u = q + 128`` (the int8 ``q``'s bits with the top bit
  flipped), default zero point 128, scale = ``d`` widened to float32.
* ``q4_1`` (``d * q + m``, an fp16 min per block) is not representable: the zero point would
  be ``-m / d``, which is not an integer and not exact in floating point. :func:`make_matmul_nbits`
  returns None for it; the op library computes those layers.

Every weight ``(code - zero_point) * scale`` has at most 8 + 11 significant bits, so it is
exact in float32 and equals ``block_quant.dequantize`` bit for bit; only the order of the
dot products' sums is onnxruntime's. ``accuracy_level`` 0 (or 1) keeps A in float32;
level 4 lets onnxruntime quantize A per block to int8, a different arithmetic.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
import onnx
from onnx import helper, numpy_helper

from sparseinfer.reference.block_quant import BLOCK, Q4_0, Q8_0, block_format, check_blocks
from sparseinfer.reference.errors import SparseInferError

from .onnx_builder import MS_DOMAIN

OP_TYPE = "MatMulNBits"
ACCURACY_LEVELS = (0, 1, 2, 3, 4)      # unset, fp32, fp16, bf16, int8 activations
_BITS = {Q4_0.name: 4, Q8_0.name: 8}
_HALF = BLOCK // 2
_LOW, _HIGH = np.uint8(0x0F), np.uint8(4)


def matmul_nbits_bits(fmt) -> int | None:
    """MatMulNBits' ``bits`` for a format it holds exactly (4 for q4_0, 8 for q8_0), else None."""
    fmt = block_format(fmt)
    return _BITS.get(fmt.name) if fmt.matmulnbits_zero_point is not None else None


# onnxruntime's CPU MatMulNBits has a fast 8-bit kernel only with int8 activations: measured with
# onnxruntime 1.32 on 2 threads, a [1, 4096] x [4096, 4096]^T product takes 198 ms in 8 bits at
# accuracy level 0 (a slow fallback; 3.8 ms at level 4) against 5.4 ms in 4 bits at level 0 and
# 11.1 ms for a float32 MatMul; the op library's BlockMatMul takes 5.1 ms on the same q8_0 blocks.
INT8_ACTIVATIONS = 4


def matmul_nbits_fast(fmt, accuracy_level: int) -> bool:
    """Whether an exporter should run a linear layer in ``fmt`` as MatMulNBits at ``accuracy_level``:
    it holds the format exactly and has a fast kernel for it (4 bits; 8 bits only at level 4)."""
    bits = matmul_nbits_bits(fmt)
    return bits == 4 or (bits == 8 and accuracy_level == INT8_ACTIVATIONS)


# --- nibble order ---------------------------------------------------------------------------

def _nibble_bytes(nibbles, name: str) -> np.ndarray:
    nibbles = np.asarray(nibbles)
    if nibbles.dtype != np.uint8 or nibbles.ndim < 1 or nibbles.shape[-1] != _HALF:
        raise SparseInferError(f"{name}: nibble bytes must be uint8 [..., {_HALF}] (one 32-weight block a row), "
                               f"got {nibbles.dtype} {nibbles.shape}")
    return nibbles


def nbits_nibbles(gguf_nibbles, name: str = "weights") -> np.ndarray:
    """GGUF's nibble bytes of 4-bit blocks, uint8 [..., 16] (byte j: code j low, code j + 16
    high) -> MatMulNBits' order (byte j: code 2j low, code 2j + 1 high), same shape."""
    b = _nibble_bytes(gguf_nibbles, name)
    codes = np.concatenate([b & _LOW, b >> _HIGH], axis=-1)            # codes 0..31 in order
    return codes[..., 0::2] | (codes[..., 1::2] << _HIGH)


def gguf_nibbles(nbits_bytes, name: str = "weights") -> np.ndarray:
    """Inverse of :func:`nbits_nibbles`."""
    b = _nibble_bytes(nbits_bytes, name)
    codes = np.empty(b.shape[:-1] + (BLOCK,), dtype=np.uint8)
    codes[..., 0::2], codes[..., 1::2] = b & _LOW, b >> _HIGH
    return codes[..., :_HALF] | (codes[..., _HALF:] << _HIGH)


# --- blocks -> MatMulNBits inputs -----------------------------------------------------------

class NBitsWeights(NamedTuple):
    """MatMulNBits' constant inputs: ``b`` uint8 [N, K / 32, 32 * bits / 8], ``scales`` float32 [N, K / 32]."""

    bits: int
    b: np.ndarray
    scales: np.ndarray


def matmul_nbits_weights(blocks, fmt, n_out: int, k_in: int, name: str = "weights") -> NBitsWeights | None:
    """``blocks`` uint8 [n_out, k_in / 32 * block_bytes] of ``W`` [n_out, k_in] (each row's
    blocks along k_in, as in GGUF) -> the inputs of an exact MatMulNBits; None for a format it
    cannot hold (q4_1). Refuses malformed blocks and non-finite scales, naming ``name``."""
    fmt = block_format(fmt)
    check_blocks(blocks, fmt, name, k_in)
    if np.shape(blocks)[0] != n_out:
        raise SparseInferError(f"{name}: {np.shape(blocks)[0]} rows of blocks; expected N = {n_out} (one per output)")
    bits = matmul_nbits_bits(fmt)
    if bits is None:
        return None
    per_block = np.ascontiguousarray(blocks).reshape(n_out, k_in // BLOCK, fmt.block_bytes)
    scales = per_block[..., :fmt.header_bytes].copy().view("<f2")[..., 0].astype(np.float32)
    codes = per_block[..., fmt.header_bytes:]
    b = nbits_nibbles(codes, name) if bits == 4 else codes ^ np.uint8(0x80)     # int8 q -> q + 128
    return NBitsWeights(bits, np.ascontiguousarray(b), scales)


class NBitsNode(NamedTuple):
    node: onnx.NodeProto
    initializers: list


def _from_array(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(array, name)


def make_matmul_nbits(name: str, input_name: str, output_name: str, blocks, fmt, n_out: int, k_in: int,
                      accuracy_level: int = 0,
                      make_tensor: Callable[[str, np.ndarray], onnx.TensorProto] = _from_array) -> NBitsNode | None:
    """A MatMulNBits node named ``name`` computing ``output = input @ W^T`` (input [..., k_in]
    float32, output [..., n_out]) from ``W``'s blocks, with its two initializers ``{name}/B``
    and ``{name}/scales`` made by ``make_tensor(name, array)`` (``ExternalData.tensor`` writes
    them to an external-data file). None where MatMulNBits cannot hold ``fmt`` exactly (q4_1)."""
    if accuracy_level not in ACCURACY_LEVELS:
        raise SparseInferError(f"{name}: accuracy_level {accuracy_level!r} is not one of "
                               f"{', '.join(map(str, ACCURACY_LEVELS))}")
    weights = matmul_nbits_weights(blocks, fmt, n_out, k_in, name)
    if weights is None:
        return None
    b_name, scales_name = f"{name}/B", f"{name}/scales"
    node = helper.make_node(OP_TYPE, [input_name, b_name, scales_name], [output_name], name=name, domain=MS_DOMAIN,
                            K=int(k_in), N=int(n_out), bits=weights.bits, block_size=BLOCK,
                            accuracy_level=int(accuracy_level))
    return NBitsNode(node, [make_tensor(b_name, weights.b), make_tensor(scales_name, weights.scales)])
