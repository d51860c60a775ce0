"""α design-space exploration: run a model at several α, simulate latency, score quality.

A *runner* is anything with ``shape`` (a ModelShape), ``dense_logits()`` -> [tokens, vocab]
and ``sparse(schedule)`` -> (logits [tokens, vocab], traces_by_token [tokens][layers] of
MLPTrace) over one fixed set of prompts; ``model_runner.ReferenceRunner`` is one over a
loaded checkpoint. Latency is simulated for the runner's own shape from the *measured*
per-layer sparsity of each α.
"""
from __future__ import annotations

from sparseinfer.reference.alpha import AlphaSchedule, decimal_to_milli, parse_layer_range
from sparseinfer.reference.errors import SparseInferError
from sparseinfer.sim import latency as lat
from sparseinfer.sim.hardware import HardwareSpec
from sparseinfer.sim.sparsity_model import LayerSparsity

from .compare import dense_latency, evaluate_method
from .pareto import mark_pareto
from .predictor_stats import per_layer_stats, summary
from .quality import quality
from .registry import make_method

MAX_SWEEP_POINTS = 101
PAPER_ALPHA_LAYERS = 20   # Sec. V-B: α > 1 applied to the first 20 layers only


def parse_alpha_range(spec: str) -> list[int]:
    """``START:STOP:STEP`` (inclusive) or one value, as α in thousandths."""
    text = str(spec).strip()
    parts = text.split(":")
    if len(parts) not in (1, 3):
        raise SparseInferError(f"alpha range {text!r}: use START:STOP:STEP, e.g. 1.00:1.05:0.01")
    milli = [decimal_to_milli(p, f"alpha range {text!r}") for p in parts]
    if len(milli) == 1:
        milli = [milli[0], milli[0], 1]
    start, stop, step = milli
    if start <= 0:
        raise SparseInferError(f"alpha range {text!r}: alpha must be > 0")
    if step <= 0:
        raise SparseInferError(f"alpha range {text!r}: STEP must be > 0")
    if stop < start:
        raise SparseInferError(f"alpha range {text!r}: STOP is below START")
    points = list(range(start, stop + 1, step))
    if len(points) > MAX_SWEEP_POINTS:
        raise SparseInferError(f"alpha range {text!r}: {len(points)} points, at most {MAX_SWEEP_POINTS}")
    return points


def parse_layers(spec, num_layers: int) -> tuple[int, int]:
    """``A-B`` (inclusive) or ``all``: the layers whose α is swept (others stay at 1.00).

    ``None`` means the paper's choice: the first ``PAPER_ALPHA_LAYERS`` layers.
    """
    if spec is None:
        return 0, min(PAPER_ALPHA_LAYERS, num_layers) - 1
    text = str(spec).strip().lower()
    if not text:
        raise SparseInferError(f"layers {spec!r}: an empty selection; give A-B or 'all'")
    if text == "all":
        return 0, num_layers - 1
    a, b = parse_layer_range(text, f"layers {spec!r}")
    if b >= num_layers:
        raise SparseInferError(f"layers {spec!r}: need 0 <= A <= B <= {num_layers - 1}")
    return a, b


def schedule_for(alpha_milli: int, layers: tuple[int, int]) -> AlphaSchedule:
    a, b = layers
    return AlphaSchedule.parse(f"{alpha_milli / 1000:.3f}@{a}-{b},1.00")


def measured_layers(stats) -> list[LayerSparsity]:
    return [LayerSparsity(s.predicted_sparsity, max(s.predicted_sparsity, s.union_sparsity)) for s in stats]


def run_sweep(runner, alphas_milli: list[int], layers: tuple[int, int], hw: HardwareSpec,
              context_tokens: int = lat.DEFAULT_CONTEXT_TOKENS, progress=None) -> dict:
    """One row per α: simulated latency and speedup, measured sparsity, quality vs dense."""
    m = runner.shape
    dense = runner.dense_logits()
    base = lat.method_latency(m, hw, "llama.cpp", [LayerSparsity(0.0, 0.0)] * m.num_layers, context_tokens)
    rows = []
    for i, milli in enumerate(alphas_milli):
        schedule = schedule_for(milli, layers)
        logits, traces = runner.sparse(schedule)
        stats = per_layer_stats(traces)
        sim = lat.method_latency(m, hw, lat.FIG4_METHOD, measured_layers(stats), context_tokens)
        mean = summary(stats)
        rows.append({"alpha": milli / 1000, "schedule": str(schedule), "latency_ms": sim.total_us / 1000,
                     "speedup_vs_llama.cpp": base.total_us / sim.total_us,
                     "predicted_sparsity": mean["predicted_sparsity"], "actual_sparsity": mean["actual_sparsity"],
                     "union_sparsity": mean["union_sparsity"], "precision": mean["precision"],
                     "recall": mean["recall"], **quality(dense, logits)})
        if progress:
            progress(i + 1, len(alphas_milli), rows[-1])
    mark_pareto(rows)
    return {"model": m.name, "hardware": hw.name, "layers": f"{layers[0]}-{layers[1]}",
            "dense_latency_ms": base.total_us / 1000, "method": lat.FIG4_METHOD, "rows": rows}


def run_method_sweep(runner, method, calibration, targets: list[float], hw: HardwareSpec,
                     context_tokens: int = lat.DEFAULT_CONTEXT_TOKENS, progress=None) -> dict:
    """The sweep for any ``registry`` method: one row per target sparsity (the method is
    prepared for each on ``calibration``), latency simulated from its measured rows and
    channels (``compare.evaluate_method``), quality against the dense run."""
    m = runner.shape
    dense_method = make_method("dense")
    dense_method.prepare(runner.weights, calibration, 0.0)
    dense, _ = runner.run_method(dense_method, 0.0)
    dense_us = dense_latency(m, hw, context_tokens)
    rows = []
    for i, s in enumerate(targets):
        r = evaluate_method(runner, method, s, calibration, hw, dense, dense_us, context_tokens)
        rows.append({"sparsity": s, "achieved_sparsity": r["sparsity"], "latency_ms": r["latency_ms"],
                     "speedup_vs_llama.cpp": r["speedup"], "bytes_skipped": r["bytes_skipped"],
                     "precision": r["precision"], "recall": r["recall"], "top1_agreement": r["top1_agreement"],
                     "mean_kl": r["mean_kl"], "max_abs_logit_delta": r["max_abs_logit_delta"]})
        if progress:
            progress(i + 1, len(targets), rows[-1])
    mark_pareto(rows)
    return {"model": m.name, "hardware": hw.name, "method": method.name, "dense_latency_ms": dense_us / 1000,
            "params": method.describe()["params"], "rows": rows}
