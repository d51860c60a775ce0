"""Builds, caches and finds the native op library (``native/``: ``sparse_mlp_op.cc`` registers
its ops, ``SparseMLP`` on float or block-quantized weights and ``BlockMatMul``; ``OP_SOURCES``
are its files).

One shared library per flavour, loadable by any onnxruntime host with
``SessionOptions.register_custom_ops_library(path)``:

* ``cpu``: the op's C++ CPU kernel (g++), always built;
* ``cuda``: the same plus the CUDA-provider kernel, whose launcher (``native/sparse_mlp_cuda.cu``,
  nvcc) runs ``kernels/cuda``'s sources; built where nvcc and the CUDA runtime's static
  library exist, CUDA runtime linked statically.

Both are compiled with the order contract's constants as ``-D`` defines (from
``reference/order_contract.py`` through ``kernels/sources.COMPILE_OPTIONS``: one place for
each fact), no FMA contraction and no fast math, and cached under
``~/.cache/sparseinfer/ops/`` (``SPARSEINFER_OPS_CACHE``) keyed by the sources, flags,
compiler versions, onnxruntime headers and this CPU's features; a library is written under a
temporary name and renamed into place, so a cache entry is whole or absent.

onnxruntime's C API headers are in no PyPI wheel. They are looked for in
``ORT_INCLUDE_DIR``, then a system install, then the cache, and otherwise fetched once from
Debian's ``libonnxruntime-dev`` (suite trixie, C API 21) into the cache. Nothing is installed:
``apt-get`` runs only ``update`` and ``download``, under a private apt state (its own sources
list naming this machine's Debian mirror, its own lists and cache, no lock taken), and the
downloaded package is unpacked with ``dpkg-deb -x`` into a temporary folder, from which the
headers are copied; the system's packages, package lists and apt state are left as they
were. Where that fetch cannot run (no apt-get or dpkg-deb, no network, no Debian mirror), the
error names the commands that fetch onnxruntime's own release archive by hand (``curl`` and
``tar``, into a folder of the user's) and the ``ORT_INCLUDE_DIR`` to set then
(``headers_by_hand``). The library asks the host for C API version 18 (``kApiVersion`` in the
op source), so onnxruntime >= 1.18 loads it.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import re
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sparseinfer.kernels.sources import COMPILE_OPTIONS
from sparseinfer.reference.alpha import MAX_ALPHA_MILLI
from sparseinfer.reference.errors import SparseInferError

NATIVE_DIR = Path(__file__).parent / "native"
KERNELS_CUDA_DIR = Path(__file__).resolve().parent.parent / "kernels" / "cuda"
DOMAIN = "ai.sparseinfer"          # the custom ops' domain and names: the graph's nodes and functions (mlp_functions,
OP_TYPE = "SparseMLP"              # export) and, as -D defines, the library that registers them (DEFINES)
BLOCK_MATMUL_TYPE = "BlockMatMul"  # y = x W^T on block-quantized W (formats MatMulNBits cannot hold exactly)
# The op's files under native/: the translation units of every flavour, what they share, the
# CPU kernel's headers, and the cuda flavour's: its op kernel (g++) and the launcher (nvcc).
OP_SOURCES = ("sparse_mlp_op.cc", "op_checks.cc", "op_kernel_cpu.cc", "op_block_matmul.cc", "op_cpu_features.cc")
OP_HEADERS = ("op_common.h",)
CPU_HEADERS = ("sparse_mlp_cpu.h", "block_quant_cpu.h", "q8_activation_cpu.h")
CUDA_OP_SOURCE = "op_kernel_cuda.cc"
CUDA_SOURCES = ("sparse_mlp_cuda.cu", "sparse_mlp_cuda.h")
# The gate activations, one text for the CPU kernel and the CUDA kernels (sparse_mlp_cpu.h
# includes it from the package's kernels/cuda).
ACTIVATION_HEADER = "activation.h"
ORT_HEADER = "onnxruntime_c_api.h"
DEBIAN_PACKAGE = "libonnxruntime-dev"
DEBIAN_SUITE = "trixie"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
CACHE_ENV = "SPARSEINFER_OPS_CACHE"
INCLUDE_ENV = "ORT_INCLUDE_DIR"
# onnxruntime's own release archives (headers and library), for fetching the headers by hand
ORT_RELEASES = "https://github.com/microsoft/onnxruntime/releases/download"
ORT_RELEASE_ARCH = {"x86_64": "x64", "amd64": "x64", "aarch64": "aarch64", "arm64": "aarch64"}

DEFINES = (*(o for o in COMPILE_OPTIONS if o.startswith("-D")),
           f"-DSPARSEINFER_MAX_ALPHA_MILLI={MAX_ALPHA_MILLI}",       # the op checks alpha_milli against it
           f'-DSPARSEINFER_OP_DOMAIN="{DOMAIN}"', f'-DSPARSEINFER_OP_TYPE="{OP_TYPE}"',
           f'-DSPARSEINFER_BLOCK_MATMUL_TYPE="{BLOCK_MATMUL_TYPE}"')
CXX_FLAGS = ("-std=c++17", "-O3", "-march=native", "-ffp-contract=off", "-fno-fast-math", "-fPIC",
             "-fvisibility=hidden", "-Wall", "-Wextra")
# nvcc: the NVRTC options of the kernels (no FMA, no flush-to-zero, IEEE division and sqrt)
# in nvcc's spelling, and machine code for the data-centre GPUs the kernels are tuned for.
NVCC_FLAGS = ("-std=c++17", "-O3", "-Xcompiler", "-fPIC", "--fmad=false", "-ftz=false", "-prec-div=true",
              "-prec-sqrt=true", "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
              "-gencode", "arch=compute_90,code=compute_90")


NO_GXX = "no g++ on PATH: the op library needs a C++17 compiler"


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "sparseinfer" / "ops")


def _run(cmd, what: str, cwd=None) -> str:
    try:
        done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd)
    except OSError as e:
        raise SparseInferError(f"{what}: cannot run {cmd[0]}: {e.strerror}") from None
    if done.returncode:
        lines = [ln for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
        first = next((ln for ln in lines if "error" in ln.lower()), lines[0] if lines else f"exit {done.returncode}")
        raise SparseInferError(f"{what} failed: {first.strip()}")
    return done.stdout


# --- onnxruntime's headers ---------------------------------------------------------------

def _has_header(d: Path) -> bool:
    return (d / ORT_HEADER).is_file()


def header_api_version(include: Path) -> int:
    m = re.search(r"#define\s+ORT_API_VERSION\s+(\d+)", (include / ORT_HEADER).read_text())
    if not m:
        raise SparseInferError(f"{include / ORT_HEADER}: no ORT_API_VERSION")
    return int(m.group(1))


def _debian_mirror() -> str:
    """The Debian mirror this machine's apt is configured with (deb822 or one-line form)."""
    for f in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")) + [Path("/etc/apt/sources.list")]:
        try:
            text = f.read_text()
        except OSError:
            continue
        for m in re.finditer(r"^(?:URIs:\s*|deb\s+(?:\[[^\]]*\]\s+)?)(\S+)", text, re.MULTILINE):
            uri = m.group(1)
            if uri.rstrip("/").endswith("/debian"):
                return uri.rstrip("/")
    return DEFAULT_MIRROR


