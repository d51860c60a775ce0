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

    def __call__(self, fn, flush=True):
        fn()
        self.calls += 1
        return timing.Timing(median_us=10.0 * self.calls, spread_us=1.0)


@pytest.fixture
def stand_in_device(monkeypatch):
    """harness.run on the stand-in timer, device facts and empty-launch time above."""
    monkeypatch.setattr(harness, "Timer", FakeTimer)
    monkeypatch.setattr(harness, "device_info", lambda: dict(INFO))
    monkeypatch.setattr(harness, "empty_launch_us", lambda timer: 2.5)


@pytest.mark.emulated
def test_harness_rows_on_the_emulated_kernels(stand_in_device):
    shape = BenchShape("prosparse-llama2-7b", 97, 600)
    with emulator.installed():
        result = harness.run(shapes=[shape], sparsities=(0.9,), repeats=3, loop_layers=0, log=lambda s: None)
    assert result["device"] == INFO["device"] and result["empty_launch_us"] == 2.5 and result["alpha"] == 1.0
    assert "decode_loop" not in result
    rows = result["rows"]
    assert [(r["kernel"], r["version"]) for r in rows] == harness.bench_targets()
    assert all(r["verified"] for r in rows), [r for r in rows if not r["verified"]]
    # the three dense baselines were timed first (calls 1-3: mlp, gate_up, down), then one call per row
    dense = {"mlp": 10.0, "gate_up": 20.0, "down": 30.0}
    for i, r in enumerate(rows):
        assert r["latency_us"] == 10.0 * (4 + i) and (r["d"], r["k"], r["sparsity"]) == (97, 600, 0.9)
        assert r["gb_per_s"] == round(r["bytes"] / (r["latency_us"] * 1e-6) / 1e9, 1) and r["bytes"] > 0
        assert r["pct_peak"] == round(100 * (r["bytes"] / (r["latency_us"] * 1e-6) / 1e9) / PEAK, 1)
        # the quantized families' rows (gate_up_q4_0, ...) against cuBLAS doing the same step
        baseline = {"gate_up": "gate_up", "down": "down"}.get(r["kernel"].removesuffix(f"_{r['dtype']}"), "mlp")
        assert r["dense_baseline_us"] == dense[baseline]
        assert r["speedup_vs_dense"] == round(dense[baseline] / r["latency_us"], 3)
    quantized = {r["dtype"] for r in rows if r["kernel"].startswith(("gate_up_", "down_", "pack_signs_", "mlp_quant"))}
    assert quantized == {"q8_0", "q4_0", "q4_1"} and {r["dtype"] for r in rows if r["kernel"] == "mlp"} == {"fp16"}
    assert next(r for r in rows if r["kernel"] == "gate_up_q4_0")["dense_baseline_us"] == dense["gate_up"]


@pytest.mark.emulated
def test_decode_loop_rows_eager_and_graph_on_the_emulated_kernels():
    timer = FakeTimer()
    shape = BenchShape("prosparse-llama2-13b", 97, 600)
    with emulator.installed():
        loop = harness.decode_loop(shape, 0.9, 3, timer, log=lambda s: None)
    assert (loop["model"], loop["d"], loop["k"], loop["sparsity"], loop["layers"]) == (shape.model, 97, 600, 0.9, 3)
    rows = loop["rows"]
    want = [("cublas-dense", "eager"), ("cublas-dense", "graph")] + [(p, m) for p in harness.PIPELINES
                                                                     for m in ("eager", "graph")]
    assert [(r["pipeline"], r["mode"]) for r in rows] == want
    eager, graph = rows[0], rows[1]
    assert eager["verified"] is None and eager["us_per_layer"] == round(10.0 / 3, 3)
    # the emulator cannot record cuBLAS: the row says why instead of a time
    assert "cannot record cuBLAS" in graph["error"] and "us_per_layer" not in graph
    for i, r in enumerate(rows[2:]):
        assert r["verified"] is True, r
        assert r["us_per_layer"] == round(10.0 * (2 + i) / 3, 3) and r["host_us_per_layer"] > 0
        assert r["speedup_vs_dense_eager"] == round(eager["us_per_layer"] / r["us_per_layer"], 3)
        assert "speedup_vs_dense_graph" not in r
        sparse = harness.PIPELINES[r["pipeline"]].sparse
        assert (r["bytes_per_layer"] < eager["bytes_per_layer"]) == sparse


