"""The benchmark's results as one PNG: bandwidth per kernel version and speed-up per MLP
pipeline at one (model, sparsity), with the targets drawn in.

Left: % of the device's peak bandwidth of every kernel row (pack_signs, predict, gate_up,
down, and their block-quantized families), coloured by family, the 70 % target dashed. A row or pipeline that failed
verification is drawn hatched in red, never dropped. Right: speed-up over cuBLAS dense fp16 of each MLP pipeline, one
layer (L2 flushed), and, where the results hold the decode loop, the same pipelines run
back to back over its layers, eager and as a CUDA graph; the 5x target dashed.
"""
from __future__ import annotations

from pathlib import Path

from sparseinfer.kernels.verify import PIPELINE_TARGETS
from sparseinfer.reference.errors import SparseInferError
from sparseinfer.sim.plots import plt, save_png

PEAK_TARGET_PCT = 70.0
MLP_TARGET_SPEEDUP = 5.0
_FAMILY_COLOURS = {"pack_signs": "tab:gray", "predict": "tab:purple", "gate_up": "tab:blue", "down": "tab:green"}


def _step(row: dict) -> str:
    """A kernel row's family less its block format (gate_up_q4_0, dtype q4_0: gate_up), for its colour."""
    return row["kernel"].removesuffix(f"_{row.get('dtype', '')}")


def pick(result: dict, model: str | None, sparsity: float | None) -> tuple[str, float, list]:
    """(model, sparsity, rows) to plot: by default the last model and the highest sparsity."""
    rows = result.get("rows") or []
    if not rows:
        raise SparseInferError("the benchmark results hold no rows")
    model = model or rows[-1]["model"]
    have = sorted({r["sparsity"] for r in rows if r["model"] == model})
    if not have:
        raise SparseInferError(f"no benchmark rows for {model}; the results hold "
                               f"{', '.join(sorted({r['model'] for r in rows}))}")
    sparsity = max(have) if sparsity is None else sparsity
    picked = [r for r in rows if r["model"] == model and r["sparsity"] == sparsity]
    if not picked:
        raise SparseInferError(f"no benchmark rows for {model} at sparsity {sparsity}; it has {have}")
    return model, sparsity, picked


def plot_bench(result: dict, path, model: str | None = None, sparsity: float | None = None) -> Path:
    model, sparsity, rows = pick(result, model, sparsity)
    kernels = [r for r in rows if r["kernel"] not in PIPELINE_TARGETS]
    pipelines = [r for r in rows if r["kernel"] in PIPELINE_TARGETS]
    loop = result.get("decode_loop")
    loop = loop if loop and loop.get("rows") and loop["model"] == model and loop["sparsity"] == sparsity else None

    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    xs = range(len(kernels))
    bars = left.bar(xs, [r.get("pct_peak", 0.0) for r in kernels],
                    color=[_FAMILY_COLOURS.get(_step(r), "k") for r in kernels])
    for bar, r in zip(bars, kernels):
        if not r["verified"]:
            bar.set_hatch("//")
            bar.set_edgecolor("red")
            left.annotate("FAILED" if "error" in r else "NOT verified", (bar.get_x() + bar.get_width() / 2,
                          bar.get_height()), ha="center", va="bottom", fontsize=7, color="red", rotation=90)
    left.axhline(PEAK_TARGET_PCT, ls="--", c="k", lw=1, label=f"target {PEAK_TARGET_PCT:.0f} % of peak")
    left.set_xticks(list(xs), [f"{r['kernel']}\n{r['version']}" for r in kernels], rotation=60, ha="right", fontsize=7)
    left.set_ylabel("% of peak bandwidth (bytes touched / time)")
    left.set_title("kernels")
    left.grid(axis="y", alpha=0.3)
    left.legend(fontsize=8)

    names = [r["version"] for r in pipelines]
    series = [("one layer", {r["version"]: (r.get("speedup_vs_dense", 0.0), r["verified"]) for r in pipelines})]
    if loop:
        dense_graph = any(r["pipeline"] == "cublas-dense" and r["mode"] == "graph" and "us_per_layer" in r
                          for r in loop["rows"])
        for mode in ("eager", "graph"):
            base = mode if mode == "eager" or dense_graph else "eager"     # cuBLAS that could not be recorded
            series.append((f"{loop['layers']}-layer loop, {mode} (vs cuBLAS {base})",
                           {r["pipeline"]: (r[f"speedup_vs_dense_{base}"], r["verified"])
                            for r in loop["rows"] if r["mode"] == mode and "us_per_layer" in r}))
    width = 0.8 / len(series)
    for j, (label, values) in enumerate(series):
        got = [values.get(n, (0.0, True)) for n in names]
        bars = right.bar([i - 0.4 + width * (j + 0.5) for i in range(len(names))], [v for v, _ in got], width,
                         label=label)
        right.bar_label(bars, fmt="%.1f", fontsize=6)
        for bar, (_, verified) in zip(bars, got):
            if not verified:
                bar.set_hatch("//")
                bar.set_edgecolor("red")
    right.axhline(MLP_TARGET_SPEEDUP, ls="--", c="k", lw=1, label=f"target {MLP_TARGET_SPEEDUP:.0f}x")
    right.axhline(1.0, c="k", lw=0.5)
    right.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    right.set_ylabel("speed-up over cuBLAS dense fp16")
    right.set_title("whole MLP block")
    right.grid(axis="y", alpha=0.3)
    right.legend(fontsize=7)
    fig.suptitle(f"{result.get('device', '?')}, CUDA {result.get('cuda_version', '?')}, {result.get('date', '?')}: "
                 f"{model}, fp16, sparsity {sparsity}", fontsize=10)
    return save_png(fig, path)