def headers_by_hand(folder: Path) -> str:
    """The shell commands that put onnxruntime's C API headers under ``folder`` (onnxruntime's
    own release archive for this machine and the installed onnxruntime's version, from GitHub;
    nothing installed) and the ``ORT_INCLUDE_DIR`` to set then: one line to paste into a shell."""
    import onnxruntime

    version = onnxruntime.__version__.split("+")[0]
    machine = platform.machine().lower()
    name = f"onnxruntime-linux-{ORT_RELEASE_ARCH.get(machine, machine)}-{version}"
    where = shlex.quote(str(folder))
    return (f"to get them by hand: mkdir -p {where} && curl -fsSL {ORT_RELEASES}/v{version}/{name}.tgz "
            f"| tar -xz -C {where} && export {INCLUDE_ENV}={shlex.quote(str(folder / name / 'include'))}")


def fetch_headers(dest: Path) -> Path:
    """onnxruntime's C API headers fetched from Debian into ``dest`` (``_fetch_debian_headers``);
    where that cannot run, an error that says nothing was installed and names the commands
    that get them by hand (``headers_by_hand``, beside ``dest``)."""
    try:
        return _fetch_debian_headers(dest)
    except SparseInferError as e:
        raise SparseInferError(f"{e}; nothing was installed; {headers_by_hand(dest.parent)}") from None


