"""Supported element types, in one place.

Weights may be float32, float16 or bfloat16 (via ml_dtypes); activations are float32.
Sign packing additionally accepts int8 (quantised weights).
"""
from __future__ import annotations

import ml_dtypes
import numpy as np

from .errors import SparseInferError

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)

WEIGHT_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), BFLOAT16)
SIGN_PACK_DTYPES = WEIGHT_DTYPES + (np.dtype(np.int8),)

_NAMES = {np.dtype(np.float32): "fp32", np.dtype(np.float16): "fp16", BFLOAT16: "bf16",
          np.dtype(np.int8): "int8"}
WEIGHT_DTYPE_NAMES = tuple(_NAMES[dt] for dt in WEIGHT_DTYPES)        # fp32, fp16, bf16
SIGN_PACK_DTYPE_NAMES = tuple(_NAMES[dt] for dt in SIGN_PACK_DTYPES)  # + int8


def dtype_name(dtype) -> str:
    """Short name used in traces, benchmark rows and file names: fp32, fp16, bf16, int8."""
    return _NAMES.get(np.dtype(dtype), str(np.dtype(dtype)))


def itemsize(name: str) -> int:
    """Bytes per element of a short dtype name (fp32 4, fp16 2, bf16 2, int8 1)."""
    return parse_dtype(name).itemsize


def parse_dtype(name: str) -> np.dtype:
    """Inverse of :func:`dtype_name` (also accepts numpy names such as 'float16')."""
    for dt, short in _NAMES.items():
        if name in (short, dt.name, str(dt)):
            return dt
    raise SparseInferError(f"unknown dtype {name!r}; expected one of {', '.join(_NAMES.values())}")


def check_dtype(name: str, a: np.ndarray, allowed) -> None:
    if a.dtype not in allowed:
        raise SparseInferError(
            f"{name} has dtype {a.dtype}; expected one of {', '.join(dtype_name(d) for d in allowed)}")


def first_nan_index(a: np.ndarray):
    """Index tuple of the first NaN in ``a`` (C order), or None. Integers never hold NaN."""
    if a.dtype.kind not in "fV" and a.dtype != BFLOAT16:
        return None
    bad = np.isnan(a.astype(np.float32, copy=False))
    if not bad.any():
        return None
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), a.shape))


def check_no_nan(name: str, a: np.ndarray) -> None:
    idx = first_nan_index(a)
    if idx is not None:
        raise SparseInferError(f"{name} contains NaN at index {idx if len(idx) != 1 else idx[0]}")
