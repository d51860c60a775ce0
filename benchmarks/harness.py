"""The benchmark: every kernel version and every MLP pipeline at the ProSparse shapes.

For each model in ``BENCH_SHAPES`` and sparsity in ``BENCH_SPARSITIES`` (fp16 weights,
inputs built by ``make_layer`` so that exactly that fraction of gate rows is predicted
zero; the block-quantized versions and pipelines on that layer quantized, its ``dtype`` the
format), each row says whether the version's output was verified against the reference
at that shape (``kernels.verify``: bits, or the rigorous bound for the atomic version), its
time, the bytes it touches (its record's ``touched``), GB/s, % of peak, and its speedup over
cuBLAS dense fp16 GEMVs (CuPy matmul) for the same step, timed in the same run.

The ``baseline`` row (``dense-gemv``) is the strong dense baseline: the dense
fp16 MLP as this project's own bandwidth-tuned GEMVs, checked against the rigorous bound.
Every ``mlp`` row also gets ``strong_dense_us``, ``best_dense_us`` (the faster of cuBLAS and
that row, where it verified), ``best_dense`` (which one) and ``speedup_vs_best_dense``: the
headline ratio.
"""
from __future__ import annotations

import copy
import datetime
from dataclasses import dataclass

import numpy as np

from sparseinfer.kernels import DEFAULT_PIPELINE, PIPELINES
from sparseinfer.kernels.device import cupy
from sparseinfer.kernels.graph import MLPGraph, capture
from sparseinfer.kernels.shapes import BENCH_DTYPE, BENCH_SHAPES, BENCH_SPARSITIES, LOOP_LAYERS
from sparseinfer.kernels.verify import ALPHA, TARGET_FAMILIES, Case, Check, bench_targets
from sparseinfer.reference import Activation

from .timing import Timer, device_info, empty_launch_us, host_us


class DenseBaseline:
    """cuBLAS dense fp16 GEMVs (CuPy matmul) of the same layer, x in fp16."""

    def __init__(self, layer, activation: Activation):
        cp = cupy()
        self.cp = cp
        self.wg, self.wu, self.wd = (cp.asarray(w.astype(np.float16)) for w in (layer.w_gate, layer.w_up, layer.w_down))
        self.x = cp.asarray(layer.x.astype(np.float16))
        self.threshold = np.float16(activation.threshold)
        self.h = self.gate_up()

    def clone(self) -> "DenseBaseline":
        """The same layer in new device memory (another layer of a decode step)."""
        other = copy.copy(self)
        other.wg, other.wu, other.wd = (w.copy() for w in (self.wg, self.wu, self.wd))
        return other

    def gate_up(self):
        g = self.wg @ self.x
        return self.cp.where(g >= self.threshold, g, 0) * (self.wu @ self.x)

    def down(self):
        return self.wd @ self.h

    def mlp(self):
        return self.wd @ self.gate_up()


def weights_of(kernel: str, version: str) -> str:
    """The weights a row's version reads: its block format, or the benchmark's float dtype."""
    return TARGET_FAMILIES[kernel][version].weights or BENCH_DTYPE


def _row(kernel, version, shape, sparsity, verified, timing, n_bytes, peak, dense_us):
    gb_per_s = n_bytes / (timing.median_us * 1e-6) / 1e9
    return {"kernel": kernel, "version": version, "model": shape.model, "d": shape.d, "k": shape.k,
            "dtype": weights_of(kernel, version), "sparsity": sparsity, "verified": bool(verified),
            "latency_us": round(timing.median_us, 3), "latency_us_spread": round(timing.spread_us, 3),
            "bytes": int(n_bytes), "gb_per_s": round(gb_per_s, 1),
            "pct_peak": round(100.0 * gb_per_s / peak, 1) if peak else 0.0,
            "dense_baseline_us": round(dense_us, 3), "speedup_vs_dense": round(dense_us / timing.median_us, 3)}


STRONG_DENSE = "dense-gemv"      # the baseline row the headline ratio is also read against
# The cuBLAS step each family's rows are compared with (a key of BenchCase.dense_us), by the step its
# versions do (a quantized family's too: gate_up_q4_0 is gate_up); others: the whole MLP.
DENSE_STEP = {"gate_up": "gate_up", "down": "down"}


@dataclass
class Measurement(Check):
    """One benchmark row before timing: the verifier's check, the bytes, the cuBLAS step."""
    n_bytes: int
    baseline: str          # key of BenchCase.dense_us


