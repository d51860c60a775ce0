"""The CUDA kernels run on the CPU: the same sources, compiled with g++ against an emulation header.

``kernels/cuda/cpu_emulation.h`` maps the CUDA subset the kernels use (thread and block
indices, ``__shared__``, ``__syncthreads``, ``__ballot_sync``, ``__shfl_xor_sync``,
``atomicAdd``, the ``_rn`` intrinsics) onto fibers that switch at barriers. Each kernel source
becomes one shared library with a C entry point that takes the launch like
``cuLaunchKernel`` (grid, block, one pointer per argument), loaded with ctypes.

:func:`installed` (a context manager) makes :func:`sparseinfer.kernels.device.cupy`
return :data:`xp`, a small CuPy stand-in over NumPy, and the kernel launches go to the
emulated kernels, so the wrappers in ``ops.py``, ``SparseMLP``, the GPU tests and
``sparseinfer verify-kernels`` run unchanged.
What this checks: the kernels' logic, bit for bit against the reference. What it cannot:
timing, coalescing, the GPU's memory model, NVRTC's real options: a GPU run does those
(benchmarks/README.md).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import types
from pathlib import Path

import numpy as np

from sparseinfer.reference.errors import SparseInferError

from . import device
from .sources import COMPILE_OPTIONS, KERNELS, raw_text, source

CXX_FLAGS = ("-std=c++20", "-O2", "-shared", "-fPIC", "-ffp-contract=off", "-fno-fast-math",
             "-fno-strict-aliasing", "-w")
_DEFINES = tuple(o for o in COMPILE_OPTIONS if o.startswith("-D"))
# SPARSEINFER_EMULATOR_SANITIZE=address: the kernels are built with AddressSanitizer, the
# CPU's stand-in for compute-sanitizer's memcheck (out-of-bounds and use-after-free on
# global, __shared__ and local memory). The process must load libasan first:
# LD_PRELOAD=$(g++ -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 (see memcheck_env).
SANITIZE_ENV = "SPARSEINFER_EMULATOR_SANITIZE"


def _sanitize_flags() -> tuple:
    kind = os.environ.get(SANITIZE_ENV, "")
    if kind not in ("", "address"):
        raise SparseInferError(f"{SANITIZE_ENV}={kind!r}: only 'address' is supported")
    return ("-fsanitize=address", "-fno-omit-frame-pointer", "-g") if kind else ()


def memcheck_env() -> dict:
    """Environment for a subprocess whose emulated kernels run under AddressSanitizer."""
    lib = subprocess.run(["g++", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not lib or not Path(lib).exists():
        raise SparseInferError("g++ has no libasan.so: AddressSanitizer builds of the emulated kernels are unavailable")
    return {**os.environ, SANITIZE_ENV: "address", "LD_PRELOAD": lib,
            "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0:halt_on_error=1"}


def unavailable_reason() -> str | None:
    """None when a C++20 compiler (g++) is there to build the emulated kernels, else why not."""
    if shutil.which("g++") is None:
        return "no g++ on PATH to build the CPU emulation of the CUDA kernels"
    return None


_SHARED_DECLARATION = re.compile(r"(__shared__\s+[^;{}()]*?\b(\w+)\s*(?:\[[^\]]*\]\s*)*;)")


def poison_shared_declarations(text: str) -> str:
    """Each ``__shared__ T name[...];`` followed by ``emu::poison_shared(&name, sizeof(name));``
    (see cpu_emulation.h: every block starts with its shared memory poisoned)."""
    return _SHARED_DECLARATION.sub(lambda m: f"{m.group(1)} emu::poison_shared(&{m.group(2)}, sizeof({m.group(2)}));",
                                   text)


def _translation_unit(src: str) -> str:
    """Emulation header + the kernel source (shared memory poisoned per block) + a C entry
    point that launches any of its kernels."""
    branches = "\n".join(
        f'    if (!std::strcmp(name, "{k}")) return emu::launch_args(&{k}, grid, block, args);'
        for k in KERNELS[src])
    return (f"{raw_text('cpu_emulation.h')}\n{poison_shared_declarations(source(src))}\n"
            'extern "C" int sparseinfer_launch(const char* name, unsigned gx, unsigned gy, unsigned bx, void** args,\n'
            "                                  int reverse) {\n"
            "    const dim3 grid{gx, gy, 1}, block{bx, 1, 1};\n"
            "    emu::S.reverse = reverse != 0;\n"
            f"{branches}\n    return -1;\n}}\n")


@functools.lru_cache(maxsize=None)
def _library(src: str) -> ctypes.CDLL:
    reason = unavailable_reason()
    if reason:
        raise SparseInferError(reason)
    text = _translation_unit(src)
    flags = CXX_FLAGS + _sanitize_flags() + _DEFINES
    key = hashlib.sha256((text + " ".join(flags)).encode()).hexdigest()[:16]
    cache = Path(tempfile.gettempdir()) / "sparseinfer-emulated-kernels"
    lib = cache / f"{Path(src).stem}-{key}.so"
    if not lib.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        cpp = lib.with_suffix(".cpp")
        cpp.write_text(text)
        tmp = lib.with_suffix(f".{id(text)}.tmp")
        r = subprocess.run(["g++", *flags, str(cpp), "-o", str(tmp)], capture_output=True, text=True)
        if r.returncode != 0:
            first = next((line for line in r.stderr.splitlines() if "error" in line), r.stderr.strip()[:200])
            raise SparseInferError(f"emulated {src} does not compile: {first}")
        tmp.replace(lib)                       # atomic: concurrent test workers never load half a file
    dll = ctypes.CDLL(str(lib))
    dll.sparseinfer_launch.argtypes = [ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint,
                                       ctypes.POINTER(ctypes.c_void_p), ctypes.c_int]
    dll.sparseinfer_launch.restype = ctypes.c_int
    return dll


_SCALARS = {np.dtype(np.int32): ctypes.c_int32, np.dtype(np.int64): ctypes.c_int64,
            np.dtype(np.uint64): ctypes.c_uint64, np.dtype(np.float32): ctypes.c_float,
            np.dtype(np.uint32): ctypes.c_uint32}


def _c_argument(a):
    if isinstance(a, np.ndarray):
        if not a.flags.c_contiguous:
            raise SparseInferError("an emulated kernel got a strided array")
        return ctypes.c_void_p(a.ctypes.data)
    if isinstance(a, np.generic) and a.dtype in _SCALARS:
        return _SCALARS[a.dtype](a.item())
    raise SparseInferError(f"an emulated kernel got an argument of type {type(a).__name__}; "
                           "pass arrays or sized NumPy scalars, as for CuPy")


ORDER_ENV = "SPARSEINFER_EMULATOR_ORDER"      # forward (default) or reverse


def thread_order() -> str:
    """The order threads run in between barriers: forward (0, 1, ...) or reverse (last first)."""
    order = os.environ.get(ORDER_ENV, "forward")
    if order not in ("forward", "reverse"):
        raise SparseInferError(f"{ORDER_ENV}={order!r}: expected forward or reverse")
    return order


# What a GPU refuses at launch (cudaErrorInvalidConfiguration) and the emulation would not
# notice: an empty grid or block, more than 1024 threads, a grid past its limits.
MAX_THREADS_PER_BLOCK = 1024
MAX_GRID = (2**31 - 1, 65535)


def _check_launch(name: str, grid, block) -> None:
    threads = int(block[0])
    dims = [int(g) for g in grid[:2]]
    if not 1 <= threads <= MAX_THREADS_PER_BLOCK or any(not 1 <= g <= m for g, m in zip(dims, MAX_GRID)):
        raise SparseInferError(f"{name}: invalid launch configuration (grid {tuple(dims)}, block ({threads},)); "
                               f"a GPU takes 1-{MAX_THREADS_PER_BLOCK} threads per block and grids of "
                               f"1-{MAX_GRID[0]} x 1-{MAX_GRID[1]} blocks")


class EmulatedKernel:
    """Called like a CuPy RawKernel: ``kernel(grid, block, args)``."""

    def __init__(self, name: str, src: str):
        self.name, self.src = name, src

    def __call__(self, grid, block, args, shared_mem: int = 0):
        grid = tuple(grid) + (1,) * (2 - len(grid))
        if len(block) != 1 or grid[2:] not in ((), (1,)):
            raise SparseInferError(f"{self.name}: the emulator takes 1-D blocks and 2-D grids")
        _check_launch(self.name, grid, block)
        values = [_c_argument(a) for a in args]       # pointers and scalars fixed now, as a graph's are
        if _recording is not None:      # args kept alive, as the private pool keeps a graph's buffers
            _recording.append(lambda: self._launch(grid, block, values, args))
            return
        self._launch(grid, block, values)

    def _launch(self, grid, block, values, args=None):
        pointers = (ctypes.c_void_p * max(len(values), 1))(*[ctypes.addressof(v) for v in values])
        rc = _library(self.src).sparseinfer_launch(self.name.encode(), grid[0], grid[1], block[0], pointers,
                                                   int(thread_order() == "reverse"))
        if rc == -2:
            raise SparseInferError(f"emulated {self.name} deadlocked: threads of a warp or block diverged "
                                   "around a barrier, ballot or shuffle")
        if rc == -4:
            raise SparseInferError(f"emulated {self.name} ran a warp shuffle or ballot over all 32 lanes while some had "
                                   "exited or were never launched (undefined on a GPU)")
        if rc == -3:
            raise SparseInferError(f"emulated {self.name} read a misaligned address (a load or atomic not aligned "
                                   "to its size; a GPU faults with 'misaligned address')")
        if rc != 0:
            raise SparseInferError(f"no emulated kernel named {self.name}")


def kernel(name: str) -> EmulatedKernel:
    return EmulatedKernel(name, device.KERNEL_SOURCE[name])


# The emulated device's resident blocks: few, so that persistent kernels' warps stride over
# several rows each in the tests (a GPU has thousands of warps resident; here 2 x 8).
EMULATED_RESIDENT_BLOCKS = 2


def resident_blocks(name: str, threads: int) -> int:
    return EMULATED_RESIDENT_BLOCKS


# --- uninitialised memory and stream capture -------------------------------------------
# cupy.empty hands out memory with whatever the last user left in it; NumPy's often comes
# zeroed from the OS, which would hide a kernel that fails to write part of its output. So
# every emulated `empty` buffer starts as 0xFF bytes (NaN as float32, -1 / all ones as
# integers): a kernel that reads what nobody wrote gives wrong bits here, as on a GPU.
# While a stream records, launches and memsets are kept (pointers and scalars as they were
# given) instead of run, and a graph's launch runs them in order; reading device memory on
# the host is an error, as on a GPU.
_recording: list | None = None
_UNWRITTEN = 0xFF


class HostArray(np.ndarray):
    """A NumPy array that answers CuPy's ``.get()``."""

    def get(self):
        if _recording is not None:
            raise SparseInferError("a device-to-host copy (.get()) during CUDA graph capture")
        return np.array(self)

    def __matmul__(self, other):
        if _recording is not None:
            raise SparseInferError("the emulator cannot record cuBLAS (a matmul) in a CUDA graph")
        return super().__matmul__(other)


