"""CuPy, imported lazily, and weights laid out on the device.

Importing ``sparseinfer.kernels`` never imports CuPy; :func:`cupy` does, on first use,
whichever wheel provides it (cupy-cuda12x, cupy-cuda13x). CuPy has no bfloat16, so
16-bit weights live on the device as their raw uint16 bits (the kernels widen them
exactly); :class:`DeviceMatrix` remembers the real dtype. Block-quantized weights live on the
device as their GGUF bytes (:class:`DeviceBlocks`).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np

from sparseinfer.reference.block_quant import BlockFormat, block_format, check_blocks
from sparseinfer.reference.dtypes import SIGN_PACK_DTYPES, check_dtype, check_no_nan, dtype_name
from sparseinfer.reference.errors import SparseInferError
from sparseinfer.reference.order_contract import vector_width

from . import module_cache
from .sources import COMPILE_OPTIONS, KERNELS, source


# SPARSEINFER_CUPY_POOL=off: every buffer is its own cudaMalloc instead of a slice of CuPy's
# memory pool, so compute-sanitizer's memcheck sees an overrun at the buffer's own end (inside
# a pool slab it would land in a neighbour and pass unreported). Slower; for the sanitizer runs.
POOL_ENV = "SPARSEINFER_CUPY_POOL"


class GpuUnavailable(SparseInferError):
    """CuPy or a CUDA device is missing."""


def gpu_unavailable_reason() -> str | None:
    """None when CuPy and a device are usable, else one line saying why not."""
    try:
        cupy()
    except GpuUnavailable as e:
        return str(e)
    return None


@functools.lru_cache(maxsize=1)
def _cupy_module():
    pool = os.environ.get(POOL_ENV, "on")
    if pool not in ("on", "off"):
        raise SparseInferError(f"{POOL_ENV}={pool!r}: expected on or off")
    try:
        import cupy as cp
    except Exception as e:   # ImportError, or a wheel whose CUDA libraries fail to load
        raise GpuUnavailable(f"CuPy is not importable ({type(e).__name__}: {e}); "
                             "install cupy-cuda12x or cupy-cuda13x to run the kernels") from None
    try:
        n = cp.cuda.runtime.getDeviceCount()
    except Exception as e:
        raise GpuUnavailable(f"no CUDA device ({type(e).__name__}: {e})") from None
    if n < 1:
        raise GpuUnavailable("no CUDA device (CuPy sees 0 devices)")
    if pool == "off":
        cp.cuda.set_allocator(None)
    return cp


def cupy():
    """The ``cupy`` module, or GpuUnavailable with the reason."""
    return _cupy_module()


KERNEL_SOURCE = {name: src for src, names in KERNELS.items() for name in names}    # kernel -> its .cu


@functools.lru_cache(maxsize=None)
def _module(src: str):
    """Compile ``src`` with exactly COMPILE_OPTIONS and load it.

    Not ``RawModule(code=...)``: CuPy's cached compile appends ``-ftz=true`` after the
    caller's options (cupy/cuda/compiler.py), and the last one wins, so subnormals would be
    flushed and the kernels would differ from the reference (seen on an H200, 2026-11-26:
    a -1e-40 weight packed as a positive sign, a 2.4e-40 product as 0). CuPy's plain NVRTC
    call adds only the device's ``-arch`` (and ``--device-as-default-execution-space``), and
    has no disk cache: ``module_cache`` keeps the compiled bytes between processes.
    """
    cp = cupy()
    text = source(src)

    def compile_now() -> bytes:
        return cp.cuda.compiler.compile_using_nvrtc(text, COMPILE_OPTIONS, filename=src)[0]

    key = module_cache.cache_key(text, COMPILE_OPTIONS, cp.cuda.Device().compute_capability,
                                 cp.cuda.nvrtc.getVersion(), cp.cuda.runtime.driverGetVersion(), cp.__version__)
    compiled, from_cache = module_cache.cached_compile(key, compile_now)
    module = cp.cuda.function.Module()
    try:
        module.load(compiled)
    except Exception:
        if not from_cache:
            raise
        module = cp.cuda.function.Module()       # a cached file the driver refuses: compile afresh
        module.load(compile_now())
    return module


def kernel(name: str):
    """The compiled kernel ``name`` (compiled once per process)."""
    return _module(KERNEL_SOURCE[name]).get_function(name)


@functools.lru_cache(maxsize=None)
def occupancy(name: str, threads: int) -> tuple[int, int, str]:
    """(SMs, blocks of kernel ``name`` with ``threads`` each resident per SM, and where that
    figure comes from): the driver's occupancy for the kernel (registers, shared memory), or,
    where CuPy exposes no such call, the SM's thread limit ("thread limit")."""
    cp = cupy()
    attrs = cp.cuda.Device().attributes
    try:
        fn = kernel(name)
        ptr = fn.kernel.ptr if hasattr(fn, "kernel") else fn.ptr
        per_sm, source = int(cp.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(ptr, threads, 0)), "driver"
    except (AttributeError, TypeError):
        per_sm, source = int(attrs["MaxThreadsPerMultiProcessor"]) // threads, "thread limit"
    return int(attrs["MultiProcessorCount"]), max(per_sm, 1), source


