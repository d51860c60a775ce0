"""Compile the kernel sources on a machine without a GPU: NVRTC to PTX, then ``ptxas -v``.

NVRTC is called through ctypes (no CuPy, no driver, no device needed); the library comes
from the pip package ``nvidia-cuda-nvrtc-cu12`` (part of the ``test`` extra), a CUDA
toolkit, or ``$SPARSEINFER_NVRTC``. ``ptxas`` comes from ``nvidia-cuda-nvcc-cu12``, the
PATH, ``$CUDA_HOME/bin`` or ``$SPARSEINFER_PTXAS``. The PTX is also checked against the
order contract: no fused multiply-add and no flush-to-zero on float32 arithmetic, and no
float32 mul/add without an explicit rounding mode (ptxas may contract those into FMA).
"""
from __future__ import annotations

import ctypes
import functools
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from sparseinfer.reference.errors import SparseInferError

from .sources import COMPILE_OPTIONS, KERNELS, source

ARCHS = (80, 87, 90)   # A100, Jetson Orin (the paper's device), H100


class ToolMissing(RuntimeError):
    """Neither NVRTC nor ptxas could be found (the gate skips with this message)."""


def _pip_nvidia_dirs() -> list[Path]:
    dirs = []
    for entry in sys.path:
        p = Path(entry or ".") / "nvidia"
        if p.is_dir():
            dirs.append(p)
    return dirs


def nvrtc_candidates() -> list[str]:
    found = []
    if os.environ.get("SPARSEINFER_NVRTC"):
        found.append(os.environ["SPARSEINFER_NVRTC"])
    for base in _pip_nvidia_dirs():
        found += sorted(glob.glob(str(base / "*" / "lib" / "libnvrtc.so*")), reverse=True)
        found += sorted(glob.glob(str(base / "*" / "*" / "lib" / "libnvrtc.so*")), reverse=True)
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            found += sorted(glob.glob(os.path.join(home, "lib64", "libnvrtc.so*")), reverse=True)
    return [f for f in found if "builtins" not in f and ".alt." not in f]


def ptxas_candidates() -> list[str]:
    found = []
    if os.environ.get("SPARSEINFER_PTXAS"):
        found.append(os.environ["SPARSEINFER_PTXAS"])
    for base in _pip_nvidia_dirs():
        found += glob.glob(str(base / "cuda_nvcc" / "bin" / "ptxas")) + glob.glob(str(base / "*" / "bin" / "ptxas"))
    if shutil.which("ptxas"):
        found.append(shutil.which("ptxas"))
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.isfile(os.path.join(home, "bin", "ptxas")):
            found.append(os.path.join(home, "bin", "ptxas"))
    return list(dict.fromkeys(f for f in found if os.access(f, os.X_OK)))


class Nvrtc:
    """Minimal ctypes binding: create, compile, log, PTX."""

    def __init__(self, path: str):
        self.path = path
        # NVRTC opens libnvrtc-builtins by soname at compile time; a pip wheel's folder (the
        # cu13 wheels' nvidia/cu13/lib) is not on the loader's path, so load it first by file.
        for builtins in sorted(glob.glob(os.path.join(os.path.dirname(path), "libnvrtc-builtins.so*"))):
            if ".alt." not in builtins:
                ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
        lib = ctypes.CDLL(path)
        self.lib = lib
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._ok(lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
        self.version = (major.value, minor.value)

    def _ok(self, status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"{what}: {self.lib.nvrtcGetErrorString(status).decode()}")

    def compile_ptx(self, text: str, name: str, options) -> tuple[str, str]:
        """(PTX, log); raises SparseInferError with the log on a compile error."""
        prog = ctypes.c_void_p()
        self._ok(self.lib.nvrtcCreateProgram(ctypes.byref(prog), text.encode(), name.encode(), 0, None, None),
                 "nvrtcCreateProgram")
        try:
            opts = [o.encode() for o in options]
            arr = (ctypes.c_char_p * len(opts))(*opts)
            status = self.lib.nvrtcCompileProgram(prog, len(opts), arr)
            size = ctypes.c_size_t()
            self._ok(self.lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)), "nvrtcGetProgramLogSize")
            buf = ctypes.create_string_buffer(size.value)
            self._ok(self.lib.nvrtcGetProgramLog(prog, buf), "nvrtcGetProgramLog")
            log = buf.value.decode(errors="replace")
            if status != 0:
                raise SparseInferError(f"NVRTC failed to compile {name}: {log.strip()}")
            self._ok(self.lib.nvrtcGetPTXSize(prog, ctypes.byref(size)), "nvrtcGetPTXSize")
            buf = ctypes.create_string_buffer(size.value)
            self._ok(self.lib.nvrtcGetPTX(prog, buf), "nvrtcGetPTX")
            return buf.value.decode(), log
        finally:
            self.lib.nvrtcDestroyProgram(ctypes.byref(prog))


