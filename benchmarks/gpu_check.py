"""The GPU checks as one staged run within a time budget: ``python3 -m sparseinfer.benchmarks.gpu_check``.

The checks run as named stages, in order, each under a timeout cut from what is left of
``--budget-s`` (no limit by default). A stage that cannot start with enough time left is
skipped and says so; a failed ``preflight`` stops the run before minutes are spent on the
rest. Everything goes under ``--out``: ``gpu-check.log`` (every command's output, under a
header per stage), ``summary.json`` (rewritten after each stage: status, seconds, exit
codes, last lines) and the files the stages write (``<device>.json``, ``bench.json``,
``sweep-13b.json`` / ``.png``, ``pytest-bench.json``, ``profile.txt``, ``cuda-decode.json``).

Run from the repository root on a machine with an NVIDIA GPU, after
``pip install -e '.[gpu,test]'`` and, for the ``ort`` group, onnxruntime-gpu in place of
onnxruntime (benchmarks/README.md)::

    python3 -m sparseinfer.benchmarks.gpu_check --stages kernels --out out/gpu-check

``--stages`` takes stage names and the groups ``kernels`` and ``ort``, comma-separated;
``--list`` prints them with their estimates.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

import click

from sparseinfer.kernels.device import POOL_ENV

LOG = "gpu-check.log"
SUMMARY = "summary.json"
RESERVE_S = 10                       # kept back from the budget to write the summary
TAIL_LINES = 15
SANITIZER_EXIT = 97                  # compute-sanitizer's exit code when it reports an error

_CLI = ("{py}", "-m", "sparseinfer.tools.cli")
_PYTEST = ("{py}", "-m", "pytest", "-q", "-p", "no:cacheprovider")
# The kernels' property tests, every version on float and on block-quantized weights.
_PROPERTY_TESTS = ("tests/test_kernels_gpu.py", "tests/test_kernels_quant.py")
# tail shapes for the sanitizers: d 97 (no 16-byte chunk whole), d 300 (sign words
# alternately aligned), k 600 / 1031 across the down projection's 512-row chunks
_SANITIZE_SHAPES = ((97, 600), (300, 1031))


# Where pytest-xdist is installed (the device image has it), the property tests run in
# XDIST_WORKERS processes sharing the GPU: their time goes mostly to the NumPy reference
# on the host, which then uses several of the device's 16 cores instead of one.
XDIST = "<xdist>"
XDIST_WORKERS = 6


def xdist_args() -> list[str]:
    import importlib.util

    return ["-n", str(XDIST_WORKERS)] if importlib.util.find_spec("xdist") is not None else []


def _verify(d: int, k: int) -> tuple:
    return (*_CLI, "verify-kernels", "--backend", "gpu", "--d", str(d), "--k", str(k))


def _sanitizer(tool: str, argv: tuple, *extra: str) -> tuple:
    return ("compute-sanitizer", "--tool", tool, "--error-exitcode", str(SANITIZER_EXIT), *extra, *argv)


@dataclass(frozen=True)
class Stage:
    name: str
    what: str
    commands: tuple                  # argv templates: {py} the interpreter, {out} the output folder
    estimate_s: int                  # seconds, rounded up from the H200 runs of 2026-11-26 (16 cores)
    min_start_s: int                 # not started with less left than this
    env: dict = field(default_factory=dict)
    stops_run: bool = False          # a failure here leaves the later stages not run

    def argv(self, out: Path) -> list[list[str]]:
        """The commands with {py} and {out} filled in, and XDIST as -n N or nothing."""
        xdist = xdist_args()
        return [[b for a in cmd for b in (xdist if a == XDIST else [a.format(py=sys.executable, out=out)])]
                for cmd in self.commands]


STAGES = {s.name: s for s in (
    Stage("preflight", "device, driver, CUDA / CuPy / NVRTC versions, every kernel compiled, every version "
                       "verified once at d 1100, k 1031 (the block-quantized ones at d 1120: whole blocks)",
          (("{py}", "-m", "sparseinfer.benchmarks.gpu_check", "preflight"), _verify(1100, 1031)),
          estimate_s=20, min_start_s=20, stops_run=True),
    Stage("tests", "the Hypothesis property tests on the GPU backend (tests/test_kernels_gpu.py, and on block-"
                   "quantized weights tests/test_kernels_quant.py) and the constructed boundary cases "
                   "(tests/test_boundaries.py: gates at the threshold and at +-0.0, signed zeros in x), in "
                   f"{XDIST_WORKERS} processes where pytest-xdist is installed",
          ((*_PYTEST, "-m", "gpu", XDIST, *_PROPERTY_TESTS, "tests/test_boundaries.py"),), estimate_s=40,
          min_start_s=40),
    Stage("bench", "sparseinfer bench: every version and pipeline (the neuron-major, fused and block-quantized ones "
                   "included), 7B/13B, sparsity 0.90/0.92, then the 8-layer decode loop eager and as a CUDA graph "
                   "({out}/<device>.json)",
          ((*_CLI, "bench", "--json", "{out}/bench.json", "--results-dir", "{out}"),), estimate_s=60, min_start_s=60),
    Stage("sweep", "sparseinfer bench at the 13B shape, sparsity 0.80/0.90/0.95, no decode loop, then how each "
                   "pipeline's speed-ups, % of peak and the predictor move with sparsity ({out}/sweep-13b.json, "
                   "{out}/sweep-13b.png)",
          ((*_CLI, "bench", "--model", "prosparse-llama2-13b", "--sparsity", "0.8,0.9,0.95", "--loop-layers", "0",
            "--repeats", "20", "--json", "{out}/sweep-13b.json"),
           (*_CLI, "bench-plot", "{out}/sweep-13b.json", "--vs-sparsity", "--out", "{out}/sweep-13b.png")),
          estimate_s=60, min_start_s=45),
    Stage("calibrate", "sparseinfer latency --calibrate on the bench stage's results: the H200 constants fitted "
                       "and the model's error per measured row (in the log)",
          ((*_CLI, "latency", "--model", "prosparse-llama2-13b", "--hw", "h200", "--calibrate", "{out}/bench.json"),),
          estimate_s=5, min_start_s=5),
    Stage("sanitize", "compute-sanitizer memcheck on the GPU property tests (3 Hypothesis examples each) and on "
                      "verify-kernels at tail shapes, CuPy's pool off (one allocation per buffer); racecheck and "
                      "synccheck on verify-kernels",
          (_sanitizer("memcheck", (*_PYTEST, "-m", "gpu", *_PROPERTY_TESTS), "--leak-check", "no"),)
          + tuple(_sanitizer("memcheck", _verify(d, k), "--leak-check", "no") for d, k in _SANITIZE_SHAPES)
          + (_sanitizer("racecheck", _verify(*_SANITIZE_SHAPES[1]), "--racecheck-report", "hazard"),
             _sanitizer("synccheck", _verify(*_SANITIZE_SHAPES[1]))),
          estimate_s=45, min_start_s=45, env={POOL_ENV: "off", "HYPOTHESIS_PROFILE": "sanitizer"}),
    Stage("pytest-bench", "the pytest-benchmark cases at the 13B shape, sparsity 0.92 ({out}/pytest-bench.json)",
          ((*_PYTEST, "-m", "gpu", "tests/test_kernels_bench.py", "-k", "13b and 0.92", "--benchmark-enable",
            "--benchmark-json", "{out}/pytest-bench.json"),), estimate_s=25, min_start_s=25),
    Stage("profile", "Nsight Compute on the hot kernels at the 13B shape, sparsity 0.92, the fused MLP kernel "
                     "and the Q4_0 kernels included ({out}/profile.txt)",
          (("ncu", "--section", "SpeedOfLight", "--section", "MemoryWorkloadAnalysis", "--section", "Occupancy",
            "--section", "LaunchStats", "--section", "WarpStateStats",
            "-k", "regex:^(predict_rows|gate_up_.*(fp16|q4_0)|down_.*(fp16|q4_0)|dense_.*fp16|mlp_fused_fp16)",
            "--log-file", "{out}/profile.txt", *_CLI, "verify-kernels", "--backend", "gpu",
            "--model", "prosparse-llama2-13b", "--sparsity", "0.92"),),
          estimate_s=50, min_start_s=50),
    Stage("ort-smoke", "a small graph on onnxruntime's CUDA provider against NumPy (onnxruntime-gpu installed, "
                       "every kernel image it needs present)",
          (("{py}", "-m", "sparseinfer.benchmarks.gpu_check", "ort-smoke"),),
          estimate_s=10, min_start_s=10, stops_run=True),
    Stage("ops-build", "sparseinfer build-ops --cuda: the op library with its CUDA kernel (nvcc, the kernels' "
                       "sources), paths and C API version in the log",
          ((*_CLI, "build-ops", "--cuda", "--json"),), estimate_s=60, min_start_s=60, stops_run=True),
    Stage("ort-tests", "the ort_cuda tests: dense and sparse exports on the CUDA provider, IOBinding, masks bit for bit, "
                       "the op library's CUDA kernel against the reference's masks (and bit for bit on Q8_0 / Q4_0 / Q4_1 "
                          "nodes), eval's rows and the design-space "
                       "runner's masks on the CUDA provider against the CPU's and the reference's",
          ((*_PYTEST, "-m", "ort_cuda"),), estimate_s=45, min_start_s=30),
    Stage("ort-bench", "bench-decode --provider cuda --target cuda --cuda-graph (sparse on the op library's CUDA "
                       "kernel and on the function bodies; dense and sparse also replayed as CUDA graphs), then 8 "
                       "profiled tokens per model: time by provider, top ops ({out}/cuda-decode.json); then the same "
                       "in float16 without profiles ({out}/cuda-decode-fp16.json)",
          ((*_CLI, "bench-decode", "--provider", "cuda", "--target", "cuda", "--repeats", "5", "--profile-tokens", "8",
            "--cuda-graph", "--out", "{out}/cuda-decode.json"),
           (*_CLI, "bench-decode", "--provider", "cuda", "--target", "cuda", "--repeats", "5", "--dtype", "float16",
            "--cuda-graph", "--work-dir", "out/bench-decode-fp16", "--out", "{out}/cuda-decode-fp16.json")),
          estimate_s=150, min_start_s=90),
)}
GROUPS = {"kernels": ("preflight", "tests", "bench", "sweep", "calibrate", "sanitize", "pytest-bench", "profile"),
          "ort": ("ort-smoke", "ops-build", "ort-tests", "ort-bench")}


def parse_stages(text: str) -> list[str]:
    """Stage and group names, comma-separated, in the order given (groups expanded)."""
    names = []
    for item in (t.strip() for t in text.split(",")):
        if item in GROUPS:
            names += GROUPS[item]
        elif item in STAGES:
            names.append(item)
        else:
            raise click.BadParameter(f"unknown stage {item!r}; expected one of {', '.join([*GROUPS, *STAGES])}")
    return list(dict.fromkeys(names))


def stage_env(name: str) -> dict:
    """The environment of a stage's commands: the caller's, with the stage's own settings."""
    return {**os.environ, **STAGES[name].env}


