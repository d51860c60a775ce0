"""kernels/cuda/activation.h, the one C/C++ text of the gate activations (the CUDA kernels and the
op library's CPU kernel include it), against reference/activations.py: compiled by g++ as host
C++ (the op library's flags) and in the kernels' device spelling on the CPU emulator, its codes
and names are KINDS' and every activation, exp and the reciprocal give the reference's bits on
float32 inputs from +-0 and subnormals to the largest floats, over every branch's edges."""
from __future__ import annotations

import ctypes
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from sparseinfer.kernels import emulator
from sparseinfer.kernels.sources import COMPILE_OPTIONS
from sparseinfer.model_export import op_library
from sparseinfer.reference.activations import EXACT_ZERO_KINDS, KINDS, Activation, exp_nonpositive, recip

HEADER_DIR = op_library.KERNELS_CUDA_DIR
HEADER = HEADER_DIR / "activation.h"
ROOT = Path(__file__).resolve().parents[1]

# A shared library over the header: its codes, names and functions for ctypes.
PROBE = r"""
#include "activation.h"

#define PROBE extern "C" __attribute__((visibility("default")))

PROBE int probe_kind_count() { return ACT_KIND_COUNT; }
PROBE const char* probe_name(int code) { return ACT_NAMES[code]; }
PROBE int probe_exact_zeros(int code) { return act_exact_zeros(code) ? 1 : 0; }
PROBE void probe_activate(int kind, float threshold, const float* z, float* h, long n) {
    for (long i = 0; i < n; ++i) h[i] = activate(z[i], kind, threshold);
}
PROBE void probe_exp(const float* x, float* y, long n) {
    for (long i = 0; i < n; ++i) y[i] = act_exp_nonpositive(x[i]);
}
PROBE void probe_recip(const float* w, float* r, long n) {
    for (long i = 0; i < n; ++i) r[i] = act_recip(w[i]);
}
"""
DEFINES = tuple(o for o in COMPILE_OPTIONS if o.startswith("-D"))
# host: the op library's CPU flags (-O3 -march=native, no FMA contraction, no fast math);
# emulated: the emulator's, with cpu_emulation.h first (__device__, __fadd_rn, __fmul_rn).
BUILDS = {
    "host": ("", (*op_library.CXX_FLAGS, "-shared")),
    "emulated": ('#include "cpu_emulation.h"\n', emulator.CXX_FLAGS),
}
FATRELU_THRESHOLDS = (0.01, 0.0, -0.5, 0.25, 3.0e-39)