def _wrap(f):
    @functools.wraps(f)
    def call(*a, **k):
        out = f(*a, **k)
        return out.view(HostArray) if isinstance(out, np.ndarray) else out
    return call


def _empty(shape, dtype=np.float64):
    out = np.empty(shape, dtype).view(HostArray)
    out.reshape(-1).view(np.uint8).fill(_UNWRITTEN)
    return out


def _zeros(shape, dtype=np.float64):
    if _recording is None:
        return np.zeros(shape, dtype).view(HostArray)
    out = _empty(shape, dtype)
    _recording.append(lambda: out.fill(0))        # a memset node
    return out


class Graph:
    def __init__(self, nodes):
        self.nodes = nodes

    def launch(self, stream=None):
        for node in self.nodes:
            node()


class Stream:
    """A stream that runs everything at once, and can record."""

    def __init__(self, non_blocking: bool = False):
        self.capturing = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def synchronize(self):
        pass

    def begin_capture(self, mode=None):
        global _recording
        if _recording is not None:
            raise SparseInferError("a stream is already capturing")
        _recording, self.capturing = [], True

    def end_capture(self):
        global _recording
        if not self.capturing:
            raise SparseInferError("end_capture on a stream that is not capturing")
        nodes, _recording, self.capturing = _recording, None, False
        return Graph(nodes)


