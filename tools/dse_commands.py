"""Design-space commands over a checkpoint's real activations: predictor-stats, sweep."""
from __future__ import annotations

import click
from click.core import ParameterSource

from sparseinfer.methods.registry import DEFAULT_METHOD, check_method_name, parse_param_options
from sparseinfer.reference.errors import SparseInferError

from . import options
from .output import echo_err, echo_json, format_table


def _approximate_sign_predictor(settings: dict) -> bool:
    """--approximate on the sign predictor without --sparsity: a run of the default method
    (``traced_runs.method_from_options``), whose α is its --param sparseinfer.alpha (1.00
    unless given), not --alpha."""
    return (settings["approximate"] and settings["sparsity"] is None
            and check_method_name(settings["method_name"]) == DEFAULT_METHOD)


def _alpha_given(option: str) -> bool:
    return click.get_current_context().get_parameter_source(option) is not ParameterSource.DEFAULT


def _alpha_overridden(settings: dict) -> str | None:
    """What takes the place of an explicit --alpha (None where it applies): --sparsity
    (α calibrated), another --method, or --param sparseinfer.alpha."""
    if settings["sparsity"] is not None:
        return "--sparsity calibrates α per layer"
    name = check_method_name(settings["method_name"])
    if name != DEFAULT_METHOD:
        return f"--method {name} has no α"
    if "alpha" in parse_param_options(settings["params"]).get(DEFAULT_METHOD, {}):
        return f"--param {DEFAULT_METHOD}.alpha gives α"
    return None


def _alpha_of_method(settings: dict) -> dict:
    """predictor-stats' settings with --alpha passed on as the approximate sign predictor's α.
    An explicit --alpha that something else overrides is refused."""
    why = _alpha_overridden(settings)
    if why and _alpha_given("alpha"):
        raise SparseInferError(f"--alpha is not used here: {why} (drop --alpha)")
    if why or not _approximate_sign_predictor(settings):
        return settings
    return {**settings, "params": (*settings["params"], f"{DEFAULT_METHOD}.alpha={settings['alpha']}")}


@click.command(name="predictor-stats", short_help="Per-layer predictor precision / recall (Fig. 3).")
@click.argument("checkpoint", type=click.Path())
@options.prompts()
@options.alpha()
@options.MAX_PROMPTS
@options.decode_steps("Decode steps traced per prompt.")
@options.METHOD
@options.ORT
@options.plot("Write a Fig. 3-style PNG here.")
@options.JSON
def predictor_stats(checkpoint, as_json, **settings):
    """Per-layer precision / recall of the predicted zero rows (paper Fig. 3).

    Runs the checkpoint on real prompts with the NumPy reference model (with --provider:
    onnxruntime exports with debug masks, made once under --export-dir) and reports, per
    layer, precision and recall of zero rows, predicted / actual / union sparsity and the
    fraction of the MLP's weight bytes skipped.
    """
    from sparseinfer.evaluation.design_space import alpha_label, predictor_stats_run

    data = predictor_stats_run(checkpoint, log=echo_err, **_alpha_of_method(settings))
    if as_json:
        echo_json(data)
        return
    click.echo(f"{data['model']}: alpha {alpha_label(data)}, {data['tokens']} decoded tokens")
    click.echo(format_table(["layer", "precision", "recall", "predicted", "actual", "union", "bytes skipped"],
                            [[s["layer"], *(f"{s[key]:.4f}" for key in ("precision", "recall", "predicted_sparsity",
                                                                        "actual_sparsity", "union_sparsity",
                                                                        "bytes_skipped"))]
                             for s in data["layers"]]))
    if settings["plot_file"]:
        click.echo(f"wrote {settings['plot_file']}")


def _progress(done, total, row):
    if "achieved_sparsity" in row:               # a method's row, at a target sparsity
        echo_err(f"[{done}/{total}] sparsity {row['sparsity']:g}: {row['latency_ms']:.3f} ms, "
                 f"achieved {row['achieved_sparsity']:.3f}, top-1 {row['top1_agreement']:.3f}")
    else:
        echo_err(f"[{done}/{total}] alpha {row['alpha']:.3f}: {row['latency_ms']:.3f} ms, "
                 f"sparsity {row['union_sparsity']:.3f}, top-1 {row['top1_agreement']:.3f}")


@click.command(short_help="α sweep: simulated latency vs sparsity and quality.")
@click.argument("checkpoint", type=click.Path())
@click.option("--alpha", "alpha_range", default="1.00:1.05:0.01", show_default=True,
              help="α values START:STOP:STEP (inclusive), applied to --layers; other layers stay at 1.00.")
@click.option("--layers", default=None,
              help="Layers A-B whose α is swept, or 'all' (default: the first 20 layers, as in the paper).")