@pytest.mark.emulated
def test_bench_plot_draws_a_results_file_and_refuses_what_it_cannot_draw(stand_in_device, tmp_path):
    from matplotlib.image import imread

    with emulator.installed():
        result = harness.run(shapes=[BenchShape("prosparse-llama2-13b", 97, 600)], sparsities=(0.9,), repeats=3,
                             loop_layers=2, log=lambda s: None)
    result["rows"][3]["verified"] = result["rows"][8]["verified"] = False     # drawn hatched, not dropped
    results = tmp_path / "stand-in.json"
    results.write_text(json.dumps(result))
    runner = CliRunner()
    r = runner.invoke(cli, ["bench-plot", str(results), "--out", str(tmp_path / "b.png")])
    assert r.exit_code == 0, r.output
    image = imread(tmp_path / "b.png")
    assert image.shape[0] > 400 and image.shape[1] > 1000 and image.std() > 0
    for args, message in ((["--sparsity", "0.5"], "no benchmark rows for prosparse-llama2-13b at sparsity 0.5"),
                          (["--model", "prosparse-llama2-7b"], "no benchmark rows for prosparse-llama2-7b")):
        r = runner.invoke(cli, ["bench-plot", str(results), "--out", str(tmp_path / "c.png"), *args])
        assert r.exit_code == 2 and message in r.output, r.output
    results.write_text(json.dumps({**result, "rows": []}))
    r = runner.invoke(cli, ["bench-plot", str(results), "--out", str(tmp_path / "c.png")])
    assert r.exit_code == 2 and "hold no rows" in r.output
    results.write_text("[1, 2")
    r = runner.invoke(cli, ["bench-plot", str(results), "--out", str(tmp_path / "c.png")])
    assert r.exit_code == 2 and f"cannot read results file {results}" in r.output
    assert not (tmp_path / "c.png").exists()


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
    log.clear()
    ms = iter([0.002] * 3)
    device._cupy_module = lambda: fake
    try:
        timing.Timer(warmup=0, repeats=3)(lambda: log.append("run"), flush=False)
    finally:
        device._cupy_module = orig
    assert log == ["record", "run", "record"] * 3                # back to back: no flush
    assert t.spread_us == pytest.approx(np.percentile([4, 1, 3, 2, 5], 90) - np.percentile([4, 1, 3, 2, 5], 10))


