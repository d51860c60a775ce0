"""``sparseinfer compare-methods``: every activation-sparsity method side by side."""
from __future__ import annotations

import click

from . import options
from .output import echo_err, echo_json, format_table

PARAM_HELP = ("Method parameter METHOD.KEY=VALUE, repeatable: sparseinfer.alpha=1.00|auto|'1.03@0-19,1.00', "
              "dejavu.rank=64, dejavu.threshold=0, dejavu.save=FILE.npz, dejavu.load=FILE.npz, cats.threshold=0, "
              "cluster.clusters=32, random.seed=1, wisparse.exponent=1.")


def _progress(done, total, row):
    echo_err(f"[{done}/{total}] {row['method']} at {row['target_sparsity']:g}: sparsity {row['sparsity']:.3f}, "
             f"KL {row['mean_kl']:.3g}, speed-up {row['speedup']:.2f}x")


def table(result: dict) -> str:
    """One line per method and target; with --tasks, the score per task and Δ vs dense (points)."""
    tasks = (result.get("accuracy") or {}).get("tasks", [])
    return format_table(
        ["method", "target", "sparsity", "bytes skipped", "precision", "recall", "pred. ops/token", "pred. MiB",
         "mean KL", "top-1", *tasks, *(["Δ acc"] if tasks else []), "speed-up", "pareto"],
        [[r["method"] + (" (bound)" if r["bound"] else "") + (" (approx.)" if r["approximate"] else ""),
          f"{r['target_sparsity']:g}", f"{r['sparsity']:.3f}", f"{r['bytes_skipped']:.3f}", f"{r['precision']:.3f}",
          f"{r['recall']:.3f}", f"{r['predictor_ops_per_token']:.3g} {r['predictor_unit']}" if r["predictor_ops_per_token"]
          else "0", f"{r['predictor_memory_bytes'] / 2**20:.3g}", f"{r['mean_kl']:.3g}", f"{r['top1_agreement']:.3f}",
          *(f"{r['accuracy'][t]:.2f}" for t in tasks), *([f"{r['accuracy_delta_average']:+.2f}"] if tasks else []),
          f"{r['speedup']:.2f}x", "*" if r["pareto"] else ""] for r in result["rows"]])


def notes(result: dict) -> list[str]:
    """What the sparsity and bytes-skipped figures mean, and why a row exceeds its target."""
    rows, zeros = result["rows"], result.get("dense_zero_fraction")
    out = ["sparsity: each method's own skip decision: rows skipped, or for channel methods (2 s_x + s_h) / 3, "
           "the MAC-weighted share of gate/up input channels (s_x) and down input channels (s_h, exact zeros "
           "included) dropped"]
    if zeros is None:
        return out
    line = (f"bytes skipped: MLP weight bytes not read, also counting up and down of every computed row whose h1 "
            f"is exactly zero (the paper's +AS; {zeros:.3f} of h1 in the dense run)")
    example = next((r for r in rows if r["method"] == "random"), None)
    if example:
        line += (f": random at {example['target_sparsity']:g} skips {example['sparsity']:.3f} of the rows and "
                 f"{example['bytes_skipped']:.3f} of the bytes")
    out.append(line)
    above = [r for r in rows if r["quantile_threshold"] and r["target_sparsity"] < zeros
             and r["sparsity"] > r["target_sparsity"] + 0.01]
    if above:
        out.append(f"{zeros:.3f} of this model's h1 is exactly zero: a threshold at a lower target's quantile of "
                   f"the calibration magnitudes is 0 and drops exactly those zeros, so these rows exceed their "
                   f"target: " + ", ".join(_achieved(r) for r in above))
    return out


def _achieved(row: dict) -> str:
    """'teal at 0.5 (0.655; s_x 0.532, s_h 0.899)': a row's sparsity, a channel method's by its parts."""
    c = row["channels_dropped"]
    parts = f"; s_x {c['gate_up_inputs']:.3f}, s_h {c['down_inputs']:.3f}" if c else ""
    return f"{row['method']} at {row['target_sparsity']:g} ({row['sparsity']:.3f}{parts})"


@click.command("compare-methods", short_help="Every activation-sparsity method side by side.")
@click.argument("checkpoint", type=click.Path())
@click.option("--methods", "methods_text", default=None,
              help="Comma-separated methods (default: all but dense): sparseinfer, oracle, random, dejavu, teal, cats, "
                   "wisparse, cluster, cluster-oracle.")
