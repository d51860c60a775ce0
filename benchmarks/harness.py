"""The benchmark: every kernel version and every MLP pipeline at the ProSparse shapes.

For each model in ``BENCH_SHAPES`` and sparsity in ``BENCH_SPARSITIES`` (fp16 weights,
inputs built by ``make_layer`` so that exactly that fraction of gate rows is predicted
zero), each row says whether the version's output was verified against the reference
at that shape (bits, or the rigorous bound for the atomic version), its time, the bytes
it touches (``sim.traffic``), GB/s, % of peak, and its speedup over cuBLAS dense fp16
GEMVs (CuPy matmul) for the same step, timed in the same run.

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
from typing import Callable

import numpy as np

from sparseinfer.kernels import (BASELINE, DEFAULT_PIPELINE, DOWN, GATE_UP, PACK_SIGNS, PIPELINES, PREDICT, SparseMLP,
                                  ops)
from sparseinfer.kernels.baseline_check import dense_mlp_verified
from sparseinfer.kernels.device import DeviceMatrix, cupy
from sparseinfer.kernels.graph import MLPGraph, capture
from sparseinfer.kernels.expected import expected_h1_h3, same_bits, within_down_bound
from sparseinfer.kernels.shapes import BENCH_DTYPE, BENCH_SHAPES, BENCH_SPARSITIES, LOOP_LAYERS, make_layer
from sparseinfer.reference import Activation, mlp_dense, mlp_sparse
from sparseinfer.reference.dtypes import parse_dtype
from sparseinfer.reference.shapes import BUILTIN_MODELS
from sparseinfer.reference.signs import alpha_to_milli, pack_signs
from sparseinfer.sim import traffic

from .timing import Timer, device_info, empty_launch_us, host_us

ALPHA = 1.0


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


def _row(kernel, version, shape, sparsity, verified, timing, n_bytes, peak, dense_us):
    gb_per_s = n_bytes / (timing.median_us * 1e-6) / 1e9
    return {"kernel": kernel, "version": version, "model": shape.model, "d": shape.d, "k": shape.k,
            "dtype": BENCH_DTYPE, "sparsity": sparsity, "verified": bool(verified),
            "latency_us": round(timing.median_us, 3), "latency_us_spread": round(timing.spread_us, 3),
            "bytes": int(n_bytes), "gb_per_s": round(gb_per_s, 1),
            "pct_peak": round(100.0 * gb_per_s / peak, 1) if peak else 0.0,
            "dense_baseline_us": round(dense_us, 3), "speedup_vs_dense": round(dense_us / timing.median_us, 3)}


# What each benchmark row times, by kernel family; tests and ``bench_case`` iterate over it.
TARGET_FAMILIES = {"mlp": PIPELINES, "pack_signs": PACK_SIGNS, "predict": PREDICT, "gate_up": GATE_UP, "down": DOWN,
                   "baseline": BASELINE}
STRONG_DENSE = "dense-gemv"      # the baseline row the headline ratio is also read against


def bench_targets():
    """(kernel, version) of every benchmark row, from the registry."""
    return [(kernel, version) for kernel, family in TARGET_FAMILIES.items() for version in family]


@dataclass
class Measurement:
    """One benchmark row before timing: what to launch, whether it was verified, bytes, baseline."""
    kernel: str
    version: str
    fn: Callable           # launches the kernel(s) once, asynchronously
    verified: bool
    n_bytes: int
    baseline: str          # key of BenchCase.dense_us


class BenchCase:
    """One (shape, sparsity): the layer, the reference results, the device copies and the
    cuBLAS dense timings, built once and shared by every row (``sparseinfer bench`` and
    the pytest-benchmark cases)."""

    def __init__(self, shape, sparsity: float, timer: Timer | None, seed: int = 0, log=print):
        cp = cupy()
        self.shape, self.sparsity, self.timer = shape, sparsity, timer
        self.act = Activation.parse(BUILTIN_MODELS[shape.model].hidden_act)
        layer = self.layer = make_layer(shape.d, shape.k, parse_dtype(BENCH_DTYPE), sparsity, seed)
        self.want, self.trace = mlp_sparse(layer.x, layer.w_gate, layer.w_up, layer.w_down, self.act, ALPHA)
        self.want_dense = mlp_dense(layer.x, layer.w_gate, layer.w_up, layer.w_down, self.act)
        self.h3_want = expected_h1_h3(layer.x, layer.w_gate, layer.w_up, self.act, self.trace.predicted_zero)[1]
        self.w_down_t = np.ascontiguousarray(layer.w_down.T)
        self.alpha_milli = alpha_to_milli(ALPHA)
        log(f"{shape.model} sparsity {sparsity}: predicted {self.trace.predicted_sparsity:.4f}, rows {self.trace.rows}")
        self.mlps = {}
        self.mlp = self._mlp(DEFAULT_PIPELINE)
        self.x = self.mlp.to_device_x(layer.x)
        self.x_signs = ops.pack_x_signs(self.x)
        self.h3_dev = cp.asarray(self.h3_want)
        self.dense_us = {}
        if timer is not None:             # None: verification only (verify_case)
            dense = DenseBaseline(layer, self.act)
            self.dense_us = {"mlp": timer(dense.mlp).median_us, "gate_up": timer(dense.gate_up).median_us,
                             "down": timer(dense.down).median_us}
            log(f"  cuBLAS dense fp16: {self.dense_us}")

    def _mlp(self, pipeline: str) -> SparseMLP:
        """The layer under ``pipeline``; one upload of the weights, shared by every pipeline."""
        if pipeline not in self.mlps:
            if self.mlps:
                self.mlps[pipeline] = next(iter(self.mlps.values())).with_pipeline(pipeline)
            else:
                layer = self.layer
                self.mlps[pipeline] = SparseMLP(layer.w_gate, layer.w_up, layer.w_down, self.act, pipeline=pipeline)
        return self.mlps[pipeline]

    @property
    def all_rows(self) -> dict:
        """Rows a dense step computes, in the form of the trace's ``rows``."""
        return dict.fromkeys(("gate", "up", "down"), self.shape.k)

    def pipeline_bytes(self, pipe) -> int:
        """Bytes a pipeline touches at this shape: the predicted rows when sparse, else all (a
        fused pipeline: those of its separate versions, plus its per-part sums)."""
        rows = self.trace.rows if pipe.sparse else self.all_rows
        d, k = self.shape.d, self.shape.k
        return (traffic.mlp_bytes(pipe.gate_up, pipe.down, d, k, BENCH_DTYPE, rows)
                + (ops.fused_scratch_bytes(d, k) if pipe.fused else 0))

    def pipeline_verified(self, pipe, got) -> bool:
        """A pipeline's output (host) against the reference: bits, or the atomic bound."""
        if not pipe.sparse:
            return same_bits(got, self.want_dense)
        return self._verify_down(got, pipe.deterministic, self.want)

    def _verify_down(self, got, deterministic: bool, want) -> bool:
        if deterministic:
            return same_bits(got, want)
        return bool(within_down_bound(got, self.h3_want, self.w_down_t).all())

    def measurement(self, kernel: str, version: str) -> Measurement:
        """Run ``version`` of ``kernel`` once, verify it against the reference at this shape."""
        shape, rows, am = self.shape, self.trace.rows, self.alpha_milli
        x, x_signs = self.x, self.x_signs
        if kernel == "mlp":
            pipe, mlp = PIPELINES[version], self._mlp(version)
            verified = self.pipeline_verified(pipe, mlp.steps(x, am)[3].get())
            return Measurement(kernel, version, lambda: mlp.steps(x, am), verified, self.pipeline_bytes(pipe), "mlp")
        if kernel == "pack_signs":        # the per-token packing of x, as a 1-row matrix
            run, x_row = PACK_SIGNS[version].run, DeviceMatrix(x, np.dtype(np.float32), 1, shape.d, shape.d)
            verified = np.array_equal(run(x_row).get()[0], pack_signs(self.layer.x))
            return Measurement(kernel, version, lambda: run(x_row), verified, traffic.pack_x_bytes(shape.d), "mlp")
        if kernel == "predict":
            run, w_signs = PREDICT[version].run, self.mlp.w_signs
            zero = run(w_signs, x_signs, shape.d, am)[1]
            verified = np.array_equal(zero.get().astype(bool), self.trace.predicted_zero)
            return Measurement(kernel, version, lambda: run(w_signs, x_signs, shape.d, am), verified,
                               traffic.predict_bytes(version, shape.d, shape.k), "mlp")
        if kernel == "gate_up":
            run, mlp = GATE_UP[version].run, self.mlp
            h3 = run(mlp, x, x_signs, am)[1].get()
            dense_rows = version == "dense"
            layer = self.layer
            want_h3 = expected_h1_h3(layer.x, layer.w_gate, layer.w_up, self.act)[1] if dense_rows else self.h3_want
            n = self.all_rows if dense_rows else rows
            return Measurement(kernel, version, lambda: run(mlp, x, x_signs, am), same_bits(h3, want_h3),
                               traffic.gate_up_bytes(version, shape.d, shape.k, BENCH_DTYPE, n["gate"], n["up"]),
                               "gate_up")
        if kernel == "down":
            v, h3, wt = DOWN[version], self.h3_dev, self.mlp.w_down_t
            verified = self._verify_down(v.run(h3, wt).get(), v.deterministic, self.want)
            return Measurement(kernel, version, lambda: v.run(h3, wt), verified,
                               traffic.down_bytes(version, shape.d, shape.k, BENCH_DTYPE, rows["down"]), "down")
        if kernel == "baseline":          # the strong dense MLP: W_down in the HF layout, its own upload
            run, mlp, w_down, layer = BASELINE[version].run, self.mlp, self._w_down_dense(), self.layer
            h1, h3, out = (a.get() for a in run(x, mlp.w_gate, mlp.w_up, w_down, self.act))
            verified = dense_mlp_verified(h1, h3, out, layer.x, layer.w_gate, layer.w_up, self.w_down_t, self.act)
            return Measurement(kernel, version, lambda: run(x, mlp.w_gate, mlp.w_up, w_down, self.act), verified,
                               traffic.strong_dense_bytes(shape.d, shape.k, BENCH_DTYPE), "mlp")
        raise ValueError(f"unknown benchmark kernel {kernel!r}; expected one of {', '.join(TARGET_FAMILIES)}")

    def _w_down_dense(self) -> DeviceMatrix:
        """W_down [d, k] (Hugging Face layout) on the device, for the strong dense baseline."""
        if getattr(self, "_w_down_dev", None) is None:
            self._w_down_dev = DeviceMatrix.from_host("w_down", self.layer.w_down, check_nan=False)
        return self._w_down_dev

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
                        "dtype": BENCH_DTYPE, "sparsity": sparsity, "verified": False, "error": error})
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


def verify_case(shape, sparsity: float, seed: int = 0, log=print) -> list[dict]:
    """Every version and pipeline run once at ``shape`` and checked against the reference; no timing.

    The same checks as the benchmark's ``verified`` column, on whichever backend
    ``cupy()`` gives (a GPU, or the CPU emulation of the kernels).
    """
    case = BenchCase(shape, sparsity, None, seed, log)
    rows = []
    for kernel, version in bench_targets():
        verified = case.measurement(kernel, version).verified
        rows.append({"kernel": kernel, "version": version, "model": shape.model, "d": shape.d, "k": shape.k,
                     "sparsity": sparsity, "verified": verified})
        log(f"  {kernel} {version}: {'verified' if verified else 'MISMATCH'}")
    return rows


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
