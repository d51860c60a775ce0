"""What the kernel package does without a GPU: lazy import, argument checks (one-line
SparseInferErrors raised before CuPy is touched), weight layout, the registry, and the
test/benchmark input builder."""
from __future__ import annotations

import subprocess
import sys
import types

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from kernel_cases import cases
from sparseinfer.kernels import (DOWN, DOWN_QUANT, FAMILIES, GATE_UP, GATE_UP_QUANT, PIPELINES, PREDICT,
                                 QUANT_PIPELINES, SparseMLP, device, ops)
from sparseinfer.kernels.device import DeviceBlocks, DeviceMatrix
from sparseinfer.kernels.shapes import BENCH_SHAPES, TEST_SHAPES, make_layer
from sparseinfer.kernels.sources import KERNELS
from sparseinfer.reference.block_quant import FORMATS, quantize
from sparseinfer.reference.dtypes import BFLOAT16, SIGN_PACK_DTYPE_NAMES
from sparseinfer.reference.errors import SparseInferError
from sparseinfer.reference.shapes import BUILTIN_MODELS
from sparseinfer.reference.signs import pack_signs, predict_zero_rows


def _host_matrix(a):
    return DeviceMatrix.from_host("w", a, xp=np)


def test_importing_kernels_does_not_import_cupy():
    code = "import sys, sparseinfer.kernels, sparseinfer.tools.cli; print('cupy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("dtype,ld", [(np.float32, 36), (np.float16, 40), (BFLOAT16, 40), (np.int8, 48)])
def test_device_matrix_pads_rows_to_16_bytes_and_round_trips_bits(dtype, ld):
    a = (np.arange(3 * 33).reshape(3, 33) - 50).astype(dtype)
    m = _host_matrix(a)
    assert (m.rows, m.cols, m.ld) == (3, 33, ld)
    assert m.data.shape == (3, ld) and (m.ld * np.dtype(dtype).itemsize) % 16 == 0
    assert not np.asarray(m.data)[:, 33:].any()
    back = m.to_host()
    assert back.dtype == np.dtype(dtype) and np.array_equal(back.view(np.uint8), a.view(np.uint8))


@pytest.mark.parametrize("a,match", [
    (np.zeros(5, np.float32), "non-empty 2-D"),
    (np.zeros((2, 3), np.float64), "dtype float64"),
    (np.array([[1.0, np.nan]], np.float16), r"NaN at index \(0, 1\)"),
])
def test_device_matrix_rejects_bad_weights(a, match):
    with pytest.raises(SparseInferError, match=match):
        _host_matrix(a)


def _weights(d=33, k=40, dtype=np.float16):
    rng = np.random.default_rng(0)
    return [rng.standard_normal(s).astype(dtype) for s in ((k, d), (k, d), (d, k))]


def test_wrappers_check_arguments_before_touching_the_gpu():
    wg, wu, _ = (_host_matrix(w) for w in _weights())
    x = np.zeros(33, np.float32)
    mask, rows = GATE_UP["v1_mask"].launches[0], PREDICT["v1"].launches[0]
    with pytest.raises(SparseInferError, match="x has dtype float64; expected float32"):
        ops.gate_up_mask(x.astype(np.float64), wg, wu, "relu", launch=mask)
    with pytest.raises(SparseInferError, match=r"w_gate has shape \(40, 33\); expected 32 columns"):
        ops.gate_up_mask(x[:32], wg, wu, "relu", launch=mask)
    with pytest.raises(SparseInferError, match="w_up .* does not match w_gate"):
        ops.gate_up_mask(x, wg, _host_matrix(_weights(k=41)[1]), "relu", launch=mask)
    with pytest.raises(SparseInferError, match="unknown activation 'swish'"):
        ops.gate_up_mask(x, wg, wu, "swish", launch=mask)
    with pytest.raises(SparseInferError, match=r"zero mask has shape \(39,\); expected \[40\]"):
        ops.gate_up_mask(x, wg, wu, "relu", np.zeros(39, np.uint8), launch=mask)
    with pytest.raises(SparseInferError, match="alpha_milli must be an integer"):
        ops.predict(np.zeros((40, 2), np.uint32), np.zeros(2, np.uint32), 33, 1.03, launch=rows)
    with pytest.raises(SparseInferError, match=r"w_signs .* expected uint32 \[k, 2\] for d = 33"):
        ops.predict(np.zeros((40, 3), np.uint32), np.zeros(2, np.uint32), 33, 1030, launch=rows)
    with pytest.raises(SparseInferError, match=r"h3 has shape \(33,\); expected \[40\]"):
        ops.down_chunks(x, wg, launch=DOWN["v1_chunks"].launches[0])
    with pytest.raises(SparseInferError, match="must be a DeviceMatrix"):
        ops.down_atomic(np.zeros(40, np.float32), np.zeros((40, 33), np.float16), launch=DOWN["v2_atomic"].launches[0])
    # strided views pass the shape checks but the kernels index densely
    with pytest.raises(SparseInferError, match=r"x is a strided view \(strides \(8,\)\)"):
        ops.gate_up_mask(np.zeros(66, np.float32)[::2], wg, wu, "relu", launch=mask)
    with pytest.raises(SparseInferError, match="w_signs is a strided view"):
        ops.predict(np.zeros((80, 2), np.uint32)[::2], np.zeros(2, np.uint32), 33, 1030, launch=rows)