@click.option("--sparsity", "sparsity_text", default="0.5,0.7,0.9", show_default=True,
              help="Target sparsities in [0, 1), comma-separated.")
@options.param(PARAM_HELP)
@options.approximate("Allow the sign predictor (sparseinfer, cluster) on a SiLU model, where a predicted-negative "
                     "gate is treated as zero: an approximation, reported as such.")
@options.calibration("Calibration prompts (text, one per line, or JSONL); default: built-in prompts. Must not "
                     "share a prompt with --prompts.")
@options.MAX_CALIBRATION_PROMPTS
@options.prompts("Evaluation prompts (text or JSONL); default: the built-in ones.")
@options.MAX_PROMPTS
@options.decode_steps("Decode steps scored per prompt.")
@options.HW
@click.option("--sim-model", default=None,
              help="Simulate latency at this model shape (" + options.MODEL_HELP.rstrip(".") + ") from the measured "
                   "per-layer fractions (default: the checkpoint's own shape).")
@options.tasks_group("out/compare-eval")
@options.plot("Write the quality / speed-up PNG here (with --tasks, accuracy / speed-up beside it).")
@click.option("--out", "out_file", type=click.Path(dir_okay=False), help="Also write the JSON result here.")
@options.JSON
def compare_methods_cmd(checkpoint, as_json, **settings):
    """Every activation-sparsity method on CHECKPOINT at each target sparsity.

    Per method and target: achieved sparsity, bytes skipped, precision / recall of the
    skip set against the true zeros (ReLU) or the smallest-|h1| rows (SiLU), predictor
    ops and memory, quality against dense (mean KL of next-token distributions, top-1
    agreement) with the NumPy reference model, and the simulated per-token speed-up on
    --hw. With --tasks, also accuracy through `sparseinfer eval` (one --method row per
    method and target, decoded on the NumPy reference model with a dense prefill): score
    per task and difference to the dense row in points. Under the table, what the sparsity
    and bytes-skipped figures count, and why a row exceeds its target. Calibration prompts
    (--calibration) never overlap the evaluation prompts (--prompts) or the task documents.
    Example:

    \b
        sparseinfer compare-methods ck/ --methods sparseinfer,dejavu,teal,cats --sparsity 0.5,0.9 --plot p.png
        sparseinfer compare-methods ck/ --methods teal,random --sparsity 0.9 --tasks gsm8k,bbh --limit 20 \\
            --data-dir DATA
    """
    from sparseinfer.evaluation.design_space import compare_methods_run

    result = compare_methods_run(checkpoint, log=echo_err, progress=None if as_json else _progress, **settings)
    if as_json:
        echo_json(result)
        return
    click.echo(f"{result['model']} ({result['activation']}), latency of {result['latency_model']} on "
               f"{result['hardware']}: dense {result['dense_latency_ms']:.3f} ms/token; calibration "
               f"{result['calibration']['prompts']} prompts / {result['calibration']['tokens']} tokens, evaluation "
               f"{result['evaluation']['prompts']} prompts / {result['evaluation']['tokens']} tokens; "
               f"scored against {result['reference_set']}")
    click.echo(table(result))
    for line in notes(result):
        click.echo(line)
    acc = result.get("accuracy")
    if acc:
        click.echo(f"accuracy ({', '.join(f'{t} {n}' for t, n in acc['samples'].items())} samples): dense "
                   f"({acc['dense']['engine']}) " + ", ".join(f"{t} {v:.2f}" for t, v in acc["dense"]["accuracy"].items())
                   + "; method rows on the NumPy reference model, prefill dense; Δ acc: average difference to dense "
                   f"in points; files under {acc['eval_json']}")
    for r in result["rows"]:
        if r["extra"].get("online_clustering_precision") is not None:
            e = r["extra"]
            click.echo(f"{r['method']} at {r['target_sparsity']:g}: clustering precision calibration "
                       f"{e['calibration_clustering_precision']:.3f}, online {e['online_clustering_precision']:.3f} "
                       f"(coverage {e['calibration_clustering_coverage']:.3f} / {e['online_clustering_coverage']:.3f})")
    for path in (settings["out_file"], settings["plot_file"]):
        if path:
            click.echo(f"wrote {path}")


COMMANDS = (compare_methods_cmd,)
