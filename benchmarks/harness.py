"""The benchmark: every kernel version and every MLP pipeline at the ProSparse shapes.

For each model in ``BENCH_SHAPES`` and sparsity in ``BENCH_SPARSITIES`` (fp16 weights,
inputs built by ``make_layer`` so that exactly that fraction of gate rows is predicted
zero), each row says whether the version's output was verified against the reference
at that shape (bits, or the rigorous bound for the atomic version), its time, the bytes
it touches (``sim.traffic``), GB/s, % of peak, and its speedup over cuBLAS dense fp16
GEMVs (CuPy matmul) for the same step, timed in the same run.
"""
from __future__ import annotations

import datetime

import numpy as np

from sparseinfer.kernels import DOWN, GATE_UP, PIPELINES, PREDICT, SparseMLP, ops
from sparseinfer.kernels.device import cupy
from sparseinfer.kernels.expected import expected_h1_h3, same_bits, within_down_bound
from sparseinfer.kernels.shapes import BENCH_DTYPE, BENCH_SHAPES, BENCH_SPARSITIES, make_layer
from sparseinfer.reference import Activation, mlp_dense, mlp_sparse
from sparseinfer.reference.dtypes import parse_dtype
from sparseinfer.reference.signs import alpha_to_milli, pack_signs
from sparseinfer.sim import traffic
from sparseinfer.sim.models import BUILTIN_MODELS

from .timing import Timer, device_info, empty_launch_us

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


def bench_case(shape, sparsity: float, timer: Timer, peak: float, seed: int = 0, log=print) -> list[dict]:
    cp = cupy()
    model = BUILTIN_MODELS[shape.model]
    act = Activation.parse(model.hidden_act)
    layer = make_layer(shape.d, shape.k, parse_dtype(BENCH_DTYPE), sparsity, seed)
    want, trace = mlp_sparse(layer.x, layer.w_gate, layer.w_up, layer.w_down, act, ALPHA)
    want_dense = mlp_dense(layer.x, layer.w_gate, layer.w_up, layer.w_down, act)
    _, h3_want = expected_h1_h3(layer.x, layer.w_gate, layer.w_up, act, trace.predicted_zero)
    w_down_t = np.ascontiguousarray(layer.w_down.T)
    rows, all_rows = trace.rows, {"gate": shape.k, "up": shape.k, "down": shape.k}
    alpha_milli = alpha_to_milli(ALPHA)
    log(f"{shape.model} sparsity {sparsity}: predicted {trace.predicted_sparsity:.4f}, rows {rows}")

    dense = DenseBaseline(layer, act)
    dense_us = {"mlp": timer(dense.mlp).median_us, "gate_up": timer(dense.gate_up).median_us,
                "down": timer(dense.down).median_us}
    log(f"  cuBLAS dense fp16: {dense_us}")
    out = []

    def add(kernel, version, verified, fn, n_bytes, baseline):
        t = timer(fn)
        out.append(_row(kernel, version, shape, sparsity, verified, t, n_bytes, peak, dense_us[baseline]))
        log(f"  {kernel} {version}: {t.median_us:.2f} us, {n_bytes / t.median_us / 1e3:.0f} GB/s, verified {verified}")

    for name, pipe in PIPELINES.items():
        mlp = SparseMLP(layer.w_gate, layer.w_up, layer.w_down, act, pipeline=name)
        x = mlp.to_device_x(layer.x)
        got = mlp.steps(x, alpha_milli)[3].get()
        if not pipe.sparse:
            verified = same_bits(got, want_dense)
        elif pipe.deterministic:
            verified = same_bits(got, want)
        else:
            verified = bool(within_down_bound(got, h3_want, w_down_t).all())
        add("mlp", name, verified, lambda: mlp.steps(x, alpha_milli),
            traffic.mlp_bytes(pipe.gate_up, pipe.down, shape.d, shape.k, BENCH_DTYPE, rows if pipe.sparse else all_rows),
            "mlp")

    x_signs = ops.pack_x_signs(x)
    add("pack_signs", "v1", np.array_equal(x_signs.get(), pack_signs(layer.x)), lambda: ops.pack_x_signs(x),
        traffic.pack_x_bytes(shape.d), "mlp")
    for name, v in PREDICT.items():
        zero = v.run(mlp.w_signs, x_signs, shape.d, alpha_milli)[1]
        add("predict", name, np.array_equal(zero.get().astype(bool), trace.predicted_zero),
            lambda: v.run(mlp.w_signs, x_signs, shape.d, alpha_milli), traffic.predict_bytes(name, shape.d, shape.k),
            "mlp")
    for name, v in GATE_UP.items():
        h3 = v.run(mlp, x, x_signs, alpha_milli)[1].get()
        dense_rows = name == "dense"
        want_h3 = expected_h1_h3(layer.x, layer.w_gate, layer.w_up, act)[1] if dense_rows else h3_want
        n = all_rows if dense_rows else rows
        add("gate_up", name, same_bits(h3, want_h3), lambda: v.run(mlp, x, x_signs, alpha_milli),
            traffic.gate_up_bytes(name, shape.d, shape.k, BENCH_DTYPE, n["gate"], n["up"]), "gate_up")
    h3_dev = cp.asarray(h3_want)
    for name, v in DOWN.items():
        got = v.run(h3_dev, mlp.w_down_t).get()
        verified = same_bits(got, want) if v.deterministic else bool(within_down_bound(got, h3_want, w_down_t).all())
        add("down", name, verified, lambda: v.run(h3_dev, mlp.w_down_t),
            traffic.down_bytes(name, shape.d, shape.k, BENCH_DTYPE, rows["down"]), "down")
    return out


def run(shapes=BENCH_SHAPES, sparsities=BENCH_SPARSITIES, repeats: int = 50, log=print) -> dict:
    timer = Timer(repeats=repeats)
    info = device_info()
    result = {**info, "date": datetime.date.today().isoformat(), "empty_launch_us": round(empty_launch_us(timer), 3),
              "alpha": ALPHA, "rows": []}
    for shape in shapes:
        for s in sparsities:
            result["rows"] += bench_case(shape, s, timer, info["peak_bandwidth_gb_per_s"], log=log)
    return result
