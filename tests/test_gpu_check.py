"""The staged GPU-check runner (benchmarks/gpu_check.py), on the CPU: stage selection, the
time budget, failures, what its commands call, and what it brings back."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import types
from pathlib import Path

import click
import numpy as np
import pytest

from sparseinfer.benchmarks import gpu_check as gc
from sparseinfer.kernels import device
from sparseinfer.reference.errors import SparseInferError
from sparseinfer.tools.cli import cli

ROOT = Path(__file__).resolve().parents[1]


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


class FakeRun:
    """subprocess.run stand-in: each command 'takes' seconds[name] and exits with codes[name]."""

    def __init__(self, clock, seconds=None, codes=None, raise_for=None):
        self.clock, self.seconds, self.codes, self.raise_for = clock, seconds or {}, codes or {}, raise_for or {}
        self.calls = []

    def __call__(self, argv, timeout, env, stdout, **_):
        key = next((k for k in self.seconds if k in " ".join(argv)), None)
        self.calls.append((argv, timeout, env))
        stdout.write(f"ran {argv[-1]}\nline two\n")             # the command prints into the log
        for word, exc in self.raise_for.items():
            if word in " ".join(argv):
                raise exc
        self.clock.t += self.seconds.get(key, 1.0)
        code = next((c for k, c in self.codes.items() if k in " ".join(argv)), 0)
        return subprocess.CompletedProcess(argv, code)


def test_parse_stages_expands_groups_in_order_without_repeats():
    assert gc.parse_stages("kernels") == list(gc.GROUPS["kernels"])
    assert gc.parse_stages("bench,preflight,bench") == ["bench", "preflight"]
    assert gc.parse_stages("ort, tests") == [*gc.GROUPS["ort"], "tests"]
    with pytest.raises(click.BadParameter, match="unknown stage 'benh'; expected one of kernels, ort, preflight"):
        gc.parse_stages("preflight,benh")


def test_every_stage_is_in_a_group_and_every_group_member_is_a_stage():
    members = [m for g in gc.GROUPS.values() for m in g]
    assert sorted(members) == sorted(gc.STAGES) and len(members) == len(set(members))


def test_all_stages_pass_within_the_budget(tmp_path):
    clock = FakeClock()
    run = FakeRun(clock, seconds={"pytest": 100.0})
    rows = gc.run_stages(["preflight", "tests", "bench"], tmp_path, 600, run=run, clock=clock, echo=lambda s: None)
    assert [r["status"] for r in rows] == ["passed"] * 3
    assert rows[1]["seconds"] == 100.0 and rows[0]["exit_codes"] == [0, 0]
    # preflight's two commands, then tests, then bench; each timeout is what is left of the budget
    assert len(run.calls) == 4
    assert run.calls[0][1] == pytest.approx(600 - gc.RESERVE_S)
    assert run.calls[3][1] == pytest.approx(600 - gc.RESERVE_S - 1 - 1 - 100)
    summary = json.loads((tmp_path / gc.SUMMARY).read_text())
    assert [s["stage"] for s in summary["stages"]] == ["preflight", "tests", "bench"]
    assert summary["stages"][2]["tail"] == [f"ran {tmp_path}", "line two"]      # the bench command's own lines
    log = (tmp_path / gc.LOG).read_text()
    assert "===== bench:" in log and "ran " in log


def test_a_stage_that_cannot_start_in_time_is_skipped_and_later_ones_still_run(tmp_path):
    clock = FakeClock()
    run = FakeRun(clock, seconds={"test_kernels_gpu": 200.0, "preflight": 0.0, "verify-kernels": 0.0})
    need = gc.STAGES["bench"].min_start_s
    budget = 200 + gc.RESERVE_S + need - 1                        # bench misses its start by one second
    rows = gc.run_stages(["preflight", "tests", "bench", "ort-smoke"], tmp_path, budget, run=run, clock=clock,
                         echo=lambda s: None)
    assert [r["status"] for r in rows] == ["passed", "passed", "skipped", "passed"]
    assert rows[2]["reason"] == f"{need - 1} s left, needs at least {need} s"
    assert need - 1 >= gc.STAGES["ort-smoke"].min_start_s        # so the shorter stage after it still ran


def test_without_a_budget_no_command_has_a_timeout(tmp_path):
    clock = FakeClock()
    run = FakeRun(clock, seconds={"pytest": 10_000.0})
    rows = gc.run_stages(["tests", "bench"], tmp_path, None, run=run, clock=clock, echo=lambda s: None)
    assert [r["status"] for r in rows] == ["passed", "passed"]
    assert [timeout for _, timeout, _ in run.calls] == [None, None]
    assert json.loads((tmp_path / gc.SUMMARY).read_text())["budget_s"] is None


def test_a_failed_preflight_stops_the_run(tmp_path):
    clock = FakeClock()
    run = FakeRun(clock, codes={"preflight": 2})
    rows = gc.run_stages(["preflight", "tests", "bench"], tmp_path, 600, run=run, clock=clock, echo=lambda s: None)
    assert [r["status"] for r in rows] == ["failed", "not run", "not run"]
    assert rows[0]["exit_codes"] == [2] and rows[1]["reason"] == "preflight failed"
    assert len(run.calls) == 1               # verify-kernels after the failed preflight command is not run


def test_a_failed_ordinary_stage_does_not_stop_the_run(tmp_path):
    clock = FakeClock()
    run = FakeRun(clock, codes={"test_kernels_gpu": 1})
    rows = gc.run_stages(["tests", "bench"], tmp_path, 600, run=run, clock=clock, echo=lambda s: None)
    assert [r["status"] for r in rows] == ["failed", "passed"]


def test_timeout_and_missing_tool_are_reported(tmp_path):
    clock = FakeClock()
    run = FakeRun(clock, raise_for={
        "compute-sanitizer": FileNotFoundError("compute-sanitizer"),
        "bench": subprocess.TimeoutExpired(["x"], 5)})
    rows = gc.run_stages(["bench", "sanitize"], tmp_path, 600, run=run, clock=clock, echo=lambda s: None)
    # what the killed command printed before its timeout is in the log and the summary
    assert rows[0]["status"] == "timed out" and rows[0]["tail"][:2] == [f"ran {tmp_path}", "line two"]
    assert rows[0]["tail"][-1].startswith("timed out after")
    assert rows[1]["status"] == "failed" and rows[1]["tail"] == ["compute-sanitizer not found on PATH"]
    assert "[timed out after" in (tmp_path / gc.LOG).read_text()


def test_stage_environments(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/somewhere")
    assert all(gc.stage_env(name)["PYTHONPATH"] == "/somewhere" for name in gc.STAGES)     # the caller's own
    assert gc.stage_env("sanitize")[device.POOL_ENV] == "off"
    monkeypatch.delenv(device.POOL_ENV, raising=False)
    assert device.POOL_ENV not in gc.stage_env("bench")


def _cli_commands(out: Path):
    for stage in gc.STAGES.values():
        for argv in stage.argv(out):
            if "sparseinfer.tools.cli" in argv:
                yield stage.name, argv[argv.index("sparseinfer.tools.cli") + 1:]


@pytest.mark.parametrize("index", range(len(list(_cli_commands(Path("/OUT"))))))
def test_every_sparseinfer_command_of_a_stage_parses(index, tmp_path):
    """Options misspelt in a stage would cost a device call: click parses each one here (the
    files an earlier stage writes, which a later one reads, stand in empty)."""
    stage, args = list(_cli_commands(tmp_path))[index]
    for arg in args:
        if arg.startswith(str(tmp_path)) and arg.endswith(".json"):
            Path(arg).touch()
    sub = cli.commands[args[0]]
    ctx = sub.make_context(args[0], list(args[1:]))
    assert ctx.params, stage                  # parsed, with its options bound


def test_pytest_stages_select_tests_that_exist():
    """Each pytest command of a stage collects tests, in the stage's environment (the sanitize
    stage's Hypothesis profile must exist)."""
    for name in ("tests", "pytest-bench", "ort-tests", "sanitize"):
        argv = next(a for a in gc.STAGES[name].argv(Path("/tmp/OUT")) if "pytest" in a)
        args = [a for a in argv[argv.index("no:cacheprovider") + 1:] if not a.startswith("--benchmark")
                and not a.startswith("/tmp/OUT")]
        proc = subprocess.run([sys.executable, "-m", "pytest", "--co", "-q", "-p", "no:cacheprovider", *args],
                              cwd=ROOT, capture_output=True, text=True, timeout=300, env=gc.stage_env(name))
        ids = [line for line in proc.stdout.splitlines() if "::" in line]
        assert proc.returncode == 0 and ids, f"{name}: {proc.stdout[-500:]} {proc.stderr[-500:]}"
        if name == "pytest-bench":           # one (shape, sparsity): every version and pipeline once
            assert all("13b-0.92" in i for i in ids) and len(ids) == len(gc_bench_targets())