def _tail(text: str) -> list[str]:
    return text.rstrip().splitlines()[-TAIL_LINES:]


def run_stages(names, out: Path, budget_s: float | None, run: Callable = subprocess.run,
               clock: Callable = time.monotonic, echo=print) -> list[dict]:
    """Run the stages in order within ``budget_s`` (None: no limit); returns (and keeps
    writing) the summary."""
    out.mkdir(parents=True, exist_ok=True)
    start = clock()
    results, stopped_by = [], None
    with open(out / LOG, "a") as log:          # commands write into it directly
        for name in names:
            stage = STAGES[name]
            left = math.inf if budget_s is None else budget_s - (clock() - start) - RESERVE_S
            row = {"stage": name, "what": stage.what.format(out=out), "estimate_s": stage.estimate_s}
            if stopped_by:
                row.update(status="not run", reason=f"{stopped_by} failed")
            elif left < stage.min_start_s:
                row.update(status="skipped", reason=f"{left:.0f} s left, needs at least {stage.min_start_s} s")
            else:
                row.update(_run_stage(stage, out, left, log, run, clock))
                if row["status"] != "passed" and stage.stops_run:
                    stopped_by = name
            results.append(row)
            echo(f"[gpu-check] {name}: {row['status']}"
                 + (f" in {row['seconds']:.0f} s" if "seconds" in row else f" ({row['reason']})"))
            (out / SUMMARY).write_text(json.dumps({"budget_s": budget_s, "stages": results}, indent=1) + "\n")
    return results