def _fetch_debian_headers(dest: Path) -> Path:
    """Download libonnxruntime-dev from Debian trixie under a private apt state (``apt-get update``
    and ``apt-get download`` only: no package is installed) and unpack it with ``dpkg-deb -x``."""
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise SparseInferError(f"onnxruntime's C API headers ({ORT_HEADER}) not found, and no {tool} to fetch "
                                   f"them from Debian's {DEBIAN_PACKAGE}")
    keyring = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
    signed = f"[signed-by={keyring}] " if keyring.is_file() else ""
    with tempfile.TemporaryDirectory(prefix="sparseinfer-apt-") as tmp:
        t = Path(tmp)
        for sub in ("lists/partial", "cache/archives/partial", "deb"):
            (t / sub).mkdir(parents=True)
        (t / "sources.list").write_text(f"deb {signed}{_debian_mirror()} {DEBIAN_SUITE} main\n")
        opts = [f"-oDir::Etc::SourceList={t / 'sources.list'}", "-oDir::Etc::SourceParts=/dev/null",
                f"-oDir::State::Lists={t / 'lists'}", f"-oDir::Cache={t / 'cache'}", "-oDebug::NoLocking=1",
                "-oAPT::Sandbox::User=root", "-qq"]
        _run(["apt-get", *opts, "update"], f"apt-get update (Debian {DEBIAN_SUITE}, for {DEBIAN_PACKAGE})")
        _run(["apt-get", *opts, "download", DEBIAN_PACKAGE], f"apt-get download {DEBIAN_PACKAGE}", cwd=t / "deb")
        debs = sorted((t / "deb").glob(f"{DEBIAN_PACKAGE}_*.deb"))
        if not debs:
            raise SparseInferError(f"apt-get download {DEBIAN_PACKAGE} wrote no .deb")
        unpacked = t / "root"
        _run(["dpkg-deb", "-x", debs[-1], unpacked], f"dpkg-deb -x {debs[-1].name}")
        include = unpacked / "usr" / "include" / "onnxruntime"
        if not _has_header(include):
            raise SparseInferError(f"{debs[-1].name} holds no {ORT_HEADER}")
        staged = dest.parent / f".{dest.name}.{os.getpid()}"
        shutil.rmtree(staged, ignore_errors=True)
        shutil.copytree(include, staged)
        (staged / "SOURCE").write_text(f"{debs[-1].name} from {_debian_mirror()} {DEBIAN_SUITE}\n")
        try:
            staged.rename(dest)
        except OSError:            # another process got there first
            shutil.rmtree(staged, ignore_errors=True)
    return dest


def ort_include_dir(fetch: bool = True) -> Path:
    """A folder holding onnxruntime_c_api.h: ORT_INCLUDE_DIR, a system install, the cache, or Debian's."""
    env = os.environ.get(INCLUDE_ENV)
    if env:
        if not _has_header(Path(env)):
            raise SparseInferError(f"{INCLUDE_ENV}={env}: no {ORT_HEADER} there")
        return Path(env)
    for d in (Path("/usr/include/onnxruntime"), Path("/usr/local/include/onnxruntime"),
              Path("/usr/include/onnxruntime/core/session"), Path("/usr/local/include")):
        if _has_header(d):
            return d
    cached = cache_root() / "include" / f"{DEBIAN_PACKAGE}-{DEBIAN_SUITE}"
    if _has_header(cached):
        return cached
    if not fetch:
        raise SparseInferError(f"onnxruntime's C API headers not found; set {INCLUDE_ENV} or run "
                               f"'sparseinfer build-ops'")
    cached.parent.mkdir(parents=True, exist_ok=True)
    return fetch_headers(cached)


# --- compilers ---------------------------------------------------------------------------

def _version(tool: str) -> str:
    return _run([tool, "--version"], f"{tool} --version").strip().splitlines()[-1 if tool.endswith("nvcc") else 0]