@options.HW
@options.prompts()
@options.MAX_PROMPTS
@options.decode_steps("Decode steps per prompt.")
@options.METHOD
@options.ORT
@options.tasks_group("out/sweep-eval")
@options.plot("Write the latency-quality PNG here (with --tasks: accuracy against latency).")
@options.JSON
def sweep(checkpoint, as_json, **settings):
    """α sweep: simulated latency and speedup vs measured sparsity and quality.

    For each α: the simulated per-token latency (SparseInfer+KF+AS on --hw, from the
    measured per-layer sparsity), its speedup over dense llama.cpp, the measured sparsity,
    and quality against the dense model on the same prompts (top-1 agreement, mean KL,
    max |delta logit|). Pareto-optimal points (latency, KL) are marked. With --tasks, each
    row also gets its accuracy from `sparseinfer eval` (the α rows through onnxruntime
    exports on --provider, default cpu; --method rows on the NumPy reference model), with
    the difference to dense in points and its own Pareto mark (latency, accuracy).
    """
    from sparseinfer.evaluation.design_space import is_method_sweep, sweep_run

    why = _alpha_overridden(settings)
    if why and _alpha_given("alpha_range"):
        raise SparseInferError(f"--alpha is not swept here: {why} (drop --alpha)")
    if _alpha_given("alpha_range") and _approximate_sign_predictor(settings):
        raise SparseInferError("--alpha sweeps the exact sign predictor only; with --approximate, sweep runs "
                               f"--method {DEFAULT_METHOD} at --sparsity targets (α calibrated per layer) or at one "
                               f"α given as --param {DEFAULT_METHOD}.alpha=A")
    result = sweep_run(checkpoint, log=echo_err, progress=None if as_json else _progress, **settings)
    if as_json:
        echo_json(result)
        return
    acc = _accuracy_columns(result)
    if is_method_sweep(result):
        click.echo(f"{result['model']} on {result['hardware']}: method {result['method']}, "
                   f"dense {result['dense_latency_ms']:.3f} ms/token")
        click.echo(format_table(
            ["target", "achieved", "ms/token", "speedup", "bytes skipped", "precision", "recall", "top-1", "mean KL",
             *acc[0], "pareto"],
            [[f"{r['sparsity']:g}", f"{r['achieved_sparsity']:.4f}", f"{r['latency_ms']:.3f}",
              f"{r['speedup_vs_llama.cpp']:.3f}x", f"{r['bytes_skipped']:.4f}", f"{r['precision']:.4f}",
              f"{r['recall']:.4f}", f"{r['top1_agreement']:.3f}", f"{r['mean_kl']:.3g}", *acc[1](r),
              "*" if r["pareto"] else ""] for r in result["rows"]]))
        _echo_accuracy(result)
        return
    click.echo(f"{result['model']} on {result['hardware']}: layers {result['layers']}, "
               f"dense {result['dense_latency_ms']:.3f} ms/token")
    click.echo(format_table(
        ["alpha", "ms/token", "speedup", "pred sparsity", "union sparsity", "top-1", "mean KL", "max |dlogit|",
         *acc[0], "pareto"],
        [[f"{r['alpha']:.3f}", f"{r['latency_ms']:.3f}", f"{r['speedup_vs_llama.cpp']:.3f}x",
          f"{r['predicted_sparsity']:.4f}", f"{r['union_sparsity']:.4f}", f"{r['top1_agreement']:.3f}",
          f"{r['mean_kl']:.3g}", f"{r['max_abs_logit_delta']:.3g}", *acc[1](r), "*" if r["pareto"] else ""]
         for r in result["rows"]]))
    _echo_accuracy(result)
    if settings["plot_file"]:
        click.echo(f"wrote {settings['plot_file']}")


def _accuracy_columns(result: dict):
    """(headers, row -> cells) of the accuracy columns: score per task, Δ vs dense, the
    accuracy front; none without --tasks."""
    acc = result.get("accuracy")
    if not acc:
        return [], lambda r: []
    return ([*acc["tasks"], "Δ acc", "acc front"],
            lambda r: [*(f"{r['accuracy'][t]:.2f}" for t in acc["tasks"]), f"{r['accuracy_delta_average']:+.2f}",
                       "*" if r["pareto_accuracy"] else ""])


def _echo_accuracy(result: dict) -> None:
    acc = result.get("accuracy")
    if acc:
        click.echo(f"accuracy ({', '.join(f'{t} {n}' for t, n in acc['samples'].items())} samples, "
                   f"{acc['data_dir']}): dense " + ", ".join(f"{t} {v:.2f}" for t, v in acc["dense"]["accuracy"].items())
                   + f"; Δ acc: average difference to dense in points; files under {acc['eval_json']}")


COMMANDS = (predictor_stats, sweep)