SWEEP_TARGETS = {"speedup_vs_dense": ("speed-up over cuBLAS dense fp16", MLP_TARGET_SPEEDUP),
                 "speedup_vs_best_dense": ("speed-up over the faster dense row", 3.5),
                 "pct_peak": ("% of peak bandwidth on bytes touched", 60.0),
                 "predict_launches": ("predictor time / empty launch", 1.5)}


def sparsity_series(result: dict, model: str | None = None) -> dict:
    """How each figure moves with sparsity at one model shape: per measured sparsity, every MLP
    pipeline's speed-ups and % of peak, and every predictor version's time in empty launches
    (``None`` where a row is missing, failed or did not verify). Needs two sparsities or more."""
    rows = result.get("rows") or []
    if not rows:
        raise SparseInferError("the benchmark results hold no rows")
    model = model or rows[-1]["model"]
    timed = [r for r in rows if r["model"] == model and r.get("verified") and "latency_us" in r]
    sparsities = sorted({r["sparsity"] for r in rows if r["model"] == model})
    if len(sparsities) < 2:
        raise SparseInferError(f"a sparsity plot needs results at two sparsities or more; {model} has "
                               f"{sparsities or 'none'} (run `sparseinfer bench --sparsity 0.8,0.9,0.95`)")

    def series(kernel: str, value) -> dict:
        found: dict = {}
        for r in timed:
            if r["kernel"] == kernel and value(r) is not None:
                found.setdefault(r["version"], {})[r["sparsity"]] = value(r)
        return {version: [by.get(s) for s in sparsities] for version, by in found.items()}

    empty_us = result.get("empty_launch_us")
    return {"model": model, "sparsity": sparsities,
            "speedup_vs_dense": series("mlp", lambda r: r.get("speedup_vs_dense")),
            "speedup_vs_best_dense": series("mlp", lambda r: r.get("speedup_vs_best_dense")),
            "pct_peak": series("mlp", lambda r: r.get("pct_peak")),
            "predict_launches": series("predict", lambda r: round(r["latency_us"] / empty_us, 3)) if empty_us else {}}


def plot_sparsity_sweep(result: dict, path, model: str | None = None) -> Path:
    """Four panels against sparsity (the targets dashed): the MLP pipelines' speed-up
    over cuBLAS and over the faster dense row, their % of peak, and the predictor in empty launches."""
    data = sparsity_series(result, model)
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for ax, (field, (label, target)) in zip(axes.flat, SWEEP_TARGETS.items()):
        for name, values in sorted(data[field].items()):
            xs = [s for s, v in zip(data["sparsity"], values) if v is not None]
            ax.plot(xs, [v for v in values if v is not None], marker="o", label=name)
        ax.axhline(target, ls="--", c="k", lw=1, label=f"target {target:g}")
        ax.set_xlabel("sparsity (fraction of gate rows predicted zero)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if data[field]:
            ax.legend(fontsize=6)
        else:
            ax.text(0.5, 0.5, "no verified rows", ha="center", transform=ax.transAxes)
    fig.suptitle(f"{result.get('device', '?')}, CUDA {result.get('cuda_version', '?')}, {result.get('date', '?')}: "
                 f"{data['model']}, fp16", fontsize=10)
    return save_png(fig, path)