@pytest.fixture(scope="module", params=list(BUILDS))
def probe(request, tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("no g++ on PATH to compile activation.h")
    prelude, flags = BUILDS[request.param]
    folder = tmp_path_factory.mktemp(f"activation-{request.param}")
    src = folder / "probe.cpp"
    src.write_text(prelude + PROBE)
    lib = folder / "probe.so"
    cmd = ["g++", *flags, *DEFINES, f"-I{HEADER_DIR}", str(src), "-o", str(lib)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stderr[-3000:]}"
    dll = ctypes.CDLL(str(lib))
    dll.probe_name.restype = ctypes.c_char_p
    floats = np.ctypeslib.ndpointer(np.float32, flags="C_CONTIGUOUS")
    dll.probe_activate.argtypes = [ctypes.c_int, ctypes.c_float, floats, floats, ctypes.c_long]
    dll.probe_exp.argtypes = dll.probe_recip.argtypes = [floats, floats, ctypes.c_long]
    return dll


def _call(fn, *head, x):
    out = np.full_like(x, np.nan)
    fn(*head, x, out, x.size)
    return out


def _assert_same_bits(got: np.ndarray, want: np.ndarray, x: np.ndarray, what: str) -> None:
    """Bit for bit; a NaN (gelu of -inf) matches any NaN."""
    nan = np.isnan(want)
    assert (np.isnan(got) == nan).all(), f"{what}: NaN where the reference has none, or none where it has"
    differ = got.view(np.uint32) != want.view(np.uint32)
    differ &= ~nan
    if differ.any():
        i = np.flatnonzero(differ)[:5]
        raise AssertionError(f"{what}: {int(differ.sum())} of {x.size} differ, e.g. x = {x[i].tolist()}: "
                             f"header {got[i].tolist()}, reference {want[i].tolist()}")


def _sample_z() -> np.ndarray:
    """Zeros, subnormals, the normal range's ends, the largest floats and infinities, every
    branch's edge in z (gelu's v = 0.75, 2.5, 10.1; exp's -104 and its subnormal steps) a few
    ulp either side, and random values: uniform, normal, log-uniform and random bit patterns."""
    rng = np.random.default_rng(24)
    f32 = np.float32
    tiny = np.finfo(f32).tiny
    special = [0.0, 1e-45, 2e-45, tiny / 2, tiny - 1e-45, tiny, 2 * tiny, 1e-38, 1e-30, 1e-10, 1e-4, 0.01, 0.5, 1.0,
               2.0, 10.0, 87.0, 88.7, 103.9, 104.0, 104.1, 120.0, 1e10, 1e19, 1e20, 1e30, np.finfo(f32).max, np.inf]
    edges = [e * math.sqrt(2) for e in (0.75, 2.5, 10.1)] + [69.3, 100 * math.log(2), 104.0, 104 / 1.59576917]
    steps = np.concatenate([f32(e) + np.arange(-64, 65, dtype=f32) * np.spacing(f32(e)) for e in edges])
    bits = rng.integers(0, 2 ** 32, 60_000, dtype=np.uint64).astype(np.uint32).view(f32)
    values = np.concatenate([np.float32(special), steps, rng.uniform(-20, 20, 60_000),
                             3 * rng.standard_normal(30_000), np.exp(rng.uniform(-103, 88, 30_000)),
                             bits[np.isfinite(bits)]]).astype(f32)
    return np.concatenate([values, -values])


def test_the_codes_and_names_are_the_references(probe):
    count = probe.probe_kind_count()
    names = [probe.probe_name(code).decode() for code in range(count)]
    assert names == list(KINDS)                       # code i is KINDS[i]: Activation.code
    assert [bool(probe.probe_exact_zeros(code)) for code in range(count)] == [k in EXACT_ZERO_KINDS for k in KINDS]


@pytest.mark.parametrize("spec", [k for k in KINDS if k != "fatrelu"] + [f"fatrelu:{t!r}" for t in FATRELU_THRESHOLDS])
def test_every_activation_has_the_references_bits(probe, spec):
    act = Activation.parse(spec)
    z = _sample_z()
    if act.kind == "fatrelu":                          # z at the threshold and its neighbours
        t = np.float32(act.threshold)
        z = np.concatenate([z, [t, np.nextafter(t, np.float32(1)), np.nextafter(t, np.float32(-1)), -t]]).astype(
            np.float32)
    with np.errstate(all="ignore"):
        want = act(z).astype(np.float32)
    got = _call(probe.probe_activate, act.code, np.float32(act.threshold), x=z)
    _assert_same_bits(got, want, z, str(act))
    assert np.count_nonzero(want) > z.size // 3       # not a vacuous comparison of zeros


def test_exp_and_the_reciprocal_have_the_references_bits(probe):
    rng = np.random.default_rng(7)
    x = np.concatenate([-np.abs(_sample_z()), -rng.uniform(0, 110, 100_000), [-0.0, -np.inf]]).astype(np.float32)
    with np.errstate(all="ignore"):
        want = exp_nonpositive(x)
    _assert_same_bits(_call(probe.probe_exp, x=x), want, x, "exp_nonpositive")
    assert ((want > 0) & (want < np.finfo(np.float32).tiny)).sum() > 100     # the subnormal steps are met
    w = np.concatenate([np.linspace(0.5, 2.6, 100_001), rng.uniform(0.5, 2.6, 50_000)]).astype(np.float32)
    _assert_same_bits(_call(probe.probe_recip, x=w), recip(w), w, "recip")


def test_no_other_c_source_defines_the_activations():
    """One text: the codes, the names and the polynomials live in activation.h alone."""
    marks = ("1.12837923f", "0.302261204f", "0.564191163f", "0.000198412701f", "1.41176474f", '"gelu_tanh"',
             "ACT_GELU_TANH =")
    former = ("#define ACT_RELU", "SPARSEINFER_ACT_", "kGeluTanh", "kActivationNames")     # the copies there were
    sources = [p for folder in (ROOT / "kernels" / "cuda", ROOT / "model_export" / "native")
               for p in sorted(folder.iterdir()) if p.suffix in (".h", ".cuh", ".cu", ".cc")]
    assert HEADER in sources and len(sources) > 10
    for path in sources:
        text = path.read_text()
        found = [m for m in marks + former if m in text]
        if path == HEADER:
            assert found == list(marks), found
        else:
            assert not found, f"{path.name} repeats activation.h: {found}"
            assert not re.search(r"\bexp_nonpositive\s*\(float", text), path.name
