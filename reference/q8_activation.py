"""Int8 activations for the row dot products on block-quantized weights (order contract:
"Block-quantized weights with int8 activations").

x is quantized per block of 32 to int8 codes and a float32 scale (:func:`quantize_activation`);
a row's dot product is then exact integer sums of 4 code products, scaled per block and added
into 16 float32 lanes (:func:`q8_row_dots`), as the CPU kernel's integer dot instructions
compute them. Rounding rule: ``s = fl(amax / 127)``, ``q = rint(fl(x / s))`` ties to even,
clamped to [-127, 127], 0 where ``s == 0``. Error against the float32 arithmetic: each x is off
by at most ``s / 2`` (plus the clamp's, only for subnormal ``s``).
"""
from __future__ import annotations

import numpy as np

from .block_quant import BLOCK, block_format, check_cols, fields_and_codes
from .errors import SparseInferError
from .order_contract import Q8_BUTTERFLY, Q8_GROUP, Q8_LANES

Q8_MAX = 127
GROUPS = BLOCK // Q8_GROUP          # integer sums a block
_F32 = np.float32
assert Q8_LANES == 2 * GROUPS, "two blocks' groups a set of lanes"


def quantize_activation(x, name: str = "x"):
    """float32 x [d] (d a multiple of 32, finite) -> (codes int8 [d], scales float32 [d / 32])."""
    x = np.asarray(x)
    if x.dtype != _F32 or x.ndim != 1:
        raise SparseInferError(f"{name}: expected float32 [d], got {x.dtype} {x.shape}")
    check_cols(x.shape[0], block_format("q8_0"), name)
    bad = ~np.isfinite(x)
    if bad.any():
        i = int(np.argmax(bad))
        raise SparseInferError(f"{name}[{i}] = {x[i]}; int8 activations need a finite x")
    blocks = x.reshape(-1, BLOCK)
    scales = (np.abs(blocks).max(axis=1) / _F32(Q8_MAX)).astype(_F32)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = (blocks / scales[:, None]).astype(_F32)
    codes = np.clip(np.rint(ratio), -Q8_MAX, Q8_MAX)
    codes[scales == 0] = 0
    return codes.astype(np.int8).reshape(-1), scales


def q8_row_dots(blocks, fmt, d: int, codes, scales, name: str = "weights") -> np.ndarray:
    """z [rows] float32: each row of ``blocks`` (uint8 [rows, d / 32 * block_bytes]) times the
    quantized x (``quantize_activation``'s codes and scales), in the contract's order."""
    fmt = block_format(fmt)
    dw, mw, c = fields_and_codes(blocks, fmt, d, name)
    rows, nb = dw.shape
    xq = np.asarray(codes, dtype=np.int32).reshape(nb, BLOCK)
    xs = np.asarray(scales, dtype=_F32)
    n = (c * xq[None]).reshape(rows, nb, GROUPS, Q8_GROUP).sum(axis=-1).astype(_F32)
    terms = (dw * xs[None])[..., None] * n                        # fl(fl(D s) n)
    if mw is not None:
        u = xq.reshape(nb, GROUPS, Q8_GROUP).sum(axis=-1).astype(_F32)
        terms = terms + (mw * xs[None])[..., None] * u[None]       # + fl(fl(M s) u)
    acc = np.zeros((rows, Q8_LANES), dtype=_F32)
    for b in range(nb):
        lanes = slice(GROUPS * (b % 2), GROUPS * (b % 2) + GROUPS)
        acc[:, lanes] += terms[:, b]
    for offset in Q8_BUTTERFLY:
        acc[:, :offset] = acc[:, :offset] + acc[:, offset:2 * offset]
    return acc[:, 0].copy()