@pytest.mark.parametrize("mutate,match", [
    (lambda w: (w[0][:, :5], w[1], w[2]), r"w_up has shape \(40, 33\); expected \[k, d\] = \(40, 5\)"),
    (lambda w: (w[0], w[1], w[2].T), r"w_down has shape \(40, 33\); expected \[d, k\]"),
    (lambda w: (w[0], w[1].astype(np.float32), w[2]), "weights must share one dtype"),
    (lambda w: (w[0], w[1], np.where(np.arange(40) == 7, np.nan, w[2]).astype(np.float16)),
     r"w_down contains NaN at index \(0, 7\)"),      # the HF [d, k] index, not the transposed upload's
    (lambda w: (w[0][0], w[1], w[2]), r"w_gate has shape \(33,\); expected \[k, d\]"),
])
def test_sparse_mlp_rejects_bad_layers_on_the_host(mutate, match):
    with pytest.raises(SparseInferError, match=match):
        SparseMLP(*mutate(_weights()), "fatrelu:0.01")


def test_sparse_mlp_rejects_unknown_pipeline_and_dense_activation():
    with pytest.raises(SparseInferError, match="unknown pipeline 'fast'"):
        SparseMLP(*_weights(), "relu", pipeline="fast")
    with pytest.raises(SparseInferError, match="silu has no exact zeros"):
        SparseMLP(*_weights(), "silu")


def test_registry_entries_are_described_and_consistent():
    for family, versions in FAMILIES.items():
        assert versions, family
        for name, v in versions.items():
            assert v.family == family and v.name == name and len(v.description) > 20 and callable(v.run)
            assert callable(v.reference) and callable(v.touched) and v.launches, name
            # each launch names a compiled function (its source) and whole warps
            assert all(launch.source in KERNELS and launch.threads % 32 == 0 for launch in v.launches), name
    for p in PIPELINES.values():
        assert p.gate_up in GATE_UP and p.down in DOWN and not p.weights
    for p in QUANT_PIPELINES.values():
        assert p.gate_up in GATE_UP_QUANT[p.weights] and p.down in DOWN_QUANT[p.weights] and p.deterministic
    assert {p.name for p in PIPELINES.values() if not p.deterministic} == {"sparse-atomic"}
    assert {(v.name, v.predict) for v in GATE_UP.values() if v.predict} == {("v1_mask", "v1"), ("v2_list", "v2")}
    # the versions on block-quantized weights: one record per format, named for it
    for fmt in FORMATS:
        for step in ("pack_signs", "gate_up", "down"):
            assert all(v.weights == fmt and v.step == step for v in FAMILIES[f"{step}_{fmt}"].values())
    assert all(not v.weights and v.step == v.family for f in ("pack_signs", "predict", "gate_up", "down", "mlp_fused",
                                                               "baseline") for v in FAMILIES[f].values())
    launched = {launch.name(suffix) for versions in FAMILIES.values() for v in versions.values()
                for launch in v.launches for suffix in (*SIGN_PACK_DTYPE_NAMES, *FORMATS)}
    for names in KERNELS.values():      # every compiled kernel is launched by a version
        assert set(names) <= launched, names


def test_each_version_launches_what_its_record_says(monkeypatch):
    """A version's run launches its record's functions with its block sizes, in order (a gate_up
    version first the predict version it reads), and nothing else."""
    launched = []
    monkeypatch.setattr(ops, "cupy", lambda: np)             # outputs in host memory, no backend
    monkeypatch.setattr(ops, "kernel", lambda name: lambda grid, block, args: launched.append((name, block[0])))
    monkeypatch.setattr(ops, "_COUNTERS", {})
    monkeypatch.setattr(device, "resident_blocks", lambda name, threads: 2)
    d, k = 33, 40
    wg, wu, wd = _weights(d, k)
    x = np.ones(d, np.float32)
    x_signs = pack_signs(x)
    mlp = types.SimpleNamespace(d=d, k=k, activation="relu", w_signs=pack_signs(wg), w_gate=_host_matrix(wg),
                                w_up=_host_matrix(wu), w_down_t=_host_matrix(np.ascontiguousarray(wd.T)))
    inputs = {"pack_signs": (mlp.w_gate,), "predict": (mlp.w_signs, x_signs, d, 1000),
              "gate_up": (mlp, x, x_signs, 1000), "down": (np.ones(k, np.float32), mlp.w_down_t),
              "mlp_fused": (mlp, x, x_signs, 1000), "baseline": (x, mlp.w_gate, mlp.w_up, _host_matrix(wd), "relu")}
    dq, xq = 64, np.ones(64, np.float32)                 # block rows: d whole blocks
    for fmt in FORMATS:
        def blocks(w, fmt=fmt):
            return DeviceBlocks.from_host("w", quantize(w, fmt), fmt, dq, xp=np)
        qwg, qwu, qwd = _weights(dq, k)
        q = types.SimpleNamespace(d=dq, k=k, activation="relu", w_signs=pack_signs(qwg), w_gate=blocks(qwg),
                                  w_up=blocks(qwu), w_down_t=blocks(np.ascontiguousarray(qwd.T)))
        inputs |= {f"pack_signs_{fmt}": (q.w_gate,), f"gate_up_{fmt}": (q, xq, pack_signs(xq), 1000),
                   f"down_{fmt}": (np.ones(k, np.float32), q.w_down_t)}
    assert set(inputs) == set(FAMILIES)
    for family, versions in FAMILIES.items():
        for v in versions.values():
            launched.clear()
            v.run(*inputs[family])
            want = (PREDICT[v.predict].launches if v.predict else ()) + v.launches
            assert launched == [(launch.name(v.weights or "fp16"), launch.threads) for launch in want], (family, v.name)