class BenchCase(Case):
    """The verifier's case with the cuBLAS dense timings, built once and shared by every row
    (``sparseinfer bench`` and the pytest-benchmark cases); ``timer`` None: no timings."""

    def __init__(self, shape, sparsity: float, timer: Timer | None, seed: int = 0, log=print):
        super().__init__(shape, sparsity, seed, log)
        self.timer = timer
        self.dense_us = {}
        if timer is not None:
            dense = DenseBaseline(self.layer, self.act)
            self.dense_us = {"mlp": timer(dense.mlp).median_us, "gate_up": timer(dense.gate_up).median_us,
                             "down": timer(dense.down).median_us}
            log(f"  cuBLAS dense fp16: {self.dense_us}")

    def pipeline_bytes(self, pipe) -> int:
        """Bytes a pipeline touches at this shape."""
        return self.touched("mlp", pipe.name)

    def measurement(self, kernel: str, version: str) -> Measurement:
        """Run ``version`` of ``kernel`` once, verified against the reference at this shape."""
        c = self.check(kernel, version)
        step = getattr(TARGET_FAMILIES[kernel][version], "step", kernel)      # a pipeline: its kernel, "mlp..."
        return Measurement(c.kernel, c.version, c.fn, c.verified, self.touched(kernel, version),
                           DENSE_STEP.get(step, "mlp"))

    def row(self, m: Measurement, timing, peak: float) -> dict:
        return _row(m.kernel, m.version, self.shape, self.sparsity, m.verified, timing, m.n_bytes, peak,
                    self.dense_us[m.baseline])


def _error_text(e: Exception) -> str:
    """An exception as a row's one-line ``error``."""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def bench_case(shape, sparsity: float, timer: Timer, peak: float, seed: int = 0, log=print) -> list[dict]:
    """One row per version and pipeline; a version that raises on the device is a row with its
    ``error`` (``verified: false``, no timings) and the others still run."""
    case = BenchCase(shape, sparsity, timer, seed, log)
    out = []
    for kernel, version in bench_targets():
        try:
            m = case.measurement(kernel, version)
            t = timer(m.fn)
        except Exception as e:           # CuPy's and the driver's own exception types
            error = _error_text(e)
            out.append({"kernel": kernel, "version": version, "model": shape.model, "d": shape.d, "k": shape.k,
                        "dtype": weights_of(kernel, version), "sparsity": sparsity, "verified": False, "error": error})
            log(f"  {kernel} {version}: FAILED {error}")
            continue
        out.append(case.row(m, t, peak))
        log(f"  {kernel} {version}: {t.median_us:.2f} us, {m.n_bytes / t.median_us / 1e3:.0f} GB/s, "
            f"verified {m.verified}")
    add_best_dense(out)
    head = next((r for r in out
                 if r["kernel"] == "mlp" and r["version"] == DEFAULT_PIPELINE and "best_dense_us" in r), None)
    if head:
        log(f"  headline {DEFAULT_PIPELINE}: {head['speedup_vs_best_dense']:.2f}x the faster dense "
            f"({head['best_dense']}: cuBLAS {head['dense_baseline_us']:.1f} us, {STRONG_DENSE} "
            f"{head['strong_dense_us'] if head['strong_dense_us'] is not None else 'not verified'} us)")
    return out


def add_best_dense(rows: list[dict]) -> None:
    """Each timed ``mlp`` row of one case gets the strong dense row's time (None where it failed
    or did not verify), the faster of it and cuBLAS, which one that is, and the speed-up over it."""
    strong = next((r for r in rows if r["kernel"] == "baseline" and r["version"] == STRONG_DENSE and r.get("verified")
                   and "latency_us" in r), None)
    for r in rows:
        if r["kernel"] != "mlp" or "latency_us" not in r:
            continue
        cublas = r["dense_baseline_us"]
        strong_us = strong["latency_us"] if strong else None
        best, which = (strong_us, STRONG_DENSE) if strong_us is not None and strong_us < cublas else (cublas, "cublas")
        r.update(strong_dense_us=strong_us, best_dense_us=best, best_dense=which,
                 speedup_vs_best_dense=round(best / r["latency_us"], 3))