def test_bench_command_prints_the_table_and_writes_the_results_file(monkeypatch, tmp_path):
    row = {"kernel": "mlp", "version": "sparse-fused", "model": "prosparse-llama2-13b", "d": 5120, "k": 13824,
           "dtype": "fp16", "sparsity": 0.92, "verified": True, "latency_us": 25.0, "latency_us_spread": 1.0,
           "bytes": 40_000_000, "gb_per_s": 1600.0, "pct_peak": 47.7, "dense_baseline_us": 150.0,
           "speedup_vs_dense": 6.0}
    seen = {}

    loop = {"model": "prosparse-llama2-13b", "d": 5120, "k": 13824, "dtype": "fp16", "sparsity": 0.92, "layers": 4,
            "rows": [{"pipeline": "cublas-dense", "mode": "eager", "verified": None, "bytes_per_layer": 9,
                      "us_per_layer": 150.0, "spread_us_per_layer": 1.0, "host_us_per_layer": 30.0,
                      "speedup_vs_dense_eager": 1.0},
                     {"pipeline": "cublas-dense", "mode": "graph", "verified": False, "bytes_per_layer": 9,
                      "error": "CUDARuntimeError: cudaErrorStreamCaptureUnsupported"},
                     {"pipeline": "sparse-fused", "mode": "graph", "verified": True, "bytes_per_layer": 1,
                      "us_per_layer": 25.0, "spread_us_per_layer": 1.0, "host_us_per_layer": 2.0,
                      "speedup_vs_dense_eager": 6.0}]}

    failed = {"kernel": "gate_up", "version": "v4_persistent", "model": "prosparse-llama2-13b", "d": 5120,
              "k": 13824, "dtype": "fp16", "sparsity": 0.92, "verified": False,
              "error": "CUDADriverError: CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES"}

    def fake_run(shapes, sparsities, repeats, loop_layers, log, save):
        seen.update(models=[s.model for s in shapes], sparsities=sparsities, repeats=repeats, loop_layers=loop_layers)
        partial = {**INFO, "date": "2026-11-26", "empty_launch_us": 2.5, "alpha": 1.0, "complete": False,
                   "rows": [row, failed]}
        save(partial)                         # what a run cut short after its first case leaves
        seen["partial"] = json.loads((tmp_path / "stand-in-gpu-80gb.json").read_text())
        return {**partial, "complete": True, "decode_loop": loop}

    monkeypatch.setattr(device, "_cupy_module", lambda: object())
    monkeypatch.setattr(harness, "run", fake_run)
    res = CliRunner().invoke(cli, ["bench", "--model", "prosparse-llama2-13b", "--sparsity", "0.92", "--repeats", "7",
                                   "--results-dir", str(tmp_path), "--json", str(tmp_path / "b.json"),
                                   "--loop-layers", "4"])
    assert res.exit_code == 0, res.output
    assert seen.pop("partial")["complete"] is False
    assert seen == {"models": ["prosparse-llama2-13b"], "sparsities": (0.92,), "repeats": 7, "loop_layers": 4}
    saved = json.loads((tmp_path / "stand-in-gpu-80gb.json").read_text())
    assert saved["complete"] is True and saved["rows"] == [row, failed]
    assert json.loads((tmp_path / "b.json").read_text()) == saved
    failed_line = next(li for li in res.output.splitlines() if li.startswith("gate_up"))
    assert failed_line.split()[:6] == ["gate_up", "v4_persistent", "prosparse-llama2-13b", "0.92", "NO",
                                       "CUDADriverError:"]
    assert "Stand-in GPU 80GB, CUDA 13.0, peak 3352.3 GB/s" in res.output
    line = next(li for li in res.output.splitlines() if li.startswith("mlp"))
    assert line.split() == ["mlp", "sparse-fused", "prosparse-llama2-13b", "0.92", "yes", "25.0", "1600", "48",
                            "6.00"]
    assert "decode loop: 4 layers of prosparse-llama2-13b, sparsity 0.92" in res.output
    lines = res.output.splitlines()
    graph_row = next(li for li in lines if li.startswith("sparse-fused") and " graph " in li)
    assert graph_row.split() == ["sparse-fused", "graph", "yes", "25.0", "2.0", "6.00", "-"]
    failed = next(li for li in lines if li.startswith("cublas-dense") and " graph " in li)
    assert failed.split()[:4] == ["cublas-dense", "graph", "NO", "CUDARuntimeError:"]


@pytest.mark.parametrize(("props", "attrs", "peak", "source"), [
    ({"memoryClockRate": 2619000, "memoryBusWidth": 5120}, {}, 3352.3, "memory clock x bus width x 2"),
    ({}, {36: 2619000, 37: 5120}, 3352.3, "memory clock x bus width x 2"),      # CUDA 13: attributes only
    ({}, {}, 3350.0, "datasheet (h100-sxm)"),                                  # neither: the built-in spec
])
def test_device_info_peak_from_clock_and_bus_or_the_datasheet(monkeypatch, props, attrs, peak, source):
    def attribute(attr, dev):
        if attr not in attrs:
            raise RuntimeError("cudaErrorInvalidValue")
        return attrs[attr]

    runtime = types.SimpleNamespace(getDeviceProperties=lambda i: {"name": b"NVIDIA H100 80GB HBM3", **props},
                                    deviceGetAttribute=attribute, runtimeGetVersion=lambda: 13000)
    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(Device=lambda: types.SimpleNamespace(id=0), runtime=runtime))
    monkeypatch.setattr(device, "_cupy_module", lambda: fake)
    info = timing.device_info()
    assert info["device"] == "NVIDIA H100 80GB HBM3" and info["cuda_version"] == "13.0"
    assert info["peak_bandwidth_gb_per_s"] == peak and info["peak_source"].startswith(source)


