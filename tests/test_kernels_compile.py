"""CPU compile gate: every kernel source compiles with NVRTC for sm_80, sm_87 and sm_90;
``ptxas -v`` reports registers and no spills in the hot kernels; the PTX keeps the order
contract (no FMA, no flush-to-zero). Skips, saying why, where NVRTC or ptxas is missing."""
from __future__ import annotations

import pytest

from sparseinfer.kernels import compile_check as cc
from sparseinfer.kernels.sources import HOT_KERNELS, KERNELS, source
from sparseinfer.reference.errors import SparseInferError


def _tools_or_skip():
    try:
        cc.find_nvrtc()
        cc.find_ptxas()
    except cc.ToolMissing as e:
        pytest.skip(f"compile gate skipped: {e}")


@pytest.mark.parametrize("arch", cc.ARCHS)
@pytest.mark.parametrize("name", list(KERNELS))
def test_source_compiles_without_spills(name, arch):
    _tools_or_skip()
    report = cc.compile_source(name, arch)
    assert set(report.entries) == set(KERNELS[name]), f"{name}: PTX entries {report.entries}"
    assert set(report.kernels) == set(KERNELS[name]), f"{name} sm_{arch}: ptxas reported {sorted(report.kernels)}"
    for kernel, res in report.kernels.items():
        assert 0 < res.registers <= 255, f"{kernel} sm_{arch}: {res.registers} registers"
        if kernel in HOT_KERNELS:
            assert res.spill_store_bytes == 0 and res.spill_load_bytes == 0, (
                f"{kernel} sm_{arch} spills: {res.spill_store_bytes} B stores, {res.spill_load_bytes} B loads "
                f"({res.registers} registers)")
    assert report.contract_violations == (), f"{name} sm_{arch}: PTX breaks the order contract: " \
                                             f"{report.contract_violations[:5]}"


def test_contract_check_catches_fma_and_ftz():
    _tools_or_skip()
    nvrtc = cc.find_nvrtc()
    code = 'extern "C" __global__ void f(float* a) { a[0] = a[1] * a[2] + a[3]; }'
    ptx, _ = nvrtc.compile_ptx(code, "f.cu", ("--gpu-architecture=compute_80",))
    assert any(v.startswith("fma") for v in cc.contract_violations(ptx))
    ptx, _ = nvrtc.compile_ptx(code, "f.cu", ("--gpu-architecture=compute_80", "--fmad=false", "--ftz=true"))
    assert any("ftz" in v for v in cc.contract_violations(ptx))
    # a comparison flushes too: under ftz a negative subnormal is not < 0 (pack_signs' test)
    sign = 'extern "C" __global__ void g(const float* a, int* s) { s[0] = a[0] < 0.0f; }'
    ptx, _ = nvrtc.compile_ptx(sign, "g.cu", ("--gpu-architecture=compute_80", "--ftz=true"))
    assert any(v.startswith("setp") and "ftz" in v for v in cc.contract_violations(ptx)), cc.contract_violations(ptx)
    ptx, _ = nvrtc.compile_ptx(sign, "g.cu", ("--gpu-architecture=compute_80", "--ftz=false"))
    assert cc.contract_violations(ptx) == ()