def _run_stage(stage: Stage, out: Path, left: float, log, run, clock) -> dict:
    """Run a stage's commands in turn, their output streamed into the log as it comes (so a
    command killed by the device's own time limit still leaves what it printed)."""
    t0 = clock()
    codes = []
    env = stage_env(stage.name)

    def result(status: str, tail: list[str]) -> dict:
        return {"status": status, "seconds": round(clock() - t0, 1), "exit_codes": codes, "tail": tail}

    for argv in stage.argv(out):
        timeout = None if left == math.inf else left - (clock() - t0)
        log.write(f"\n===== {stage.name}: {' '.join(argv)}\n")
        log.flush()
        start = log.tell()
        try:
            proc = run(argv, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            log.write(f"\n[timed out after {timeout:.0f} s]\n")
            return result("timed out", _log_tail(log, start) + [f"timed out after {timeout:.0f} s: {' '.join(argv)}"])
        except FileNotFoundError:
            log.write(f"[{argv[0]} not found]\n")
            return result("failed", [f"{argv[0]} not found on PATH"])
        codes.append(proc.returncode)
        if proc.returncode != 0:
            return result("failed", _log_tail(log, start))
    return result("passed", _log_tail(log, start))


def _log_tail(log, start: int) -> list[str]:
    """The last lines the current command wrote to the log (from offset ``start``)."""
    log.flush()
    with open(log.name, errors="replace") as f:
        f.seek(start)
        return _tail(f.read())


# A row whose sign bits tell whether the compiled kernels flush subnormals: -1e-40 and -1e-45
# are negative (bit 1) unless a flush-to-zero comparison reads them as 0; -0.0 is never.
SUBNORMAL_PROBE = np.array([[-1e-40, 1e-40, -0.0, -2.0, -1e-45, 3e-39, 0.5]], dtype=np.float32)


def subnormal_probe() -> None:
    """Pack SUBNORMAL_PROBE's signs with the compiled kernels; raise if they differ from the
    reference's (as they did when CuPy's own compile added -ftz=true)."""
    from sparseinfer.kernels import ops
    from sparseinfer.kernels.device import DeviceMatrix, cupy
    from sparseinfer.reference.errors import SparseInferError
    from sparseinfer.reference.signs import pack_signs

    got = ops.pack_signs(DeviceMatrix.from_host("subnormal probe", SUBNORMAL_PROBE, xp=cupy())).get()
    want = pack_signs(SUBNORMAL_PROBE)
    if not np.array_equal(got, want):
        raise SparseInferError(f"the compiled kernels flush subnormals: sign word {int(got.ravel()[0]):#x}, the "
                               f"reference's {int(want.ravel()[0]):#x} (a flush-to-zero compile option?)")


def preflight_report() -> dict:
    """Versions and device facts; compiles every kernel (raises on the first that fails) and
    checks that they keep subnormals (:func:`subnormal_probe`)."""
    from sparseinfer.kernels.device import KERNEL_SOURCE, cupy, kernel, occupancy
    from sparseinfer.kernels.registry import GATE_UP

    from .timing import device_info

    cp = cupy()
    info = device_info()
    for name in KERNEL_SOURCE:
        kernel(name)
    subnormal_probe()
    persistent = GATE_UP["v4_persistent"].launches[0]
    sms, per_sm, source = occupancy(persistent.name("fp16"), persistent.threads)
    return {**info, "cupy": cp.__version__, "driver": cp.cuda.runtime.driverGetVersion(),
            "nvrtc": ".".join(map(str, cp.cuda.nvrtc.getVersion())), "python": sys.version.split()[0],
            "kernels_compiled": len(KERNEL_SOURCE), "subnormals_kept": True,
            "persistent_grid": {"sms": sms, "blocks_per_sm": per_sm, "from": source},
            "later_stages_need": {"compute-sanitizer": bool(shutil.which("compute-sanitizer")),
                                  "ncu": bool(shutil.which("ncu")), "pytest-xdist (-n)": bool(xdist_args()),
                                  "onnxruntime CUDA provider": _ort_has_cuda()}}


def _ort_has_cuda() -> bool:
    """Whether the installed onnxruntime is a GPU build (what the ``ort`` stages need)."""
    try:
        import onnxruntime
    except ImportError:
        return False
    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


@click.group(invoke_without_command=True)
@click.option("--stages", "stages_text", default="kernels", show_default=True,
              help="Comma-separated stage or group names (groups: kernels, ort).")
@click.option("--budget-s", type=click.FloatRange(min=30), default=None,
              help="Seconds for the whole run; each stage's timeout is cut from what is left, and a stage "
                   "that cannot start in time is skipped. Default: no limit.")
@click.option("--out", type=click.Path(file_okay=False), default="out/gpu-check", show_default=True,
              help="Output folder for the log, summary.json and the stages' files.")
@click.option("--list", "list_only", is_flag=True, help="List the stages and groups, run nothing.")
@click.pass_context
def cli(ctx, stages_text, budget_s, out, list_only):
    """Run the GPU checks in stages within a time budget (see the module's docstring).

    Exit code 0 when every stage run passed, 1 when one failed or timed out, 2 for bad
    arguments. Skipped stages (too little time left) are listed in summary.json.
    """
    if ctx.invoked_subcommand:
        return
    names = parse_stages(stages_text)
    if list_only:
        for name, stage in STAGES.items():
            click.echo(f"{name:13} ~{stage.estimate_s:4d} s  {stage.what.format(out=out)}")
        for group, members in GROUPS.items():
            click.echo(f"group {group}: {', '.join(members)}")
        return
    results = run_stages(names, Path(out), budget_s, echo=lambda s: click.echo(s, err=True))
    ctx.exit(0 if all(r["status"] in ("passed", "skipped") for r in results) else 1)


@cli.command()
def preflight():
    """Print the device, its versions and peak bandwidth as JSON after compiling every kernel."""
    from sparseinfer.reference.errors import SparseInferError

    try:
        click.echo(json.dumps(preflight_report(), indent=1))
    except SparseInferError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)


@cli.command("ort-smoke")
@click.option("--provider", type=click.Choice(["cuda", "cpu"]), default="cuda", show_default=True)
def ort_smoke(provider):
    """Run a small graph on onnxruntime's provider against NumPy; print where its ops ran (JSON)."""
    from sparseinfer.reference.errors import SparseInferError

    from .ort_smoke import smoke

    try:
        click.echo(json.dumps(smoke(provider), indent=1))
    except SparseInferError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    cli()
