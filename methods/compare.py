"""Every activation-sparsity method side by side on one model, one set of prompts.

``compare_methods`` runs, per method and target sparsity, the teacher-forced decode of the
evaluation prompts (``ReferenceRunner.run_method``) and reports:

* ``sparsity``: the method's own decision on its axis (rows skipped; for channel methods
  the MAC-weighted fraction of projection-input channels dropped, (2 s_x + s_h) / 3, its
  parts in ``channels_dropped``: s_x of gate/up's input x, s_h of down's input h3, whose
  exact zeros on a ReLU model count as dropped). A threshold at the target's quantile of
  calibration magnitudes (``quantile_threshold``: teal, cats, wisparse) is 0 where the
  model has more exact zeros than the target (``dense_zero_fraction``), and then drops
  exactly those: such rows exceed their target;
* ``bytes_skipped``: fraction of the MLP's weight bytes not read (on a ReLU model every
  method also skips up/down rows whose computed h1 is zero, the paper's +AS);
* ``precision`` / ``recall`` of the skip set on the k axis against the reference set —
  the true zeros (ReLU) or the ``floor(s·k)`` smallest-|h1| rows (SiLU) — means over
  layers of per-layer pooled counts (paper Fig. 3's convention). Channel methods are
  scored on the down-input channels they drop;
* predictor ops, bytes read per token and resident memory (all layers of the checkpoint's
  own shape, also when ``sim_model`` simulates latency at another shape);
* quality against dense on the same positions: mean KL(p_dense || p_method) of the
  next-token distributions and top-1 agreement (``quality.py``);
* the simulated per-token latency on ``hw`` (``sim/latency.py``'s roofline ops, with
  each method's measured per-layer rows / channels and its predictor) and the speed-up
  over the dense model in the same simulation; Pareto-optimal rows (latency, KL) among the
  realisable methods (bounds excluded) are marked. ``sim_model`` simulates the latency at
  another shape (e.g. ProSparse-13B) from the measured per-layer fractions, an
  extrapolation reported as ``latency_model``.

Calibration prompts and evaluation prompts never overlap (``calibration.check_disjoint``).
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
from pathlib import Path

import numpy as np

from sparseinfer.reference.errors import SparseInferError
from sparseinfer.reference.files import write_whole
from sparseinfer.sim import latency as lat
from sparseinfer.sim.sparsity_model import LayerSparsity

from .base import MethodCost
from .pareto import pareto_front
from .predictor_stats import per_layer_stats, summary
from .quality import quality
from .registry import APPROXIMATE_METHODS, COMPARE_DEFAULT_PARAMS, make_method

FP16 = lat.FP16
FP32 = lat.FP32

ROW_KEYS = ("method", "target_sparsity", "sparsity", "channels_dropped", "bytes_skipped", "precision", "recall",
            "predictor_ops_per_token", "predictor_unit", "predictor_bytes_per_token", "predictor_memory_bytes",
            "mean_kl", "top1_agreement", "max_abs_logit_delta", "latency_ms", "speedup", "pareto", "axis",
            "exact_for_relu", "bound", "quantile_threshold", "approximate", "paper", "params", "layer_sparsity",
            "extra")


def method_layer_ops(m, cost: MethodCost, gate_rows: float, up_rows: float, down_rows: float, x_cols: float,
                     gate_dense: bool) -> list[lat.Op]:
    """One layer's predictor and MLP ops for a method, in the structure of
    ``latency.sparse_mlp_ops(fused=False)`` (gate and up read ``x_cols`` columns of their
    rows; down reads ``down_rows`` rows of W_down^T)."""
    d, k = m.d, m.k
    if cost.kind == "sign":
        pred = lat.sign_predictor_ops(m)
        if cost.extra_popc_words:
            pred.append(lat.Op("predictor_centroids", "predictor", bytes=cost.extra_popc_words * 4 + k * 4,
                               ops=cost.extra_popc_words, unit="popc", launches=1))
    elif cost.kind == "dejavu":
        pred = lat.dejavu_predictor_ops(m, cost.rank)
    elif cost.ops or cost.bytes_read:
        pred = [lat.Op("predictor", "predictor", bytes=cost.bytes_read, ops=cost.ops, unit=cost.unit,
                       launches=cost.launches)]
    else:
        pred = []
    dense = lat.dense_mlp_ops(m)
    norm, residual = dense[0], dense[-1]
    flags = k * lat.FLAG_BYTES

    def gemv(name, rows, cols, launches, bandwidth, extra):
        return lat.Op(name, "mlp", bytes=rows * cols * FP16 + extra, ops=2.0 * rows * cols, launches=launches,
                      bandwidth=bandwidth)

    def elementwise(name):
        return lat.Op(name, "mlp", bytes=3 * k * FP32, ops=float(k), launches=1)

    steps = [gemv("mlp_gate_sparse", gate_rows, x_cols, 1, "dense" if gate_dense else "sparse", flags + d * FP32),
             elementwise("mlp_act_flags"),
             gemv("mlp_up_sparse", up_rows, x_cols, 1, "sparse", flags + d * FP32),
             elementwise("mlp_mul"),
             gemv("mlp_down_sparse", down_rows, d, 2, "sparse", flags + k * FP32 + 2 * d * FP32)]
    return pred + [norm] + steps + [residual]


def method_latency(m, hw, cost: MethodCost, layer_rows: list[dict], gate_dense: bool,
                   context_tokens: int = lat.DEFAULT_CONTEXT_TOKENS) -> float:
    """Per-token latency (µs) from each layer's mean rows / channels."""
    total = 0.0
    for r in layer_rows:
        for op in lat.attention_ops(m, context_tokens) + method_layer_ops(
                m, cost, r["gate"], r["up"], r["down"], r["x_cols"], gate_dense):
            total += lat.time_op(op, hw).time_us
    for op in lat.lm_head_ops(m):
        total += lat.time_op(op, hw).time_us
    return total