class MemoryPool:
    def malloc(self, size):
        raise SparseInferError("the emulator allocates NumPy arrays; its pool is never asked")


def _asarray(a, dtype=None):
    """As cupy.asarray: a host array is copied to the device; a device array is returned as is."""
    if isinstance(a, HostArray):
        return a if dtype is None or a.dtype == dtype else a.astype(dtype)
    return np.array(a, dtype=dtype, copy=True).view(HostArray)


xp = types.SimpleNamespace(
    **{name: _wrap(getattr(np, name)) for name in ("ascontiguousarray", "isnan", "argmax", "where")},
    asarray=_asarray, empty=_empty, zeros=_zeros,
    cuda=types.SimpleNamespace(Stream=Stream, Graph=Graph, MemoryPool=MemoryPool,
                               using_allocator=lambda allocator=None: contextlib.nullcontext(),
                               get_current_stream=Stream),
    **{name: getattr(np, name) for name in ("float32", "int32", "int64", "uint8", "uint16", "uint32", "uint64")})


@contextlib.contextmanager
def installed():
    """Within the block, ``device.cupy()`` and the kernel launches go to the emulator."""
    reason = unavailable_reason()
    if reason:
        raise SparseInferError(reason)
    from . import ops

    swaps = [(device, "_cupy_module", lambda: xp), (device, "kernel", kernel), (ops, "kernel", kernel),
             (device, "resident_blocks", resident_blocks)]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in swaps]
    for owner, name, value in swaps:
        setattr(owner, name, value)
    try:
        yield xp
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)