def test_bench_shapes_come_from_the_model_table():
    assert {(s.d, s.k) for s in BENCH_SHAPES} == {(4096, 11008), (5120, 13824)}
    assert all((s.d, s.k) == (BUILTIN_MODELS[s.model].d, BUILTIN_MODELS[s.model].k) for s in BENCH_SHAPES)
    assert {d for d, _ in TEST_SHAPES} >= {1, 31, 33, 97, 4096, 5120}


@pytest.mark.parametrize("d,k", [s for s in TEST_SHAPES if s[0] * s[1] < 10 ** 6])
@pytest.mark.parametrize("sparsity", [0.9, 0.92])
def test_make_layer_hits_the_target_sparsity_exactly(d, k, sparsity):
    layer = make_layer(d, k, np.float16, sparsity, seed=d + k)
    assert layer.zero_rows.sum() == round(sparsity * k)
    for alpha in (0.9, 1.0, 1.1):
        got = predict_zero_rows(pack_signs(layer.w_gate), pack_signs(layer.x), d, alpha)
        assert np.array_equal(got, layer.zero_rows)


@settings(max_examples=25, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases(shapes=[s for s in TEST_SHAPES if s[0] * s[1] < 10 ** 5]))
def test_gpu_test_cases_are_nontrivial(case):
    case.assert_nontrivial()


def test_emulated_kernels_refuse_what_cupy_would_not_take():
    from sparseinfer.kernels import emulator

    if emulator.unavailable_reason():
        pytest.skip(emulator.unavailable_reason())
    words = np.zeros(2, np.uint32)
    x = np.zeros(64, np.float32)
    launch = emulator.kernel("pack_signs_fp32")
    with pytest.raises(SparseInferError, match="strided array"):
        launch((1,), (64,), (np.zeros(128, np.float32)[::2], words, np.int32(1), np.int32(64), np.int64(64)))
    with pytest.raises(SparseInferError, match="argument of type int"):
        launch((1,), (64,), (x, words, 1, np.int32(64), np.int64(64)))
    x[[3, 40]] = -1.0
    launch((1,), (64,), (x, words, np.int32(1), np.int32(64), np.int64(64)))
    assert words.tolist() == [1 << 3, 1 << 8]


class _FakeFunction:
    def __init__(self, ptr):
        self.kernel = types.SimpleNamespace(ptr=ptr)


def _fake_cupy(occupancy):
    """A CuPy stand-in with 132 SMs of 2048 threads; ``occupancy`` is the driver call or None."""
    driver = types.SimpleNamespace(occupancyMaxActiveBlocksPerMultiprocessor=occupancy) if occupancy else \
        types.SimpleNamespace()
    attrs = {"MultiProcessorCount": 132, "MaxThreadsPerMultiProcessor": 2048}
    return types.SimpleNamespace(cuda=types.SimpleNamespace(Device=lambda: types.SimpleNamespace(attributes=attrs),
                                                            driver=driver))


def test_resident_blocks_asks_the_driver_for_the_kernels_occupancy(monkeypatch):
    from sparseinfer.kernels import device

    calls = []

    def occupancy(ptr, threads, smem):
        calls.append((ptr, threads, smem))
        return 3                                          # e.g. limited by registers

    monkeypatch.setattr(device, "_cupy_module", lambda: _fake_cupy(occupancy))
    monkeypatch.setattr(device, "kernel", lambda name: _FakeFunction(ptr=0xBEEF))
    device.occupancy.cache_clear()
    try:
        assert device.resident_blocks("gate_up_persistent_fp16", 256) == 132 * 3
        assert calls == [(0xBEEF, 256, 0)]
        assert device.occupancy("gate_up_persistent_fp16", 256) == (132, 3, "driver")
        device.occupancy.cache_clear()
        monkeypatch.setattr(device, "_cupy_module", lambda: _fake_cupy(None))     # no occupancy call in CuPy
        assert device.resident_blocks("gate_up_persistent_fp16", 256) == 132 * (2048 // 256)
        assert device.occupancy("gate_up_persistent_fp16", 256)[2] == "thread limit"
    finally:
        device.occupancy.cache_clear()
