"""GGUF's legacy block formats Q8_0, Q4_0 and Q4_1: bytes, quantization, dequantization.

A row of ``cols`` weights is cut into blocks of ``BLOCK`` = 32 consecutive weights; each
block is stored in ``block_bytes`` bytes, little endian, exactly as in a GGUF file:

* ``q8_0`` (34 bytes): fp16 scale ``d``, then 32 int8 codes ``q``. Value ``d * q``.
* ``q4_0`` (18 bytes): fp16 ``d``, then 16 bytes of nibbles; byte ``j`` holds code ``j`` in
  its low nibble and code ``j + 16`` in its high nibble. Value ``d * (q - 8)``.
* ``q4_1`` (20 bytes): fp16 ``d``, fp16 min ``m``, then 16 bytes of nibbles laid out as in
  q4_0. Value ``d * q + m``.

Dequantization (the rule the op computes with): ``D``, ``M`` are the stored fp16 values
widened exactly to float32. q8_0: ``D * q``; q4_0: ``D * (q - 8)``; q4_1: ``fl(D * q + M)``,
float32. ``D * q`` is always exact in float32 (at most 11 + 8 significant bits), so q8_0 and
q4_0 values are exact and q4_1 has one rounding, the addition (a fused multiply-add gives
the same bits). A non-finite ``D`` or ``M`` is refused (:func:`check_blocks`).

Quantization is round-to-nearest per block, as ggml's reference quantizer (and the ``gguf``
package's) does, all in float32 with the scale and min of the block before their rounding to
fp16: q8_0 ``d = amax / 127``, ``q = round(x / d)`` with ties away from zero; q4_0 ``d = v / -8``
for the element ``v`` of largest magnitude (the first such), ``q = min(15, trunc(x / d + 8.5))``;
q4_1 ``d = (max - min) / 15``, ``q = min(15, trunc((x - min) / d + 0.5))``. Here ``x / d`` is
``x * (1 / d)`` rounded twice, and ``1 / d`` is taken as 0 when ``d == 0``.

Round-trip bound (:func:`roundtrip_error_bound`): with ``d`` the quantizer's float32 scale,
``D`` the stored one and ``c`` the element's code value (q, q - 8 or q),
``|x - deq| <= |d| (1/2 + 2^-14) + |c| |d - D|`` (+ ``|min - M| + 2^-24 |deq|`` for q4_1,
+ ``|d| max(0, x/d - 7.5)`` for q4_0, whose code cannot reach +8: the elements of opposite
sign to ``v`` beyond 7.5 steps are up to one whole step off). Half a step is not a bound by
itself: the scale and min are rounded to fp16 after the codes are chosen. ``2^-14`` covers
the float32 roundings of ``x * (1 / d)`` and of the ``+ 8.5`` / ``+ 0.5``.

Columns that are not a multiple of 32 are refused, not padded: GGUF itself cannot hold such
a tensor, and every supported model width is a multiple of 32.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .dtypes import WEIGHT_DTYPES, check_dtype
from .errors import SparseInferError

BLOCK = 32                 # weights per block, every format
SCALE_BYTES = 2            # one fp16 header field (d, and m for q4_1)
ROUNDING_SLACK = 2.0 ** -14
_F32 = np.float32


@dataclass(frozen=True)
class BlockFormat:
    """One block format. ``matmulnbits_zero_point``: the zero point with which onnxruntime's
    MatMulNBits (block size 32, scale = d) holds the format exactly, None where it cannot."""

    name: str
    gguf_type: int          # gguf.GGMLQuantizationType value
    block_bytes: int
    code_bits: int          # 8: one int8 code a byte; 4: two nibbles a byte
    has_min: bool           # q4_1's fp16 m after d
    matmulnbits_zero_point: int | None

    @property
    def header_bytes(self) -> int:
        return SCALE_BYTES * (2 if self.has_min else 1)

    def row_bytes(self, cols: int) -> int:
        return cols // BLOCK * self.block_bytes


Q8_0 = BlockFormat("q8_0", gguf_type=8, block_bytes=34, code_bits=8, has_min=False, matmulnbits_zero_point=128)
Q4_0 = BlockFormat("q4_0", gguf_type=2, block_bytes=18, code_bits=4, has_min=False, matmulnbits_zero_point=8)
Q4_1 = BlockFormat("q4_1", gguf_type=3, block_bytes=20, code_bits=4, has_min=True, matmulnbits_zero_point=None)
FORMATS = {f.name: f for f in (Q8_0, Q4_0, Q4_1)}


def block_format(fmt) -> BlockFormat:
    """A :class:`BlockFormat` from itself or its name (case-insensitive: 'q4_0', 'Q4_0')."""
    if isinstance(fmt, BlockFormat):
        return fmt
    found = FORMATS.get(str(fmt).lower())
    if found is None:
        raise SparseInferError(f"unknown block format {fmt!r}; supported: {', '.join(FORMATS)}")
    return found


def check_cols(cols: int, fmt: BlockFormat, name: str) -> None:
    if cols < BLOCK or cols % BLOCK:
        raise SparseInferError(f"{name}: {cols} columns is not a multiple of {BLOCK}; {fmt.name} needs whole "
                               f"blocks of {BLOCK} weights (no padding is done)")


# --- quantization -------------------------------------------------------------------------

def _inverse(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d == 0, _F32(0), _F32(1) / d).astype(_F32)


def _round_half_away(t: np.ndarray) -> np.ndarray:
    """Nearest integer, ties away from zero, exact in float32 (no ``+ 0.5`` before a floor)."""
    a = np.abs(t)
    whole = np.floor(a)
    return np.copysign(whole + (a - whole >= _F32(0.5)), t)


def _nibble_code(t: np.ndarray, offset: float) -> np.ndarray:
    """``min(15, trunc(t + offset))`` in float32, as uint8 (t + offset is never negative)."""
    return np.minimum(np.trunc(t + _F32(offset)), _F32(15)).astype(np.uint8)


def _quantize_blocks(blocks: np.ndarray, fmt: BlockFormat):
    """float32 [n, 32] -> (d float32 [n, 1], min float32 [n, 1] or None, codes uint8 [n, 32])."""
    if fmt is Q8_0:
        d = np.abs(blocks).max(axis=1, keepdims=True) / _F32(127)
        return d, None, _round_half_away(blocks * _inverse(d)).astype(np.int8).view(np.uint8)
    if fmt is Q4_0:
        extreme = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=1)[:, None], axis=1)
        d = extreme / _F32(-8)
        return d, None, _nibble_code(blocks * _inverse(d), 8.5)
    lo = blocks.min(axis=1, keepdims=True)
    d = (blocks.max(axis=1, keepdims=True) - lo) / _F32(15)
    return d, lo, _nibble_code((blocks - lo) * _inverse(d), 0.5)


def _pack(d, lo, codes, fmt: BlockFormat) -> np.ndarray:
    with np.errstate(over="ignore"):      # an overflow to Inf is refused by the caller
        parts = [d.astype("<f2").view(np.uint8)] + ([lo.astype("<f2").view(np.uint8)] if fmt.has_min else [])
    if fmt.code_bits == 4:
        codes = codes[:, :BLOCK // 2] | (codes[:, BLOCK // 2:] << np.uint8(4))
    parts.append(codes)
    return np.concatenate(parts, axis=1)


def _float_blocks(w, fmt: BlockFormat, name: str) -> np.ndarray:
    """Validated float32 [rows * cols / 32, 32] blocks of a 2-D weight matrix."""
    w = np.asarray(w)
    check_dtype(name, w, WEIGHT_DTYPES)
    if w.ndim != 2:
        raise SparseInferError(f"{name}: expected a 2-D weight matrix [rows, cols], got shape {w.shape}")
    check_cols(w.shape[1], fmt, name)
    w = w.astype(_F32, copy=False)
    bad = ~np.isfinite(w)
    if bad.any():
        r, c = (int(i) for i in np.unravel_index(int(np.argmax(bad)), w.shape))
        raise SparseInferError(f"{name}: weight [{r}, {c}] is {w[r, c]} (block {c // BLOCK} of row {r}); "
                               f"weights must be finite")
    return w.reshape(-1, BLOCK)


def quantize(w, fmt, name: str = "weights") -> np.ndarray:
    """float32/fp16/bf16 [rows, cols] -> uint8 [rows, cols / 32 * block_bytes], byte-identical
    to ggml's reference quantizer. Refuses non-finite weights and blocks too large for an fp16
    scale, naming ``name`` and the block."""
    fmt = block_format(fmt)
    blocks = _float_blocks(w, fmt, name)
    rows, cols = np.shape(w)
    out = _pack(*_quantize_blocks(blocks, fmt), fmt).reshape(rows, fmt.row_bytes(cols))
    _check_header(out, fmt, name, "its values overflow the fp16 range of the scale and min")
    return out


# --- bytes -> values ----------------------------------------------------------------------

def _header(blocks: np.ndarray, fmt: BlockFormat):
    """(D float32 [n, 1], M float32 [n, 1] or None) of uint8 [n, block_bytes] blocks."""
    fields = blocks[:, :fmt.header_bytes].copy().view("<f2").astype(_F32)
    return fields[:, :1], (fields[:, 1:2] if fmt.has_min else None)


def _codes(blocks: np.ndarray, fmt: BlockFormat) -> np.ndarray:
    """Codes as float32 [n, 32]: q8_0 the signed q, q4_x the nibble q (0..15)."""
    raw = blocks[:, fmt.header_bytes:]
    if fmt.code_bits == 8:
        return raw.view(np.int8).astype(_F32)
    return np.concatenate([raw & np.uint8(0x0F), raw >> np.uint8(4)], axis=1).astype(_F32)


def _as_blocks(blocks, fmt: BlockFormat, name: str) -> np.ndarray:
    blocks = np.asarray(blocks)
    if blocks.dtype != np.uint8 or blocks.ndim != 2 or blocks.shape[1] == 0 or blocks.shape[1] % fmt.block_bytes:
        raise SparseInferError(f"{name}: {fmt.name} blocks must be uint8 [rows, n * {fmt.block_bytes}], "
                               f"got {blocks.dtype} {blocks.shape}")
    return np.ascontiguousarray(blocks).reshape(-1, fmt.block_bytes)


def _check_header(blocks2d: np.ndarray, fmt: BlockFormat, name: str, why: str) -> None:
    per_row = blocks2d.shape[1] // fmt.block_bytes
    d, m = _header(blocks2d.reshape(-1, fmt.block_bytes), fmt)
    for field, values in (("scale d", d), ("min m", m)):
        if values is None:
            continue
        bad = ~np.isfinite(values[:, 0])
        if bad.any():
            i = int(np.argmax(bad))
            raise SparseInferError(f"{name}: {fmt.name} block {i % per_row} of row {i // per_row} (block {i} "
                                   f"overall) has {field} = {values[i, 0]}; {why}")


def check_blocks(blocks, fmt, name: str = "weights", cols: int | None = None) -> None:
    """Refuse malformed blocks: wrong dtype/shape (or not ``cols`` columns' worth), and a NaN or
    Inf fp16 scale or min, naming the tensor ``name`` and the block."""
    fmt = block_format(fmt)
    _as_blocks(blocks, fmt, name)
    if cols is not None:
        check_cols(cols, fmt, name)
        if np.shape(blocks)[1] != fmt.row_bytes(cols):
            raise SparseInferError(f"{name}: {np.shape(blocks)[1]} bytes a row; {cols} columns of {fmt.name} "
                                   f"take {fmt.row_bytes(cols)}")
    _check_header(np.asarray(blocks), fmt, name, "a block's scale and min must be finite")


def fields_and_codes(blocks, fmt, cols: int, name: str = "weights"):
    """(D float32 [rows, cols / 32], M likewise or None, codes int32 [rows, cols / 32, 32]): the
    blocks' widened fp16 fields and the integer codes that multiply D (q4_0: q - 8)."""
    fmt = block_format(fmt)
    check_blocks(blocks, fmt, name, cols)
    flat = _as_blocks(blocks, fmt, name)
    d, m = _header(flat, fmt)
    q = _codes(flat, fmt).astype(np.int32) - (8 if fmt is Q4_0 else 0)
    shape = (np.shape(blocks)[0], cols // BLOCK)
    return d.reshape(shape), (None if m is None else m.reshape(shape)), q.reshape(*shape, BLOCK)


def dequantize(blocks, fmt, cols: int, name: str = "weights") -> np.ndarray:
    """uint8 [rows, cols / 32 * block_bytes] -> float32 [rows, cols] by the module's rule."""
    d, m, q = fields_and_codes(blocks, fmt, cols, name)
    values = d[..., None] * q.astype(_F32)
    if m is not None:
        values = values + m[..., None]
    return values.reshape(np.shape(blocks)[0], cols)


def roundtrip_error_bound(w, fmt, name: str = "weights") -> np.ndarray:
    """float64 [rows, cols]: the module docstring's bound on ``|w - dequantize(quantize(w))|``."""
    fmt = block_format(fmt)
    blocks = _float_blocks(w, fmt, name)
    x = blocks.astype(np.float64)
    d32, lo, codes = _quantize_blocks(blocks, fmt)
    packed = _pack(d32, lo, codes, fmt)
    d_stored, m_stored = (v if v is None else v.astype(np.float64) for v in _header(packed, fmt))
    step = np.abs(d32.astype(np.float64))
    c = _codes(packed, fmt).astype(np.float64) - (8 if fmt is Q4_0 else 0)
    bound = step * (0.5 + ROUNDING_SLACK) + np.abs(c) * np.abs(d32 - d_stored)
    if fmt is Q4_0:
        with np.errstate(divide="ignore", invalid="ignore"):
            steps = np.where(step > 0, x / d32.astype(np.float64), 0.0)
        bound += step * np.maximum(0.0, steps - 7.5)
    if fmt.has_min:
        bound += np.abs(lo.astype(np.float64) - m_stored) + 2.0 ** -24 * np.abs(d_stored * c + m_stored)
    return bound.reshape(np.shape(w))
