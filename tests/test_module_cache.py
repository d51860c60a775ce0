"""The disk cache of compiled kernel modules (kernels/module_cache.py)."""
from __future__ import annotations

from sparseinfer.kernels import module_cache as mc


def test_cache_keeps_bytes_per_key_and_can_be_turned_off(monkeypatch, tmp_path):
    monkeypatch.setenv(mc.CACHE_ENV, str(tmp_path / "cache"))
    compiles = []

    def compile_fn(text):
        def run():
            compiles.append(text)
            return text                  # NVRTC's PTX comes back as str: stored as bytes
        return run

    a, b = mc.cache_key("src", ("--fmad=false",), "90"), mc.cache_key("src", ("--fmad=false",), "80")
    assert a != b and a == mc.cache_key("src", ("--fmad=false",), "90")
    assert mc.cached_compile(a, compile_fn("A")) == (b"A", False)
    assert mc.cached_compile(a, compile_fn("never")) == (b"A", True)
    assert mc.cached_compile(b, compile_fn("B")) == (b"B", False)
    assert compiles == ["A", "B"] and sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(
        [f"{a}.bin", f"{b}.bin"])                     # no temporary file left behind
    monkeypatch.setenv(mc.CACHE_ENV, "off")
    assert mc.cache_dir() is None and mc.cached_compile(a, compile_fn("C")) == (b"C", False)
    monkeypatch.delenv(mc.CACHE_ENV)
    assert mc.cache_dir() == mc.Path.home() / ".cache" / "sparseinfer" / "kernels"


def test_an_unwritable_cache_costs_only_the_caching(monkeypatch, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    monkeypatch.setenv(mc.CACHE_ENV, str(blocker / "kernels"))
    assert mc.cached_compile("k", lambda: b"code") == (b"code", False)
    assert mc.cached_compile("k", lambda: b"again") == (b"again", False)
    assert blocker.read_text() == "x"