def resident_blocks(name: str, threads: int) -> int:
    """Blocks of kernel ``name`` resident on the device at once, for grids sized to fill it once."""
    sms, per_sm, _ = occupancy(name, threads)
    return sms * per_sm


def _storage_dtype(dtype: np.dtype) -> np.dtype:
    return np.dtype(np.uint16) if dtype.itemsize == 2 else dtype


def padded_rows(a: np.ndarray) -> np.ndarray:
    """[rows, ld] of the storage dtype: ``a``'s bits, each row zero-padded to ``ld`` = cols
    rounded up to 16 bytes (so that every row starts 16-byte aligned)."""
    rows, cols = a.shape
    per_vector = vector_width(a.dtype)
    host = np.zeros((rows, -(-cols // per_vector) * per_vector), dtype=_storage_dtype(a.dtype))
    host[:, :cols] = a.view(host.dtype)
    return host


@dataclass
class DeviceRows:
    """Rows of a [rows, cols] matrix on the device: row i of ``data`` starts at element i * ``ld``."""

    data: object
    rows: int
    cols: int
    ld: int

    @property
    def shape(self) -> tuple:
        return (self.rows, self.cols)


@dataclass
class DeviceMatrix(DeviceRows):
    """A [rows, cols] matrix of dtype ``dtype`` stored row-major with row stride ``ld``.

    ``data`` is [rows, ld] of the storage dtype (raw uint16 bits for fp16/bf16). ``ld``
    is ``cols`` rounded up to 16 bytes, zero-padded, so that every row starts 16-byte
    aligned and the kernels can use vector loads on any d. A matrix whose rows lie inside
    wider records (``layout.record_views``) has ``data`` 1-D, from its first row's first
    element on: the kernels get that pointer and the stride ``ld``.
    """

    dtype: np.dtype

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.dtype)

    @classmethod
    def from_host(cls, name: str, a, allowed=SIGN_PACK_DTYPES, xp=None, check_nan: bool = True) -> "DeviceMatrix":
        """Check (2-D, dtype, no NaN) and upload; ``xp=numpy`` keeps it on the host (CPU tests).

        ``check_nan=False`` skips the NaN scan for callers that already made it (SparseMLP
        checks its weights in the Hugging Face layout, so its error names that index).
        """
        a = np.asarray(a)
        check_dtype(name, a, allowed)
        if a.ndim != 2 or 0 in a.shape:
            raise SparseInferError(f"{name} must be a non-empty 2-D matrix, got shape {a.shape}")
        if check_nan:
            check_no_nan(name, a)
        rows, cols = a.shape
        host = padded_rows(a)
        xp = cupy() if xp is None else xp
        return cls(xp.asarray(host), rows, cols, host.shape[1], dtype=a.dtype)

    def to_host(self) -> np.ndarray:
        data = self.data.get() if hasattr(self.data, "get") else np.asarray(self.data)
        if data.ndim == 1:            # rows inside wider records: row i at i * ld
            flat = np.zeros(self.rows * self.ld, data.dtype)
            used = min(data.size, flat.size)
            flat[:used] = data[:used]
            data = flat.reshape(self.rows, self.ld)
        return np.ascontiguousarray(data[:, :self.cols]).view(self.dtype)


@dataclass
class DeviceBlocks(DeviceRows):
    """A [rows, cols] matrix of block-quantized weights (``reference.block_quant``) on the device:
    ``data`` uint8 [rows, ld], each row its cols / 32 blocks of format ``fmt`` as a GGUF file holds
    them, ``ld`` = the row's bytes (every block 2-byte aligned: the kernels read its fields with
    1- and 2-byte loads, so no padding is needed)."""

    fmt: BlockFormat

    @property
    def dtype_name(self) -> str:
        return self.fmt.name

    @classmethod
    def from_host(cls, name: str, blocks, fmt, cols: int, xp=None) -> "DeviceBlocks":
        """Check (``block_quant.check_blocks``: shape, finite scales and mins) and upload; ``xp=numpy``
        keeps it on the host."""
        fmt = block_format(fmt)
        check_blocks(blocks, fmt, name, cols)
        host = np.ascontiguousarray(blocks)
        xp = cupy() if xp is None else xp
        return cls(xp.asarray(host), host.shape[0], cols, host.shape[1], fmt=fmt)

    def to_host(self) -> np.ndarray:
        return np.asarray(self.data.get() if hasattr(self.data, "get") else self.data)