def test_bench_refuses_a_bad_plot_path_before_running(monkeypatch, tmp_path):
    monkeypatch.setattr(device, "_cupy_module", lambda: object())
    monkeypatch.setattr(harness, "run", lambda *a, **k: pytest.fail("the benchmark ran"))
    for path, message in ((tmp_path / "b.svg", "plot file must end in .png"),
                          (tmp_path / "nowhere" / "b.png", "no such directory for the plot")):
        r = CliRunner().invoke(cli, ["bench", "--plot", str(path)])
        assert r.exit_code == 2 and message in r.output, r.output


@pytest.mark.emulated
def test_a_failing_decode_loop_or_graph_never_costs_the_rows(stand_in_device, monkeypatch):
    shape = BenchShape("prosparse-llama2-13b", 97, 600)
    real_graph = harness.MLPGraph

    def graph(mlps, alpha):
        if mlps[0].pipeline.name == "sparse-list":
            raise RuntimeError("cudaErrorStreamCaptureUnsupported")
        return real_graph(mlps, alpha)

    monkeypatch.setattr(harness, "MLPGraph", graph)
    with emulator.installed():
        loop = harness.decode_loop(shape, 0.9, 2, FakeTimer(), log=lambda s: None)
        failed = [r for r in loop["rows"] if "error" in r]
        assert [(r["pipeline"], r["mode"]) for r in failed] == [("cublas-dense", "graph"), ("sparse-list", "graph")]
        assert "cudaErrorStreamCaptureUnsupported" in failed[1]["error"] and failed[1]["verified"] is False
        assert len(loop["rows"]) == 2 + 2 * len(harness.PIPELINES)

        monkeypatch.setattr(harness, "decode_loop", lambda *a, **k: 1 / 0)
        result = harness.run(shapes=[shape], sparsities=(0.9,), repeats=3, loop_layers=2, log=lambda s: None)
    assert len(result["rows"]) == len(harness.bench_targets()) and all(r["verified"] for r in result["rows"])
    assert result["decode_loop"]["error"] == "ZeroDivisionError: division by zero" and result["decode_loop"]["rows"] == []


@pytest.mark.emulated
def test_a_version_that_raises_is_an_error_row_and_the_others_still_run(stand_in_device, monkeypatch):
    real = harness.BenchCase.measurement

    def measurement(self, kernel, version):
        if (kernel, version) == ("gate_up", "v4_persistent"):
            raise RuntimeError("CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES\nmore lines")
        return real(self, kernel, version)

    monkeypatch.setattr(harness.BenchCase, "measurement", measurement)
    saved = []
    with emulator.installed():
        result = harness.run(shapes=[BenchShape("prosparse-llama2-7b", 97, 600)], sparsities=(0.9,), repeats=3,
                             loop_layers=0, log=lambda s: None, save=lambda r: saved.append(json.loads(json.dumps(r))))
    rows = result["rows"]
    assert [(r["kernel"], r["version"]) for r in rows] == harness.bench_targets() and result["complete"] is True
    bad = [r for r in rows if "error" in r]
    assert [(r["kernel"], r["version"]) for r in bad] == [("gate_up", "v4_persistent")]
    assert bad[0]["error"] == "RuntimeError: CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES" and bad[0]["verified"] is False
    assert all(r["verified"] for r in rows if "error" not in r)
    assert len(saved) == 1 and saved[0]["complete"] is False and len(saved[0]["rows"]) == len(rows)
    from sparseinfer.sim.calibrate import validate_results
    validate_results(result)                  # error rows pass the calibration's schema (and are skipped)


