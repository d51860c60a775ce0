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

from sparseinfer.reference.errors import SparseInferError  # noqa: E402


def _save(fig, path) -> Path:
    p = Path(path)
    if p.suffix.lower() != ".png":
        raise SparseInferError(f"plot file must end in .png, got {p.name}")
    if not p.parent.is_dir():
        raise SparseInferError(f"no such directory for the plot: {p.parent}")
    fig.tight_layout()
    fig.savefig(p, dpi=120)
    plt.close(fig)
    return p


def plot_precision_recall(layer_stats: list[dict], path, title: str = "") -> Path:
    layers = [s["layer"] for s in layer_stats]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot(layers, [100 * s["precision"] for s in layer_stats], "o-", label="precision")
    ax.plot(layers, [100 * s["recall"] for s in layer_stats], "s--", label="recall")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("%")
    ax.set_title(title or "SparseInfer predictor: precision / recall of zero rows per layer")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_fig4(rows: list[dict], path) -> Path:
    """Grouped bars: one group per (model, α, baseline); published and simulated side by side."""
    labels = [f"{r['model'].replace('prosparse-llama2-', '')} α={r['alpha'].split('@')[0]}\nvs {r['vs']}" for r in rows]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(8, 1.2 * len(rows)), 4))
    ax.bar([x - 0.2 for x in xs], [r["paper"] for r in rows], 0.4, label="paper (Fig. 4)")
    ax.bar([x + 0.2 for x in xs], [r["simulated"] for r in rows], 0.4, label="simulated")
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_ylabel("SparseInfer speedup (x)")
    ax.set_title("End-to-end decode speedup on Jetson Orin AGX: paper vs latency model")
    ax.legend()
    return _save(fig, path)


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
    return _save(fig, path)