def _cpu_features() -> str:
    """What -march=native depends on: the CPU's model and flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        fields = [re.search(rf"^{k}\s*:\s*(.*)$", info, re.MULTILINE) for k in ("model name", "(?:flags|Features)")]
        return " | ".join(m.group(1) for m in fields if m) or platform.processor()
    except OSError:
        return platform.machine() + " " + platform.processor()


def find_nvcc() -> Path | None:
    found = shutil.which("nvcc")
    if found:
        return Path(found)
    for d in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if d and (Path(d) / "bin" / "nvcc").is_file():
            return Path(d) / "bin" / "nvcc"
    return None


def _cudart_static(nvcc: Path) -> Path | None:
    """The CUDA runtime's static library of nvcc's toolkit (nvcc may be a wrapper script)."""
    roots = [nvcc.resolve().parent.parent] + [Path(d) for d in (os.environ.get("CUDA_HOME"), "/usr/local/cuda") if d]
    for root in roots:
        for sub in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
            if (root / sub / "libcudart_static.a").is_file():
                return root / sub / "libcudart_static.a"
    return None


def cuda_unavailable_reason() -> str | None:
    """None where the CUDA part can be built here, else why not."""
    nvcc = find_nvcc()
    if nvcc is None:
        return "no nvcc on PATH, in CUDA_HOME or /usr/local/cuda: the CUDA kernel is not built"
    if _cudart_static(nvcc) is None:
        return f"no libcudart_static.a beside {nvcc}: the CUDA kernel is not built"
    if not (NATIVE_DIR / CUDA_SOURCES[0]).is_file():
        return f"{NATIVE_DIR / CUDA_SOURCES[0]} is missing"
    return None


# --- building ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Built:
    cpu: Path
    cuda: Path | None
    onnxruntime_api: int          # the C API version the library asks of the host
    headers_api: int              # ORT_API_VERSION of the headers it was built with
    reason: str | None            # why there is no CUDA library, if there is none

    def as_dict(self) -> dict:
        return {"cpu": str(self.cpu), "cuda": str(self.cuda) if self.cuda else None,
                "onnxruntime_api": self.onnxruntime_api, "headers_api": self.headers_api, "reason": self.reason}


def _key(parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def _sources(cuda: bool) -> dict[tuple[str, str], bytes]:
    """The bytes a flavour is built from, read once, by (folder, name): folder "native"
    (model_export/native) or "kernels" (kernels/cuda)."""
    native = (*OP_SOURCES, *OP_HEADERS, *CPU_HEADERS, *((CUDA_OP_SOURCE, *CUDA_SOURCES) if cuda else ()))
    kernels = sorted({p.name for p in KERNELS_CUDA_DIR.glob("*.cu*")} | {ACTIVATION_HEADER}) if cuda else \
        [ACTIVATION_HEADER]
    return {**{("native", n): (NATIVE_DIR / n).read_bytes() for n in native},
            **{("kernels", n): (KERNELS_CUDA_DIR / n).read_bytes() for n in kernels}}


def _source_key_parts(sources: dict) -> list:
    return [f"{folder}/{name}".encode() + data for (folder, name), data in sources.items()]


def _write_sources(sources: dict, root: Path) -> tuple[Path, Path]:
    """The sources written under ``root`` (the build compiles these, never the tree, so a source
    edited during a build cannot end up under another text's key): (native dir, kernels dir)."""
    dirs = {"native": root / "model_export" / "native", "kernels": root / "kernels" / "cuda"}   # the tree's layout:
    for (folder, name), data in sources.items():                                            # relative includes hold
        dirs[folder].mkdir(parents=True, exist_ok=True)
        (dirs[folder] / name).write_bytes(data)
    return dirs["native"], dirs["kernels"]


def _publish(tmp: Path, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, dest)
    return dest


def _cxx_flags(include: Path, *defines, native: Path = NATIVE_DIR) -> list:
    return [*CXX_FLAGS, *DEFINES, *defines, f"-I{include}", f"-I{native}"]


def cpu_compile_command(gxx, include: Path, out, defines=(), native: Path = NATIVE_DIR) -> list:
    """g++ on the op's sources (in ``native``) into the CPU library (the build's call; a test adds
    ``defines``)."""
    return [gxx, *_cxx_flags(include, *defines, native=native), "-shared", *(native / name for name in OP_SOURCES),
            "-o", out]


def _build_cpu(include: Path) -> Path:
    gxx = shutil.which("g++")
    if gxx is None:
        raise SparseInferError(NO_GXX)
    sources = _sources(cuda=False)
    key = _key([*_source_key_parts(sources), *_cxx_flags(include), _version(gxx), _cpu_features(),
                (include / ORT_HEADER).read_bytes()])
    dest = cache_root() / key / "libsparseinfer_ops.so"
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        native, _ = _write_sources(sources, Path(tmp) / "src")
        out = Path(tmp) / dest.name
        _run(cpu_compile_command(gxx, include, out, native=native), "building the CPU op library (g++)")
        return _publish(out, dest)


def launcher_compile_command(nvcc, out, native: Path = NATIVE_DIR, kernels: Path = KERNELS_CUDA_DIR) -> list:
    """nvcc on the CUDA launcher, to an object (the build's call; the tests' compile gate adds ptxas flags)."""
    return [nvcc, *NVCC_FLAGS, *DEFINES, f"-I{kernels}", f"-I{native}", "-c", native / CUDA_SOURCES[0], "-o", out]


def _build_cuda(include: Path) -> Path:
    nvcc, gxx = find_nvcc(), shutil.which("g++")
    cudart = _cudart_static(nvcc)
    sources = _sources(cuda=True)
    nv_flags = launcher_compile_command(nvcc, "launch.o", Path("native"), Path("kernels"))
    cc_flags = _cxx_flags(include, "-DSPARSEINFER_WITH_CUDA", native=Path("native"))
    key = _key([*_source_key_parts(sources), *nv_flags[1:], *cc_flags, _version(gxx), _version(str(nvcc)),
                _cpu_features(), (include / ORT_HEADER).read_bytes(), cudart.stat().st_size])
    dest = cache_root() / key / "libsparseinfer_ops_cuda.so"
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        t = Path(tmp)
        native, kernels = _write_sources(sources, t / "src")
        _run(launcher_compile_command(nvcc, t / "launch.o", native, kernels), "building the CUDA launcher (nvcc)")
        out = t / dest.name
        _run([gxx, *_cxx_flags(include, "-DSPARSEINFER_WITH_CUDA", native=native), "-shared",
              *(native / name for name in (*OP_SOURCES, CUDA_OP_SOURCE)), t / "launch.o", cudart, "-lpthread", "-ldl",
              "-lrt", "-o", out], "building the CUDA op library (g++)")
        return _publish(out, dest)


def build(cuda: bool | None = None) -> Built:
    """Build (or find in the cache) the libraries. ``cuda``: True = required, None = where possible."""
    include = ort_include_dir()
    cpu = cpu_library()
    reason = cuda_unavailable_reason() if cuda is not False else "not requested (--no-cuda)"
    if cuda and reason:
        raise SparseInferError(reason)
    cuda_path = cuda_library() if reason is None else None
    return Built(cpu, cuda_path, library_api_version(cpu), header_api_version(include), reason)


def library_api_version(path: Path) -> int:
    return int(ctypes.CDLL(str(path)).sparseinfer_ops_api_version())


_built: dict[str, Path] = {}        # flavour -> library, once per process (the key costs compiler calls)


def _library(flavour: str, build_with) -> Path:
    path = _built.get(flavour)
    if path is None or not path.is_file():
        path = _built[flavour] = build_with(ort_include_dir())
    return path


def cpu_library() -> Path:
    """The CPU library's path, built on first use in this process (cached across processes)."""
    return _library("cpu", _build_cpu)


def unavailable_reason() -> str | None:
    """Why the CPU library cannot be built here (no g++, onnxruntime's headers out of reach), or
    None where its prerequisites are present: there a failing build is an error to report (the
    tests that need the library then fail on it), not a reason to do without the library."""
    if shutil.which("g++") is None:
        return NO_GXX
    try:
        ort_include_dir()
    except SparseInferError as e:
        return str(e)
    return None


def cuda_library() -> Path:
    """The CUDA flavour's path (both kernels), built on first use in this process, as cpu_library."""
    reason = cuda_unavailable_reason()
    if reason:
        raise SparseInferError(reason)
    return _library("cuda", _build_cuda)


def counters(path: Path, reset: bool = False) -> dict:
    """The CPU kernel's process-wide counts since the last reset (decode steps, rows, skipped, computed)."""
    lib = ctypes.CDLL(str(path))
    out = (ctypes.c_int64 * 4)()
    lib.sparseinfer_ops_counters(out, int(reset))
    steps, rows, skipped, computed = out
    return {"decode_steps": steps, "rows": rows, "rows_skipped": skipped, "rows_computed": computed}