def gc_bench_targets():
    from sparseinfer.kernels.verify import bench_targets
    return bench_targets()


OUTPUT_OPTIONS = ("--out", "--results-dir", "--log-file", "--benchmark-json")


def test_every_file_a_stage_writes_goes_under_out():
    written = []
    for stage in gc.STAGES.values():
        for argv in stage.argv(Path("/OUT")):
            written += [argv[i + 1] for i, a in enumerate(argv) if a in OUTPUT_OPTIONS]
    assert len(written) >= 4 and all(w == "/OUT" or w.startswith("/OUT/") for w in written), written


def test_list_and_bad_arguments_from_the_command_line(tmp_path):
    from click.testing import CliRunner

    r = CliRunner().invoke(gc.cli, ["--list"])
    assert r.exit_code == 0 and all(name in r.output for name in gc.STAGES) and "group ort:" in r.output
    r = CliRunner().invoke(gc.cli, ["--stages", "nope", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "unknown stage 'nope'" in r.output
    r = CliRunner().invoke(gc.cli, ["--stages", "bench", "--budget-s", "10", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "--budget-s" in r.output


@pytest.mark.skipif(device.gpu_unavailable_reason() is None, reason="a GPU is present: preflight would pass")
def test_without_a_gpu_preflight_fails_fast_and_says_why(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sparseinfer.benchmarks.gpu_check", "--stages", "preflight,bench",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    summary = json.loads((tmp_path / gc.SUMMARY).read_text())["stages"]
    assert [s["status"] for s in summary] == ["failed", "not run"]
    assert summary[0]["exit_codes"] == [2]
    assert any(("CuPy is not importable" in line or "no CUDA device" in line) for line in summary[0]["tail"])


def test_cupy_pool_switch(monkeypatch):
    freed = []
    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(
        runtime=types.SimpleNamespace(getDeviceCount=lambda: 1), set_allocator=freed.append))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    device._cupy_module.cache_clear()
    try:
        monkeypatch.setenv(device.POOL_ENV, "sometimes")
        with pytest.raises(SparseInferError, match="SPARSEINFER_CUPY_POOL='sometimes': expected on or off"):
            device._cupy_module()
        monkeypatch.setenv(device.POOL_ENV, "on")
        assert device._cupy_module() is fake and freed == []
        device._cupy_module.cache_clear()
        monkeypatch.setenv(device.POOL_ENV, "off")
        assert device._cupy_module() is fake and freed == [None]
    finally:
        device._cupy_module.cache_clear()


def test_the_property_tests_run_in_parallel_only_where_xdist_is_installed(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    for present in (True, False):
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, real=real, present=present: (object() if present else None) if name == "xdist"
                            else real(name))
        (argv,) = gc.STAGES["tests"].argv(Path("/tmp/OUT"))
        assert gc.XDIST not in argv
        assert (argv[argv.index("gpu") + 1:argv.index("gpu") + 3] == ["-n", str(gc.XDIST_WORKERS)]) == present
        assert argv[-3:] == ["tests/test_kernels_gpu.py", "tests/test_kernels_quant.py", "tests/test_boundaries.py"]
        assert ("-n" in argv) == present


def test_ort_smoke_runs_on_the_cpu_provider_and_fails_in_one_line_without_cuda(monkeypatch):
    import onnxruntime as ort

    from click.testing import CliRunner

    from sparseinfer.benchmarks import ort_smoke

    from sparseinfer.model_export.onnx_builder import IR_VERSION, OPSET
    model = ort_smoke._model()      # onnx's default IR version (14 in onnx 1.23) is past onnxruntime 1.31's 13
    assert model.ir_version == IR_VERSION and [(o.domain, o.version) for o in model.opset_import] == [("", OPSET)]
    runner = CliRunner()
    r = runner.invoke(gc.cli, ["ort-smoke", "--provider", "cpu"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert report["providers"] == ["CPUExecutionProvider"]
    assert {"NonZero", "Where", "Gather", "Softmax"} <= set(report["ops_by_provider"]["CPUExecutionProvider"])
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        r = runner.invoke(gc.cli, ["ort-smoke"])
        assert r.exit_code == 2 and "has no CUDAExecutionProvider" in r.output
    real = ort_smoke._expected
    monkeypatch.setattr(ort_smoke, "_expected", lambda *a: {**real(*a), "s": real(*a)["s"] + 1})
    r = runner.invoke(gc.cli, ["ort-smoke", "--provider", "cpu"])
    assert r.exit_code == 2 and "output s differs from NumPy's" in r.output


def test_preflight_report_names_versions_the_grid_and_what_later_stages_need(monkeypatch, tmp_path):
    from sparseinfer.benchmarks import timing
    from sparseinfer.kernels import device

    compiled = []
    fake = types.SimpleNamespace(__version__="14.2.0", cuda=types.SimpleNamespace(
        runtime=types.SimpleNamespace(driverGetVersion=lambda: 13000),
        nvrtc=types.SimpleNamespace(getVersion=lambda: (13, 0))))
    monkeypatch.setattr(device, "_cupy_module", lambda: fake)
    monkeypatch.setattr(device, "kernel", compiled.append)
    monkeypatch.setattr(device, "occupancy", lambda name, threads: (132, 8, "driver"))
    monkeypatch.setattr(gc, "subnormal_probe", lambda: None)       # on the emulator below
    monkeypatch.setattr(gc, "_ort_has_cuda", lambda: False)
    monkeypatch.setattr(timing, "device_info", lambda: {"device": "Stand-in", "peak_bandwidth_gb_per_s": 1.0})
    monkeypatch.setenv("PATH", str(tmp_path))                      # no compute-sanitizer, no ncu here
    (tmp_path / "ncu").write_text("#!/bin/sh\n")
    (tmp_path / "ncu").chmod(0o755)
    monkeypatch.chdir(tmp_path)
    report = gc.preflight_report()
    assert sorted(compiled) == sorted(device.KERNEL_SOURCE) and report["kernels_compiled"] == len(compiled)
    assert report["cupy"] == "14.2.0" and report["nvrtc"] == "13.0" and report["driver"] == 13000
    assert report["persistent_grid"] == {"sms": 132, "blocks_per_sm": 8, "from": "driver"}
    needs = report["later_stages_need"]
    assert needs["compute-sanitizer"] is False and needs["ncu"] is True
    assert needs["onnxruntime CUDA provider"] is False


@pytest.mark.emulated
def test_subnormal_probe_passes_on_kernels_that_keep_subnormals_and_names_a_flush(monkeypatch):
    from sparseinfer.kernels import emulator, ops
    from sparseinfer.reference.errors import SparseInferError

    from sparseinfer.reference.signs import pack_signs

    assert int(pack_signs(gc.SUBNORMAL_PROBE)[0, 0]) == 0b11001   # -1e-40, -2.0 and -1e-45 are negative
    with emulator.installed():
        gc.subnormal_probe()                                     # the emulated kernels keep them
        real = ops.pack_signs

        def flushing(m):                                         # what -ftz=true did on the H200
            data = m.data.copy()
            data[np.abs(data) < np.finfo(np.float32).tiny] = 0.0
            return real(dataclasses.replace(m, data=data))

        monkeypatch.setattr(ops, "pack_signs", flushing)
        with pytest.raises(SparseInferError, match=r"flush subnormals: sign word 0x8, the reference's 0x19"):
            gc.subnormal_probe()