def dense_latency(m, hw, context_tokens: int = lat.DEFAULT_CONTEXT_TOKENS) -> float:
    return lat.method_latency(m, hw, "llama.cpp", [LayerSparsity(0.0, 0.0)] * m.num_layers, context_tokens).total_us


def map_layers(rows: list[dict], model, sim_model) -> list[dict]:
    """Measured per-layer fractions of ``model`` carried onto ``sim_model``'s layers (layer j
    of the simulated model takes layer floor(j·L/L_sim) of the measured one) and scaled to
    its d and k."""
    out = []
    for j in range(sim_model.num_layers):
        r = rows[j * len(rows) // sim_model.num_layers]
        out.append({"gate": r["gate"] / model.k * sim_model.k, "up": r["up"] / model.k * sim_model.k,
                    "down": r["down"] / model.k * sim_model.k, "x_cols": r["x_cols"] / model.d * sim_model.d,
                    "sparsity": r["sparsity"]})
    return out


def layer_rows(traces) -> list[dict]:
    """Mean rows of gate / up / down and x columns per layer over tokens."""
    n_layers = len(traces[0])
    out = []
    for i in range(n_layers):
        ts = [tok[i] for tok in traces]
        out.append({"gate": float(np.mean([t.computed_gate.sum() for t in ts])),
                    "up": float(np.mean([t.computed_up.sum() for t in ts])),
                    "down": float(np.mean([t.computed_down.sum() for t in ts])),
                    "x_cols": float(np.mean([t.x_kept for t in ts])),
                    "sparsity": float(np.mean([t.sparsity for t in ts]))})
    return out


def evaluate_method(runner, method, target: float, calibration, hw, dense_logits, dense_us: float,
                    context_tokens: int = lat.DEFAULT_CONTEXT_TOKENS, sim_model=None) -> dict:
    """One row of the comparison: ``method`` prepared for ``target`` and run on the runner's prompts."""
    m = runner.shape
    sm = sim_model or m
    method.prepare(runner.weights, calibration, target)
    logits, traces = runner.run_method(method, target)
    stats = summary(per_layer_stats(traces))
    rows = layer_rows(traces)
    cost = method.cost(m)
    gate_dense = method.name == "cats"
    us = method_latency(sm, hw, method.cost(sm), map_layers(rows, m, sm) if sim_model else rows, gate_dense,
                        context_tokens)
    info = method.describe()
    q = quality(dense_logits, logits)
    channels = None if info["axis"] != "channels" else {
        "gate_up_inputs": float(np.mean([1.0 - r["x_cols"] / m.d for r in rows])),
        "down_inputs": float(np.mean([t.predicted_zero.mean() for token in traces for t in token]))}
    return {"method": method.name, "target_sparsity": target,
            "sparsity": float(np.mean([r["sparsity"] for r in rows])), "channels_dropped": channels,
            "bytes_skipped": stats["bytes_skipped"],
            "precision": stats["precision"], "recall": stats["recall"],
            "predictor_ops_per_token": cost.ops * m.num_layers, "predictor_unit": cost.unit,
            "predictor_bytes_per_token": cost.bytes_read * m.num_layers,
            "predictor_memory_bytes": cost.memory_bytes * m.num_layers,
            "mean_kl": q["mean_kl"], "top1_agreement": q["top1_agreement"],
            "max_abs_logit_delta": q["max_abs_logit_delta"], "latency_ms": us / 1000, "speedup": dense_us / us,
            "pareto": False, "axis": info["axis"], "exact_for_relu": bool(info["exact_for_relu"]),
            "bound": bool(info["bound"]), "quantile_threshold": bool(info["quantile_threshold"]),
            "approximate": bool(method.params.get("approximate", False)) and method.name in APPROXIMATE_METHODS
            and not runner.weights.activation.sparse_capable,
            "paper": info["paper"], "params": info["params"],
            "layer_sparsity": [round(r["sparsity"], 6) for r in rows], "extra": method.extra_stats()}


def compare_methods(runner, calibration, method_names: list[str], targets: list[float], hw,
                    params: dict | None = None, approximate: bool = False,
                    context_tokens: int = lat.DEFAULT_CONTEXT_TOKENS, sim_model=None, progress=None) -> dict:
    """The whole comparison as data (see the module docstring). ``sim_model`` (a
    ModelShape) simulates latency at another shape from the measured fractions."""
    m = runner.shape
    params = params or {}
    methods = [make_method(n, {**COMPARE_DEFAULT_PARAMS.get(n, {}), **params.get(n, {})}, approximate)
               for n in method_names]
    dense_method = make_method("dense")
    dense_method.prepare(runner.weights, calibration, 0.0)
    dense_logits, dense_traces = runner.run_method(dense_method, 0.0)
    dense_us = dense_latency(sim_model or m, hw, context_tokens)
    rows = []
    total = len(methods) * len(targets)
    for s in targets:
        for method in methods:
            rows.append(evaluate_method(runner, method, s, calibration, hw, dense_logits, dense_us, context_tokens,
                                        sim_model))
            if progress:
                progress(len(rows), total, rows[-1])
    real = [i for i, r in enumerate(rows) if not r["bound"]]
    for j in pareto_front([rows[i] for i in real], "latency_ms", "mean_kl"):
        rows[real[j]]["pareto"] = True
    act = runner.weights.activation
    return {"model": m.name, "activation": str(act), "hardware": hw.name, "context_tokens": int(context_tokens),
            "latency_model": (sim_model or m).name,
            "reference_set": "true zeros (h1 == 0)" if act.sparse_capable else "smallest |h1| rows at the target",
            "dense_zero_fraction": summary(per_layer_stats(dense_traces))["actual_sparsity"]
            if act.sparse_capable else None,
            "date": _dt.date.today().isoformat(), "machine": f"{platform.machine()} {platform.processor() or ''} "
                                                                f"({os.cpu_count()} CPUs)".replace("  ", " "),
            "calibration": calibration.describe(),
            "evaluation": {"prompts": len(runner.prompt_ids), "tokens": int(len(dense_logits))},
            "dense_latency_ms": dense_us / 1000, "methods": method_names, "targets": list(targets),
            "rows": rows}


def plot_pareto(result: dict, path) -> Path:
    """Quality (mean KL, log scale) against simulated speed-up, one marker per method, one
    point per target sparsity, the Pareto front of the realisable rows drawn through; with
    accuracy columns (``compare-methods --tasks``), a second panel of the average accuracy
    against the same speed-up, the dense row's as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = Path(path)
    if p.suffix.lower() != ".png":
        raise SparseInferError(f"plot file must end in .png, got {p.name}")
    rows = result["rows"]
    floor = 1e-6
    accuracy = result.get("accuracy")
    if accuracy:
        fig, (ax, acc_ax) = plt.subplots(1, 2, figsize=(13, 4.8))
    else:
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
    markers = "osD^v<>phX*"
    for j, name in enumerate(result["methods"]):
        rs = sorted((r for r in rows if r["method"] == name), key=lambda r: r["speedup"])
        label = name + (" (bound)" if rs and rs[0]["bound"] else "") + (" (approx.)" if rs and rs[0]["approximate"] else "")
        ax.plot([r["speedup"] for r in rs], [max(r["mean_kl"], floor) for r in rs], marker=markers[j % len(markers)],
                ls=":" if rs and rs[0]["bound"] else "-", label=label, alpha=0.85)
        for r in rs:
            ax.annotate(f"{r['target_sparsity']:g}", (r["speedup"], max(r["mean_kl"], floor)), fontsize=6,
                        xytext=(2, 2), textcoords="offset points")
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["speedup"])
    ax.plot([r["speedup"] for r in front], [max(r["mean_kl"], floor) for r in front], "-", color="black", lw=2,
            alpha=0.3, label="Pareto front")
    ax.set_yscale("log")
    ax.set_xlabel(f"simulated decode speed-up over dense ({result['hardware']})")
    ax.set_ylabel(f"mean KL to dense (nats, floor {floor:g})")
    ax.set_title(f"{Path(str(result['model'])).name} ({result['activation']}): quality vs speed-up")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    if accuracy:
        for j, name in enumerate(result["methods"]):
            rs = sorted((r for r in rows if r["method"] == name), key=lambda r: r["speedup"])
            acc_ax.plot([r["speedup"] for r in rs], [r["accuracy_average"] for r in rs],
                        marker=markers[j % len(markers)], ls=":" if rs and rs[0]["bound"] else "-", label=name,
                        alpha=0.85)
        acc_ax.axhline(accuracy["dense"]["accuracy_average"], color="black", lw=1, alpha=0.5, label="dense")
        acc_ax.set_xlabel(f"simulated decode speed-up over dense ({result['hardware']})")
        acc_ax.set_ylabel(f"accuracy, mean of {', '.join(accuracy['tasks'])} (points)")
        acc_ax.set_title(f"accuracy ({', '.join(f'{t} N={n}' for t, n in accuracy['samples'].items())})")
        acc_ax.grid(alpha=0.3)
        acc_ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return write_whole(p, buf.getvalue())