def test_runtime_compiles_with_exactly_the_gated_options(monkeypatch, tmp_path):
    """The device path hands NVRTC COMPILE_OPTIONS and nothing that overrides them, and
    those options pass the gate. CuPy's ``RawModule(code=...)`` would append -ftz=true.
    The compiled bytes are kept on disk: a second process loads them without NVRTC."""
    _tools_or_skip()
    from types import SimpleNamespace

    from sparseinfer.kernels import device
    from sparseinfer.kernels.module_cache import CACHE_ENV
    from sparseinfer.kernels.sources import COMPILE_OPTIONS

    calls, loaded = [], []

    def compile_using_nvrtc(src, options=(), arch=None, filename="kern.cu", **kw):
        calls.append((src, tuple(options), filename))
        return b"CUBIN:" + filename.encode(), None

    class Module:
        refuse = 0             # loads to refuse, as a driver refuses an image it cannot run

        def load(self, data):
            if Module.refuse:
                Module.refuse -= 1
                raise RuntimeError("CUDA_ERROR_INVALID_IMAGE")
            loaded.append(data)

        def get_function(self, name):
            return ("fn", name)

    fake = SimpleNamespace(__version__="14.2.0", cuda=SimpleNamespace(
        compiler=SimpleNamespace(compile_using_nvrtc=compile_using_nvrtc), function=SimpleNamespace(Module=Module),
        Device=lambda: SimpleNamespace(compute_capability="90"), nvrtc=SimpleNamespace(getVersion=lambda: (13, 0)),
        runtime=SimpleNamespace(driverGetVersion=lambda: 13000)))
    monkeypatch.setattr(device, "_cupy_module", lambda: fake)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    device._module.cache_clear()
    try:
        assert device.kernel("pack_signs_fp32") == ("fn", "pack_signs_fp32")
        assert device.kernel("pack_signs_bf16") == ("fn", "pack_signs_bf16")     # same module, compiled once
        assert len(calls) == 1 and loaded == [b"CUBIN:signs.cu"] and len(list(tmp_path.glob("*.bin"))) == 1
        device._module.cache_clear()                                            # the next process
        assert device.kernel("pack_signs_fp32") == ("fn", "pack_signs_fp32")
        assert len(calls) == 1 and loaded == [b"CUBIN:signs.cu"] * 2             # from the disk, no NVRTC
        device._module.cache_clear()
        fake.__version__ = "14.3.0"                                             # another CuPy: compiled afresh
        device.kernel("pack_signs_fp32")
        assert len(calls) == 2 and len(list(tmp_path.glob("*.bin"))) == 2
        device._module.cache_clear()
        Module.refuse = 1                                                       # a cached image the driver refuses
        assert device.kernel("pack_signs_fp32") == ("fn", "pack_signs_fp32")     # is compiled afresh
        assert len(calls) == 3
        device._module.cache_clear()
        monkeypatch.setenv(CACHE_ENV, "off")
        Module.refuse = 1                                                       # a fresh image refused: the error
        with pytest.raises(RuntimeError, match="INVALID_IMAGE"):
            device.kernel("pack_signs_fp32")
        assert len(calls) == 4 and len(list(tmp_path.glob("*.bin"))) == 2
    finally:
        device._module.cache_clear()
    src, options, _ = calls[0]
    assert src == source("signs.cu") and options == COMPILE_OPTIONS
    assert not any("ftz=true" in o or "fast_math" in o for o in options)
    ptx, _ = cc.find_nvrtc().compile_ptx(src, "signs.cu", options + ("--gpu-architecture=compute_90",))
    assert cc.contract_violations(ptx) == ()


def test_compile_error_is_reported_with_the_log():
    _tools_or_skip()
    with pytest.raises(SparseInferError, match="NVRTC failed to compile bad.cu:.*undefined"):
        cc.find_nvrtc().compile_ptx('extern "C" __global__ void f() { undefined_thing(); }', "bad.cu",
                                    ("--gpu-architecture=compute_80",))


def test_parse_ptxas_reads_registers_and_spills():
    log = """ptxas info    : Compiling entry function 'k1' for 'sm_90'
ptxas info    : Function properties for k1
    8 bytes stack frame, 12 bytes spill stores, 16 bytes spill loads
ptxas info    : Used 255 registers, used 0 barriers, 380 bytes cmem[0]
ptxas info    : Compiling entry function 'k2' for 'sm_90'
ptxas info    : Function properties for k2
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 30 registers, used 1 barriers, 380 bytes cmem[0]
"""
    got = cc.parse_ptxas(log)
    assert got["k1"] == cc.KernelResources("k1", 255, 12, 16, 8)
    assert got["k2"] == cc.KernelResources("k2", 30, 0, 0, 0)


def test_sources_expand_the_header_once():
    text = source("gate_up.cu")
    assert not any(line.startswith("#include") for line in text.splitlines())
    assert text.count("struct half_bits { u16 b; };") == 1
