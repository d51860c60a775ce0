"""pytest-benchmark cases (marker ``gpu``): every kernel version and every MLP pipeline at
the ProSparse-7B/13B shapes, fp16 weights, sparsities 0.90 and 0.92.

Shapes, sparsities and versions come from ``kernels.shapes`` and the registry (through
``kernels.verify.bench_targets``); inputs, verification, byte counts and the cuBLAS
baseline from ``benchmarks.harness.BenchCase``, the same code as ``sparseinfer bench``.
pytest-benchmark times the launch plus a device synchronisation (host clock, L2 flushed
in ``setup``); ``extra_info`` holds the harness's CUDA-event row: µs, spread, bytes,
GB/s, % of peak, verified, and the speedup over cuBLAS dense measured in this session.

pyproject's addopts disable pytest-benchmark's timing; the GPU run in benchmarks/README.md
passes ``--benchmark-enable --benchmark-json``. Without a GPU these are collected and
skipped with the reason (tests/conftest.py). Nothing here asserts on a time.
"""
from __future__ import annotations

import functools

import pytest

from sparseinfer.benchmarks.harness import BenchCase
from sparseinfer.kernels import FAMILIES, PIPELINES, QUANT_PIPELINES
from sparseinfer.kernels.shapes import BENCH_SHAPES, BENCH_SPARSITIES
from sparseinfer.kernels.verify import bench_targets

ROUNDS = 30
WARMUP_ROUNDS = 5

# Ordered so that every row of one (shape, sparsity) runs before the next one is built.
PARAMS = [pytest.param(shape, sparsity, kernel, version, id=f"{shape.model}-{sparsity}-{kernel}-{version}")
          for shape in BENCH_SHAPES for sparsity in BENCH_SPARSITIES for kernel, version in bench_targets()]


@functools.lru_cache(maxsize=1)
def _timer():
    from sparseinfer.benchmarks.timing import Timer, device_info

    return Timer(), device_info()


@functools.lru_cache(maxsize=1)      # one layer on the device at a time
def _case(shape, sparsity) -> BenchCase:
    return BenchCase(shape, sparsity, _timer()[0], log=lambda _: None)


def test_bench_params_cover_every_version_shape_and_sparsity():    # runs on CPU too
    # every version has a row of its own, except the fused MLP kernel's, timed as the pipelines that run it
    want = ({(f, v) for f, family in FAMILIES.items() if f != "mlp_fused" for v in family} | {("mlp", p) for p in PIPELINES}
            | {("mlp_quant", p) for p in QUANT_PIPELINES})
    assert set(bench_targets()) == want and len(bench_targets()) == len(want)
    assert set(FAMILIES["mlp_fused"]) == {p.fused for p in PIPELINES.values() if p.fused}
    got = {(p.values[0].model, p.values[1], p.values[2], p.values[3]) for p in PARAMS}
    assert len(got) == len(PARAMS) == len(BENCH_SHAPES) * len(BENCH_SPARSITIES) * len(want)
    assert {s.model for s in BENCH_SHAPES} == {"prosparse-llama2-7b", "prosparse-llama2-13b"}
    assert set(BENCH_SPARSITIES) == {0.90, 0.92}


@pytest.mark.gpu      # skipped with the reason by conftest where no device is present
@pytest.mark.parametrize(("shape", "sparsity", "kernel", "version"), PARAMS)
def test_bench(benchmark, shape, sparsity, kernel, version):
    timer, info = _timer()
    case = _case(shape, sparsity)
    m = case.measurement(kernel, version)
    row = case.row(m, timer(m.fn), info["peak_bandwidth_gb_per_s"])
    benchmark.extra_info.update({**row, "device": info["device"], "cuda_version": info["cuda_version"]})
    benchmark.group = f"{shape.model} sparsity {sparsity} {kernel}"
    sync = timer.cp.cuda.Device().synchronize

    def flush():
        timer.flush()
        sync()

    def launch():
        m.fn()
        sync()

    benchmark.pedantic(launch, setup=flush, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS, iterations=1)
    assert m.verified, f"{kernel} {version} at {shape.model} sparsity {sparsity} does not match the reference"