@functools.lru_cache(maxsize=1)
def find_nvrtc() -> Nvrtc:
    errors = []
    for path in nvrtc_candidates():
        try:
            return Nvrtc(path)
        except (OSError, RuntimeError, AttributeError) as e:
            errors.append(f"{path}: {e}")
    raise ToolMissing("no usable NVRTC library (pip install nvidia-cuda-nvrtc-cu12, or set SPARSEINFER_NVRTC)"
                      + (f"; tried {'; '.join(errors)}" if errors else ""))


def find_ptxas() -> list[str]:
    found = ptxas_candidates()
    if not found:
        raise ToolMissing("no ptxas (pip install nvidia-cuda-nvcc-cu12, put a CUDA toolkit on PATH, or set SPARSEINFER_PTXAS)")
    return found


@dataclass
class KernelResources:
    name: str
    registers: int
    spill_store_bytes: int
    spill_load_bytes: int
    stack_bytes: int


@dataclass
class CompileReport:
    source: str
    arch: int
    nvrtc_version: tuple
    ptxas: str
    kernels: dict = field(default_factory=dict)     # name -> KernelResources
    entries: tuple = ()                              # .entry names in the PTX
    contract_violations: tuple = ()                  # PTX lines that break the order contract


_FUNC = re.compile(r"Function properties for (\w+)\s*\n\s*(\d+) bytes stack frame, (\d+) bytes spill stores, "
                   r"(\d+) bytes spill loads")
_REGS = re.compile(r"Compiling entry function '(\w+)'.*?Used (\d+) registers", re.S)
_ENTRY = re.compile(r"\.entry\s+(\w+)\s*\(")
# float32 code that breaks the contract: FMA, any instruction that flushes subnormals (an
# arithmetic op, or a comparison such as setp.lt.ftz.f32 that reads -1e-40 as 0), or a mul/add
# without a rounding mode, which ptxas may contract.
_BAD_F32 = re.compile(r"^\s*(?:@!?%p\d+\s+)?((?:fma|mad)\.[\w.]*f32|\w+\.[\w.]*ftz[\w.]*|"
                      r"(?:add|sub|mul)\.f32)\b", re.M)


def parse_ptxas(log: str) -> dict:
    regs = {m.group(1): int(m.group(2)) for m in _REGS.finditer(log)}
    out = {}
    for m in _FUNC.finditer(log):
        name = m.group(1)
        if name in regs:
            out[name] = KernelResources(name, regs[name], int(m.group(3)), int(m.group(4)), int(m.group(2)))
    return out


def contract_violations(ptx: str) -> tuple:
    return tuple(m.group(1) for m in _BAD_F32.finditer(ptx))


def ptx_to_cubin(ptx: str, arch: int) -> tuple[str, str, bytes]:
    """(ptxas path, its -v log, the cubin) from the first ptxas that accepts this PTX."""
    errors = []
    with tempfile.TemporaryDirectory() as tmp:
        src, cubin = Path(tmp) / "k.ptx", Path(tmp) / "k.cubin"
        src.write_text(ptx)
        for exe in find_ptxas():
            proc = subprocess.run([exe, "-v", f"-arch=sm_{arch}", str(src), "-o", str(cubin)],
                                  capture_output=True, text=True, timeout=120)
            if proc.returncode == 0:
                return exe, proc.stdout + proc.stderr, cubin.read_bytes()
            errors.append(f"{exe}: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    raise SparseInferError(f"ptxas rejected the PTX for sm_{arch}: {'; '.join(errors)}")


def run_ptxas(ptx: str, arch: int) -> tuple[str, str]:
    """(ptxas path, its -v log) from the first ptxas that accepts this PTX."""
    exe, log, _ = ptx_to_cubin(ptx, arch)
    return exe, log


@functools.lru_cache(maxsize=None)
def compile_source(name: str, arch: int) -> CompileReport:
    nvrtc = find_nvrtc()
    ptx, _ = nvrtc.compile_ptx(source(name), name, COMPILE_OPTIONS + (f"--gpu-architecture=compute_{arch}",))
    exe, log = run_ptxas(ptx, arch)
    return CompileReport(source=name, arch=arch, nvrtc_version=nvrtc.version, ptxas=exe, kernels=parse_ptxas(log),
                         entries=tuple(_ENTRY.findall(ptx)), contract_violations=contract_violations(ptx))


def compile_all(archs=ARCHS) -> list[CompileReport]:
    return [compile_source(name, arch) for name in KERNELS for arch in archs]