def decode_loop(shape, sparsity: float, layers: int, timer: Timer, seed: int = 0, log=print) -> dict:
    """A decode step's MLPs: ``layers`` copies of one layer (distinct device memory, so the L2
    cannot hold them) run back to back, eagerly and as one CUDA graph, for every pipeline and
    for cuBLAS. Eager loops pay Python's launch cost per kernel; the graph shows what is left
    when the host is out of the way. Times are per layer; each output is verified."""
    if layers < 1:
        raise ValueError(f"decode loop needs at least 1 layer, got {layers}")
    case = BenchCase(shape, sparsity, None, seed, log)
    am, x, d, k = case.alpha_milli, case.x, shape.d, shape.k
    copies = [case.mlp] + [case.mlp.clone() for _ in range(layers - 1)]
    dense = [DenseBaseline(case.layer, case.act)]
    dense += [dense[0].clone() for _ in range(layers - 1)]
    rows = []

    def timed(name, mode, fn, verified, n_bytes, error=None):
        row = {"pipeline": name, "mode": mode, "verified": verified, "bytes_per_layer": int(n_bytes)}
        if error is None:
            t = timer(fn, flush=False)
            row.update(us_per_layer=round(t.median_us / layers, 3), spread_us_per_layer=round(t.spread_us / layers, 3),
                       host_us_per_layer=round(host_us(fn) / layers, 3))
        else:
            row["error"] = error
        rows.append(row)
        log(f"  loop {name} {mode}: " + (error or f"{row['us_per_layer']:.2f} us/layer (host {row['host_us_per_layer']:.2f}), "
                                          f"verified {verified}"))

    dense_bytes = case.pipeline_bytes(PIPELINES["dense"])

    def dense_step():
        return [db.mlp() for db in dense]

    want_dense = [o.get() for o in dense_step()]
    timed("cublas-dense", "eager", dense_step, None, dense_bytes)
    try:
        g = capture(dense_step)
        g.replay()
        timed("cublas-dense", "graph", g.replay,
              all(np.array_equal(o.get(), w) for o, w in zip(g.result, want_dense)), dense_bytes)
    except Exception as e:                # cuBLAS that cannot be recorded is a finding, not a crash
        timed("cublas-dense", "graph", None, False, dense_bytes, error=_error_text(e))

    for name, pipe in PIPELINES.items():
        mlps = [m.with_pipeline(name) for m in copies]
        n_bytes = case.pipeline_bytes(pipe)

        def ok(outs, pipe=pipe):
            return all(case.pipeline_verified(pipe, o.get()) for o in outs)
        timed(name, "eager", lambda mlps=mlps: [m.steps(x, am) for m in mlps],
              ok([m.steps(x, am)[3] for m in mlps]), n_bytes)
        try:
            graph = MLPGraph(mlps, ALPHA)
            graph.set_inputs([x] * layers)
            verified = ok(graph())
        except Exception as e:            # a recording that fails is a row with its error
            timed(name, "graph", None, False, n_bytes, error=_error_text(e))
            continue
        timed(name, "graph", graph.replay, verified, n_bytes)

    base = {mode: next((r["us_per_layer"] for r in rows if r["pipeline"] == "cublas-dense" and r["mode"] == mode
                        and "us_per_layer" in r), None) for mode in ("eager", "graph")}
    for r in rows:
        for mode, us in base.items():
            if "us_per_layer" in r and us:
                r[f"speedup_vs_dense_{mode}"] = round(us / r["us_per_layer"], 3)
    return {"model": shape.model, "d": d, "k": k, "dtype": BENCH_DTYPE, "sparsity": sparsity, "layers": layers,
            "rows": rows}


def run(shapes=BENCH_SHAPES, sparsities=BENCH_SPARSITIES, repeats: int = 50, loop_layers: int = LOOP_LAYERS,
        log=print, save=None) -> dict:
    """Every row at every (shape, sparsity); then, with ``loop_layers``, the decode loop at the
    last shape and the highest sparsity (13B at 0.92 by default: the MLP target's point).

    ``save(result)`` is called after every (shape, sparsity) with ``complete: false``, so a run
    cut short by a time limit still leaves what it measured; the returned result is complete.
    """
    timer = Timer(repeats=repeats)
    info = device_info()
    result = {**info, "date": datetime.date.today().isoformat(), "empty_launch_us": round(empty_launch_us(timer), 3),
              "alpha": ALPHA, "complete": False, "rows": []}
    for shape in shapes:
        for s in sparsities:
            result["rows"] += bench_case(shape, s, timer, info["peak_bandwidth_gb_per_s"], log=log)
            if save:
                save(result)
    if loop_layers:
        log(f"decode loop: {loop_layers} layers of {shapes[-1].model} at sparsity {max(sparsities)}")
        try:
            result["decode_loop"] = decode_loop(shapes[-1], max(sparsities), loop_layers, timer, log=log)
        except Exception as e:            # the rows above are the run's results: never lost to the loop
            log(f"decode loop failed: {_error_text(e)}")
            result["decode_loop"] = {"model": shapes[-1].model, "sparsity": max(sparsities), "layers": loop_layers,
                                     "error": _error_text(e), "rows": []}
    result["complete"] = True
    return result
