"""The benchmark's timed path without a GPU, so that a device's minutes are not spent on a
Python slip: the harness's rows on the emulated kernels with a stand-in timer, the CUDA-event
timer on a stand-in CuPy, and ``sparseinfer bench``'s table and results file."""
from __future__ import annotations

import json
import types

import numpy as np
import pytest
from click.testing import CliRunner

from sparseinfer.benchmarks import harness, timing
from sparseinfer.kernels import device, emulator
from sparseinfer.kernels.shapes import BenchShape
from sparseinfer.tools.cli import cli

PEAK = 3352.3
INFO = {"device": "Stand-in GPU 80GB", "cuda_version": "13.0", "peak_bandwidth_gb_per_s": PEAK,
        "memory_clock_khz": 2619000, "memory_bus_width_bits": 5120}


class FakeTimer:
    """Calls fn once per timing (the kernels really run, on the emulator); the 'time' is the
    number of calls so far, so every row gets a different, known latency."""

    def __init__(self, repeats=50):
        self.calls = 0

    def __call__(self, fn):
        fn()
        self.calls += 1
        return timing.Timing(median_us=10.0 * self.calls, spread_us=1.0)


@pytest.mark.emulated
def test_harness_rows_on_the_emulated_kernels(monkeypatch):
    monkeypatch.setattr(harness, "Timer", FakeTimer)
    monkeypatch.setattr(harness, "device_info", lambda: dict(INFO))
    monkeypatch.setattr(harness, "empty_launch_us", lambda timer: 2.5)
    shape = BenchShape("prosparse-llama2-7b", 97, 600)
    with emulator.installed():
        result = harness.run(shapes=[shape], sparsities=(0.9,), repeats=3, log=lambda s: None)
    assert result["device"] == INFO["device"] and result["empty_launch_us"] == 2.5 and result["alpha"] == 1.0
    rows = result["rows"]
    assert [(r["kernel"], r["version"]) for r in rows] == harness.bench_targets()
    assert all(r["verified"] for r in rows), [r for r in rows if not r["verified"]]
    # the three dense baselines were timed first (calls 1-3: mlp, gate_up, down), then one call per row
    dense = {"mlp": 10.0, "gate_up": 20.0, "down": 30.0}
    for i, r in enumerate(rows):
        assert r["latency_us"] == 10.0 * (4 + i) and (r["d"], r["k"], r["sparsity"]) == (97, 600, 0.9)
        assert r["gb_per_s"] == round(r["bytes"] / (r["latency_us"] * 1e-6) / 1e9, 1) and r["bytes"] > 0
        assert r["pct_peak"] == round(100 * (r["bytes"] / (r["latency_us"] * 1e-6) / 1e9) / PEAK, 1)
        baseline = {"gate_up": "gate_up", "down": "down"}.get(r["kernel"], "mlp")
        assert r["dense_baseline_us"] == dense[baseline]
        assert r["speedup_vs_dense"] == round(dense[baseline] / r["latency_us"], 3)


def test_timer_uses_events_after_each_flush_and_reports_the_median():
    log = []

    class Event:
        clock = [0.0]

        def record(self):
            log.append("record")
            self.t = Event.clock[0]

        def synchronize(self):
            pass

    ms = iter([0.004, 0.001, 0.003, 0.002, 0.005])          # the five timed runs, in ms
    fill = types.SimpleNamespace(fill=lambda v: log.append("flush"))
    fake = types.SimpleNamespace(int32=np.int32, empty=lambda n, dtype: fill, cuda=types.SimpleNamespace(
        Event=Event, get_elapsed_time=lambda a, b: next(ms)))
    orig = device._cupy_module
    device._cupy_module = lambda: fake
    try:
        t = timing.Timer(warmup=2, repeats=5)(lambda: log.append("run"))
    finally:
        device._cupy_module = orig
    assert log[:2] == ["run", "run"]                              # warm-up, untimed
    assert log[2:] == ["flush", "record", "run", "record"] * 5    # L2 flushed before every timed run
    assert t.median_us == pytest.approx(3.0)
    assert t.spread_us == pytest.approx(np.percentile([4, 1, 3, 2, 5], 90) - np.percentile([4, 1, 3, 2, 5], 10))


def test_bench_command_prints_the_table_and_writes_the_results_file(monkeypatch, tmp_path):
    row = {"kernel": "mlp", "version": "sparse-fused", "model": "prosparse-llama2-13b", "d": 5120, "k": 13824,
           "dtype": "fp16", "sparsity": 0.92, "verified": True, "latency_us": 25.0, "latency_us_spread": 1.0,
           "bytes": 40_000_000, "gb_per_s": 1600.0, "pct_peak": 47.7, "dense_baseline_us": 150.0,
           "speedup_vs_dense": 6.0}
    seen = {}

    def fake_run(shapes, sparsities, repeats, log):
        seen.update(models=[s.model for s in shapes], sparsities=sparsities, repeats=repeats)
        return {**INFO, "date": "2026-11-26", "empty_launch_us": 2.5, "alpha": 1.0, "rows": [row]}

    monkeypatch.setattr(device, "_cupy_module", lambda: object())
    monkeypatch.setattr(harness, "run", fake_run)
    res = CliRunner().invoke(cli, ["bench", "--model", "prosparse-llama2-13b", "--sparsity", "0.92", "--repeats", "7",
                                   "--results-dir", str(tmp_path), "--json", str(tmp_path / "b.json")])
    assert res.exit_code == 0, res.output
    assert seen == {"models": ["prosparse-llama2-13b"], "sparsities": (0.92,), "repeats": 7}
    saved = json.loads((tmp_path / "stand-in-gpu-80gb.json").read_text())
    assert saved["rows"] == [row] and json.loads((tmp_path / "b.json").read_text()) == saved
    assert "Stand-in GPU 80GB, CUDA 13.0, peak 3352.3 GB/s" in res.output
    line = next(li for li in res.output.splitlines() if li.startswith("mlp"))
    assert line.split() == ["mlp", "sparse-fused", "prosparse-llama2-13b", "0.92", "yes", "25.0", "1600", "48",
                            "6.00"]