def _sweep_results():
    """Results at three sparsities: a pipeline that speeds up with sparsity, one whose 0.95 row failed
    verification, a predictor, and a 7B row that must not leak into the 13B series."""
    rows = []
    for s, us in ((0.8, 40.0), (0.9, 25.0), (0.95, 20.0)):
        rows += [{"kernel": "mlp", "version": "sparse-a", "model": "prosparse-llama2-13b", "sparsity": s,
                  "verified": True, "latency_us": us, "speedup_vs_dense": round(130.0 / us, 3),
                  "speedup_vs_best_dense": round(100.0 / us, 3), "pct_peak": 10.0 * s},
                 {"kernel": "mlp", "version": "sparse-b", "model": "prosparse-llama2-13b", "sparsity": s,
                  "verified": s != 0.95, "latency_us": 2 * us, "speedup_vs_dense": round(65.0 / us, 3),
                  "speedup_vs_best_dense": round(50.0 / us, 3), "pct_peak": 5.0},
                 {"kernel": "predict", "version": "v4", "model": "prosparse-llama2-13b", "sparsity": s,
                  "verified": True, "latency_us": 4.0 + s}]
    rows.append({"kernel": "mlp", "version": "sparse-c", "model": "prosparse-llama2-7b", "sparsity": 0.9,
                 "verified": True, "latency_us": 1.0, "speedup_vs_dense": 9.0, "speedup_vs_best_dense": 9.0,
                 "pct_peak": 1.0})
    for r in rows:                        # the fields every results row carries (sim.calibrate.read_results)
        r.update(d=5120, k=13824, dtype="float16", latency_us_spread=0.5, bytes=1,
                 gb_per_s=1.0, dense_baseline_us=130.0)
        r.setdefault("pct_peak", 1.0)
        r.setdefault("speedup_vs_dense", 1.0)
    return {**INFO, "date": "2026-11-29", "empty_launch_us": 2.5, "rows": rows}


def test_sparsity_series_follows_each_pipeline_and_predictor_across_sparsities():
    from sparseinfer.benchmarks.plots import sparsity_series

    data = sparsity_series(_sweep_results(), "prosparse-llama2-13b")
    assert data["sparsity"] == [0.8, 0.9, 0.95]
    assert data["speedup_vs_dense"] == {"sparse-a": [3.25, 5.2, 6.5], "sparse-b": [1.625, 2.6, None]}
    assert data["speedup_vs_best_dense"]["sparse-a"] == [2.5, 4.0, 5.0]
    assert data["pct_peak"] == {"sparse-a": [8.0, 9.0, 9.5], "sparse-b": [5.0, 5.0, None]}
    assert data["predict_launches"] == {"v4": [round(4.8 / 2.5, 3), round(4.9 / 2.5, 3), round(4.95 / 2.5, 3)]}
    from sparseinfer.reference.errors import SparseInferError
    with pytest.raises(SparseInferError, match="two sparsities or more; prosparse-llama2-7b has"):
        sparsity_series(_sweep_results(), "prosparse-llama2-7b")


def test_bench_plot_vs_sparsity_draws_the_sweep_and_refuses_one_sparsity(tmp_path):
    from matplotlib.image import imread

    results = tmp_path / "sweep.json"
    results.write_text(json.dumps(_sweep_results()))
    runner = CliRunner()
    r = runner.invoke(cli, ["bench-plot", str(results), "--vs-sparsity", "--model", "prosparse-llama2-13b",
                            "--out", str(tmp_path / "s.png")])
    assert r.exit_code == 0, r.output
    image = imread(tmp_path / "s.png")
    assert image.shape[0] > 500 and image.std() > 0
    r = runner.invoke(cli, ["bench-plot", str(results), "--vs-sparsity", "--model", "prosparse-llama2-7b",
                            "--out", str(tmp_path / "t.png")])
    assert r.exit_code == 2 and "two sparsities or more" in r.output and not (tmp_path / "t.png").exists()
    r = runner.invoke(cli, ["bench-plot", str(results), "--vs-sparsity", "--sparsity", "0.9",
                            "--out", str(tmp_path / "t.png")])
    assert r.exit_code == 2 and "--vs-sparsity draws them all" in r.output
