"""PNG plots with matplotlib (Agg backend, no display needed).

* ``plot_precision_recall``: per-layer precision and recall of zero rows (paper Fig. 3).
* ``plot_fig4``: speedup per method and model, simulated beside published (paper Fig. 4).
* ``plot_sweep``: the α sweep's latency-quality front (Pareto points marked).
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from sparseinfer.reference.errors import SparseInferError  # noqa: E402
from sparseinfer.reference.files import check_destination, write_whole  # noqa: E402

from . import paper  # noqa: E402


def check_png_path(path) -> Path:
    """The plot's path, or a one-line error (before any long work that ends in a plot)."""
    p = Path(path)
    if p.suffix.lower() != ".png":
        raise SparseInferError(f"plot file must end in .png, got {p.name}")
    return check_destination(p, "plot")


def save_png(fig, path) -> Path:
    """Draw ``fig`` into memory, then write the PNG whole (reference.files)."""
    import io

    p = check_png_path(path)
    fig.tight_layout()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=120)
    finally:
        plt.close(fig)
    return write_whole(p, buf.getvalue())


def plot_precision_recall(layer_stats: list[dict], path, title: str = "") -> Path:
    layers = [s["layer"] for s in layer_stats]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot(layers, [100 * s["precision"] for s in layer_stats], "o-", label="precision")
    ax.plot(layers, [100 * s["recall"] for s in layer_stats], "s--", label="recall")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("%")
    ax.set_title(title or "SparseInfer predictor: precision / recall of zero rows per layer")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_png(fig, path)


def plot_fig4(variants: list[dict], path, hardware: str = "") -> Path:
    """Fig. 4 style: per (model, α), the speedup over llama.cpp of PowerInfer and each
    SparseInfer variant (bars, simulated), with the published values as black marks."""
    settings = list(dict.fromkeys((r["model"], r["alpha"]) for r in variants))
    methods = list(dict.fromkeys(r["method"] for r in variants))
    value = {(r["model"], r["alpha"], r["method"]): r["speedup_vs_llama.cpp"] for r in variants}
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(8, 2.2 * len(settings)), 4.2))
    for j, method in enumerate(methods):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(settings))]
        ax.bar(xs, [value[(m, a, method)] for m, a in settings], width, label=method)
    published = [(i, paper.FIG4_SPEEDUPS[s]) for i, s in enumerate(settings) if s in paper.FIG4_SPEEDUPS]
    ax.plot([i + 0.4 - width / 2 for i, _ in published], [v[0] for _, v in published], "k_", ms=18, mew=2,
            label="paper: SparseInfer")
    ax.plot([i - 0.4 + width / 2 for i, _ in published], [v[0] / v[1] for _, v in published], "kx", ms=8,
            label="paper: PowerInfer (implied)")
    ax.set_xticks(range(len(settings)), [f"{m.replace('prosparse-llama2-', '')}, α {a}" for m, a in settings],
                  fontsize=8)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_ylim(0, 1.35 * max(value.values()))
    ax.set_ylabel("speedup over llama.cpp (x)")
    ax.set_title(f"Decode speedup per method and model{' on ' + hardware if hardware else ''}: simulated vs paper Fig. 4")
    ax.legend(fontsize=7, ncol=2)
    return save_png(fig, path)


def plot_sweep(result: dict, path, quality_key: str = "mean_kl") -> Path:
    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["latency_ms"] for r in rows], [r[quality_key] for r in rows], "o", color="tab:blue", label="α points")
    front = sorted((r for r in rows if r.get("pareto")), key=lambda r: r["latency_ms"])
    ax.plot([r["latency_ms"] for r in front], [r[quality_key] for r in front], "-", color="tab:red", label="Pareto front")
    for r in rows:
        ax.annotate(f"{r['alpha']:.3f}".rstrip("0"), (r["latency_ms"], r[quality_key]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(f"simulated latency per token (ms, {result['hardware']})")
    ax.set_ylabel(quality_key)
    ax.set_title(f"α sweep on layers {result['layers']}: {result['model']}")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_png(fig, path)
