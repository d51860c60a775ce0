"""Commands of the hardware simulator and design-space exploration: latency, fig4,
hardware, predictor-stats, sweep."""
from __future__ import annotations

import sys

import click

from sparseinfer.reference.errors import SparseInferError
from sparseinfer.reference.shapes import load_model
from sparseinfer.sim import latency as lat
from sparseinfer.sim import paper
from sparseinfer.sim.hardware import builtin_hardware, load_hardware
from sparseinfer.sim.ops import MAX_CONTEXT_TOKENS, MAX_RANK

from .eval_commands import eval_runner, task_options
from .export_commands import MAX_THREADS
from .output import echo_err, echo_json, format_table, rel_diff
from .sim_commands import MODEL_HELP

HW_HELP = "Platform: a built-in name (see `sparseinfer hardware`) or a TOML file of the same form."
ALPHA_HELP = "α schedule, e.g. 1.00 or '1.03@0-19,1.00' (α > 1 is more conservative)."
MAX_PROMPTS = click.option("--max-prompts", default=4, show_default=True, type=click.IntRange(1),
                           help="Use at most this many prompts.")
CONTEXT = click.option("--context", "context_tokens", default=lat.DEFAULT_CONTEXT_TOKENS, show_default=True,
                       type=click.IntRange(0, MAX_CONTEXT_TOKENS),
                       help=f"KV-cache length (tokens) of the decode step, 0..{MAX_CONTEXT_TOKENS:,}.")


def open_runner(checkpoint_path, prompts_file=None, max_prompts: int = 4, max_new_tokens: int = 8, progress=None,
                ort=None, needs_exact_zeros: bool = False):
    """Load the checkpoint (model_export) and read the prompts first, then run the dense
    greedy decodes (``sim.model_runner.ReferenceRunner``). ``ort``: {provider, export_dir,
    threads, mlp_kernels} to run onnxruntime debug exports instead (``evaluation.ort_runner``).
    ``needs_exact_zeros``: the run uses the sign predictor at --alpha (``require_exact_zeros``)."""
    from sparseinfer.sim.model_runner import ReferenceRunner, read_prompts

    prompts = read_prompts(prompts_file, max_prompts)
    if ort and ort.get("provider"):
        from sparseinfer.evaluation.ort_runner import OrtRunner

        runner = OrtRunner(checkpoint_path, prompts, max_new_tokens, progress=progress, **ort)
        if needs_exact_zeros:
            require_exact_zeros(runner.checkpoint, "drop --provider and pass --approximate")
        return runner
    from sparseinfer.model_export.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(checkpoint_path)
    if needs_exact_zeros:                                 # before the dense decodes
        require_exact_zeros(checkpoint, "pass --approximate")
    return ReferenceRunner(checkpoint, prompts, max_new_tokens, progress)


def require_exact_zeros(checkpoint, remedy: str) -> None:
    """The sign predictor at --alpha skips the rows whose activation is exactly zero; on an
    activation without exact zeros (SiLU, GELU) it runs only as an approximation, which
    --approximate asks for: one line naming the activation and the option."""
    act = checkpoint.weights.activation
    if not act.sparse_capable:
        raise SparseInferError(f"{checkpoint.source}: activation {act} has no exact zeros, so the sign predictor "
                               f"at --alpha cannot skip rows exactly; {remedy} (rows predicted negative taken as "
                               f"zero)")


def ort_options(f):
    """--provider, --export-dir, --threads, --mlp-kernels: masks from onnxruntime debug exports."""
    from sparseinfer.model_export.decode import MLP_KERNELS, MLP_KERNELS_HELP

    f = click.option("--mlp-kernels", type=click.Choice(MLP_KERNELS), default="auto", show_default=True,
                     help="With --provider: " + MLP_KERNELS_HELP)(f)
    f = click.option("--threads", type=click.IntRange(1, MAX_THREADS), default=None,
                     help=f"With --provider: onnxruntime intra-op threads, 1..{MAX_THREADS}.")(f)
    f = click.option("--export-dir", type=click.Path(file_okay=False), default="out/dse-exports", show_default=True,
                     help="With --provider: where the debug exports (one per alpha schedule, and the dense one) "
                          "are made once and cached.")(f)
    return click.option("--provider", type=click.Choice(["cpu", "cuda"]), default=None,
                        help="Decode onnxruntime exports with debug outputs (per-layer predicted/actual zero masks) "
                             "on this provider instead of the NumPy reference model; the sign predictor (--alpha) "
                             "only.")(f)


def _ort(provider, export_dir, threads, mlp_kernels, method) -> dict | None:
    if provider is None:
        return None
    if method is not None:
        raise click.UsageError(f"--provider runs the sign predictor (--alpha) only; --method {method.name} "
                               "needs the NumPy reference model (drop --provider)")
    return {"provider": provider, "export_dir": export_dir, "threads": threads, "mlp_kernels": mlp_kernels}


DEFAULT_METHOD_SPARSITY = "0.9"


def method_options(f):
    """--method, --sparsity, --param, --approximate, --calibration."""
    f = click.option("--calibration", "calibration_file", type=click.Path(dir_okay=False),
                     help="With --method: calibration prompts (text or JSONL), disjoint from --prompts; "
                          "default: built-in ones.")(f)
    f = click.option("--approximate", is_flag=True,
                     help="Allow the sign predictor on a SiLU model (predicted-negative gates treated as zero).")(f)
    f = click.option("--param", "params", multiple=True,
                     help="Method parameter METHOD.KEY=VALUE (repeatable), e.g. dejavu.rank=64.")(f)
    f = click.option("--sparsity", default=None,
                     help=f"Target sparsity of --method (comma-separated for sweep; default {DEFAULT_METHOD_SPARSITY}); "
                          "with the default method it calibrates α per layer to it.")(f)
    return click.option("--method", "method_name", default="sparseinfer", show_default=True,
                        help="Sparsity method: sparseinfer (the sign predictor at --alpha), oracle, random, dejavu, "
                             "teal, cats, wisparse, cluster, cluster-oracle, dense.")(f)


def _hardware(hw, hw_file):
    return load_hardware(hw_file if hw_file else hw)


def hw_options(f):
    f = click.option("--hw-file", type=click.Path(dir_okay=False),
                     help="Add a platform from a small TOML file (overrides --hw).")(f)
    return click.option("--hw", default="jetson-orin-agx", show_default=True, help=HW_HELP)(f)


def _fmt_latency(data: dict) -> str:
    rows = [[r["method"], f"{r['ms_per_token']:.2f}", f"{r['stage_us'].get('attention', 0) / 1000:.2f}",
             f"{r['stage_us'].get('predictor', 0) / 1000:.2f}", f"{r['stage_us'].get('mlp', 0) / 1000:.2f}",
             f"{r['stage_us'].get('lm_head', 0) / 1000:.2f}",
             f"{r['speedup_vs_llama.cpp']:.3f}x" if r["speedup_vs_llama.cpp"] else "-",
             f"{r['speedup_vs_PowerInfer']:.3f}x" if r["speedup_vs_PowerInfer"] else "-"] for r in data["methods"]]
    return format_table(["method", "ms/token", "attention", "predictor", "MLP", "LM head", "vs llama.cpp", "vs PowerInfer"],
                        rows)


def _fmt_ops(method_row: dict) -> str:
    rows = [[o["name"], o["stage"], f"{o['bytes'] / 1e6:.2f}", f"{o['ops'] / 1e6:.2f}", o["unit"], o["launches"],
             o["bandwidth"], o["bound"], f"{o['time_us']:.1f}"] for o in method_row["ops"]]
    return format_table(["op", "stage", "MB", "Mops", "unit", "launches", "bw", "bound", "us/token"], rows)


@click.command(short_help="Per-token decode latency of each method.")
@click.option("--model", "model_name", default="prosparse-llama2-13b", show_default=True, help=MODEL_HELP)
@hw_options
@click.option("--alpha", default="1.00", show_default=True, help=ALPHA_HELP)
@click.option("--sparsity", default=None,
              help="True activation sparsity in [0, 1) (default: the model's reported one, 0.8880 for 13B).")
@CONTEXT
@click.option("--rank", default=paper.TABLE1_POWERINFER_RANK, show_default=True, type=click.IntRange(1, MAX_RANK),
              help=f"Rank r of PowerInfer's DejaVu predictor, 1..{MAX_RANK}.")
@click.option("--ops", "show_ops", default=None, type=click.Choice(lat.METHODS),
              help="Also print the per-op breakdown of one method.")
@click.option("--calibrate", "results_file", type=click.Path(dir_okay=False),
              help="Benchmark results JSON (benchmarks/results/*.json): fit the platform's efficiency "
                   "constants to it, report the model's error per measured row, then simulate with them.")
@click.option("--calibrate-pipeline", "pipeline", default=None, show_default="the default pipeline",
              help="With --calibrate: fit the sparse fraction to this kernel pipeline's gate+up and down rows "
                   "(`sparseinfer kernels` lists them) and the dense one to the file's cuBLAS timings; `all` fits "
                   "every verified kernel row.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def latency(model_name, hw, hw_file, alpha, sparsity, context_tokens, rank, show_ops, results_file, pipeline,
            as_json):
    """Per-token decode latency of each method, per op, on one platform.

    Methods: llama.cpp (dense), PowerInfer (DejaVu predictor of rank r, fp16 tensor cores)
    and SparseInfer with/without kernel fusion (+KF) and actual sparsity (+AS). Every op is
    timed as launches x launch time + max(bytes / achieved bandwidth, ops / achieved
    compute); the binding limit is reported. Example:

    \b
        sparseinfer latency --model prosparse-llama2-13b --hw jetson-orin-agx --alpha '1.02@0-19,1.00'
    """
    from sparseinfer.sim import calibrate as cal

    model = load_model(model_name)
    spec = _hardware(hw, hw_file)
    calibration = None
    if pipeline is not None and not results_file:
        raise click.UsageError("--calibrate-pipeline needs --calibrate RESULTS.json")
    if results_file:
        calibration = cal.calibrate(spec, cal.read_results(results_file), _calibration_versions(pipeline))
        spec = cal.calibrated_hardware(spec, calibration)
    data = lat.decode_latency(model, spec, alpha, sparsity, lat.METHODS, context_tokens, rank)
    if calibration:
        data["calibration"] = calibration
    if as_json:
        echo_json(data)
        return
    if calibration:
        click.echo(f"calibrated from {results_file} ({calibration['device']}, {calibration['date']}): "
                   + ", ".join(f"{k} {v:.3g}" for k, v in calibration["efficiency"].items()))
        click.echo(format_table(["kernel", "version", "model", "sparsity", "class", "measured us", "model us",
                                 "error"],
                                [[r["kernel"], r["version"], r["model"], f"{r['sparsity']:g}", r["class"],
                                  f"{r['measured_us']:.1f}", f"{r['model_us']:.1f}", f"{r['rel_error']:+.1%}"]
                                 for r in calibration["rows"]]))
        click.echo(f"launch time: {calibration['launch_source']}; fitted rows: "
                   + (", ".join(calibration["versions"]) + " and cuBLAS" if calibration["versions"] else "all"))
        click.echo("")
    eff = data["efficiency"]
    si = data["sparseinfer_layers"]
    click.echo(f"{model.name} on {spec.name}: alpha {alpha}, context {context_tokens}, "
               f"weights {data['weight_gib']:.1f} GiB{'' if data['fits_in_memory'] else ' (DOES NOT FIT in device memory)'}")
    click.echo(f"efficiency: dense bw {eff['dense_bandwidth_fraction']:.2f}, sparse bw {eff['sparse_bandwidth_fraction']:.2f}, "
               f"launch {eff['kernel_launch_us']:.1f} us, compute {eff['compute_fraction']:.2f}; "
               f"SparseInfer predicted sparsity {min(s['predicted'] for s in si):.3f}-{max(s['predicted'] for s in si):.3f}, "
               f"PowerInfer {data['powerinfer_predicted_sparsity']:.3f}")
    click.echo(_fmt_latency(data))
    if show_ops:
        click.echo("")
        click.echo(_fmt_ops(next(r for r in data["methods"] if r["method"] == show_ops)))


@click.command(short_help="Reproduce the paper's Fig. 4 speedups (Jetson Orin).")
@hw_options
@CONTEXT
@click.option("--plot", "plot_file", type=click.Path(dir_okay=False), help="Also write a PNG bar chart here.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON rows.")
def fig4(hw, hw_file, context_tokens, plot_file, as_json):
    """Reproduce the paper's Fig. 4 speedups (Jetson Orin AGX) beside the published values.

    Eight numbers: 13B and 7B at α 1.00, 13B at 1.02 and 7B at 1.03 on the first 20
    layers; SparseInfer (+KF+AS) versus llama.cpp and versus PowerInfer.
    """
    spec = _hardware(hw, hw_file)
    rows = lat.fig4(spec, context_tokens)
    if plot_file:
        from sparseinfer.sim.plots import plot_fig4

        plot_fig4(lat.fig4_variants(spec, context_tokens), plot_file, spec.name)
    if as_json:
        echo_json(rows)
        return
    click.echo(f"Fig. 4 on {spec.name} (SparseInfer = {lat.FIG4_METHOD}, context {context_tokens})")
    click.echo(format_table(["model", "alpha", "vs", "paper", "simulated", "error"],
                            [[r["model"], r["alpha"], r["vs"], f"{r['paper']:.2f}x", f"{r['simulated']:.2f}x",
                              rel_diff(r["simulated"], r["paper"])] for r in rows]))
    if plot_file:
        click.echo(f"wrote {plot_file}")


@click.command(short_help="List the built-in hardware platforms.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def hardware(as_json):
    """List the built-in platforms with their peak figures and efficiency constants."""
    specs = builtin_hardware().values()
    if as_json:
        echo_json([s.to_dict() for s in specs])
        return
    click.echo(format_table(
        ["name", "GB/s", "GiB", "fp16 TC TFLOPS", "fp32 TFLOPS", "dense bw", "sparse bw", "launch us"],
        [[s.name, s.memory_bandwidth_gb_per_s, s.memory_gib, s.fp16_tensor_tflops, s.fp32_cuda_tflops,
          s.efficiency.dense_bandwidth_fraction, s.efficiency.sparse_bandwidth_fraction, s.efficiency.kernel_launch_us]
         for s in specs]))


def _progress(done, total, row):
    echo_err(f"[{done}/{total}] alpha {row['alpha']:.3f}: {row['latency_ms']:.3f} ms, "
             f"sparsity {row['union_sparsity']:.3f}, top-1 {row['top1_agreement']:.3f}")


@click.command(name="predictor-stats", short_help="Per-layer predictor precision / recall (Fig. 3).")
@click.argument("checkpoint", type=click.Path())
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False),
              help="Text file (one prompt per line) or JSONL with 'question'/'prompt'/'text' fields.")
@click.option("--alpha", default="1.00", show_default=True, help=ALPHA_HELP)
@MAX_PROMPTS
@click.option("--max-new-tokens", default=8, show_default=True, type=click.IntRange(1),
              help="Decode steps traced per prompt.")
@method_options
@ort_options
@click.option("--plot", "plot_file", type=click.Path(dir_okay=False), help="Write a Fig. 3-style PNG here.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def predictor_stats(checkpoint, prompts_file, alpha, max_prompts, max_new_tokens, method_name, sparsity, params,
                    approximate, calibration_file, provider, export_dir, threads, mlp_kernels, plot_file, as_json):
    """Per-layer precision / recall of the predicted zero rows (paper Fig. 3).

    Runs the checkpoint on real prompts with the NumPy reference model (with --provider:
    onnxruntime exports with debug masks, made once under --export-dir) and reports, per
    layer, precision and recall of zero rows, predicted / actual / union sparsity and the
    fraction of the MLP's weight bytes skipped.
    """
    from sparseinfer.sim.predictor_stats import per_layer_stats, summary

    method = _method_or_none(method_name, sparsity, params, approximate, calibration_file, single=True)
    ort = _ort(provider, export_dir, threads, mlp_kernels, method)
    runner = open_runner(checkpoint, prompts_file, max_prompts, max_new_tokens, echo_err, ort,
                         needs_exact_zeros=method is None)
    if method is None:
        _, traces = runner.sparse(alpha)
    else:
        method, targets, calibration = _prepare_method(runner, method, sparsity, calibration_file, prompts_file,
                                                       max_prompts)
        method.prepare(runner.weights, calibration, targets[0])
        _, traces = runner.run_method(method, targets[0])
    stats = per_layer_stats(traces)
    data = {"checkpoint": str(checkpoint), "model": runner.shape.name, "alpha": str(alpha),
            "tokens": len(traces), "layers": [s.to_dict() for s in stats], "mean": summary(stats),
            "engine": f"onnxruntime {provider}" if ort else "numpy reference"}
    if method is not None:
        data.update({"method": method.name, "sparsity": targets[0], "params": method.describe()["params"]})
        del data["alpha"]
        alpha = f"n/a ({method.name}, target sparsity {targets[0]:g})"
    if plot_file:
        from sparseinfer.sim.plots import plot_precision_recall

        plot_precision_recall(data["layers"], plot_file, f"{runner.shape.name}, alpha {alpha}")
    if as_json:
        echo_json(data)
        return
    click.echo(f"{runner.shape.name}: alpha {alpha}, {len(traces)} decoded tokens")
    click.echo(format_table(["layer", "precision", "recall", "predicted", "actual", "union", "bytes skipped"],
                            [[s.layer, f"{s.precision:.4f}", f"{s.recall:.4f}", f"{s.predicted_sparsity:.4f}",
                              f"{s.actual_sparsity:.4f}", f"{s.union_sparsity:.4f}", f"{s.bytes_skipped:.4f}"]
                             for s in stats]))
    if plot_file:
        click.echo(f"wrote {plot_file}")


@click.command(short_help="α sweep: simulated latency vs sparsity and quality.")
@click.argument("checkpoint", type=click.Path())
@click.option("--alpha", "alpha_range", default="1.00:1.05:0.01", show_default=True,
              help="α values START:STOP:STEP (inclusive), applied to --layers; other layers stay at 1.00.")
@click.option("--layers", default=None,
              help="Layers A-B whose α is swept, or 'all' (default: the first 20 layers, as in the paper).")
@hw_options
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False),
              help="Text file (one prompt per line) or JSONL with 'question'/'prompt'/'text' fields.")
@MAX_PROMPTS
@click.option("--max-new-tokens", default=8, show_default=True, type=click.IntRange(1),
              help="Decode steps per prompt.")
@method_options
@ort_options
@task_options("out/sweep-eval")
@click.option("--plot", "plot_file", type=click.Path(dir_okay=False),
              help="Write the latency-quality PNG here (with --tasks: accuracy against latency).")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def sweep(checkpoint, alpha_range, layers, hw, hw_file, prompts_file, max_prompts, max_new_tokens, method_name,
          sparsity, params, approximate, calibration_file, provider, export_dir, threads, mlp_kernels, tasks, limit,
          data_dir, max_gen_toks, eval_out, plot_file, as_json):
    """α sweep: simulated latency and speedup vs measured sparsity and quality.

    For each α: the simulated per-token latency (SparseInfer+KF+AS on --hw, from the
    measured per-layer sparsity), its speedup over dense llama.cpp, the measured sparsity,
    and quality against the dense model on the same prompts (top-1 agreement, mean KL,
    max |delta logit|). Pareto-optimal points (latency, KL) are marked. With --tasks, each
    row also gets its accuracy from `sparseinfer eval` (the α rows through onnxruntime
    exports on --provider, default cpu; --method rows on the NumPy reference model), with
    the difference to dense in points and its own Pareto mark (latency, accuracy).
    """
    from sparseinfer.sim import alpha_sweep
    from sparseinfer.sim.methods import parse_param_options

    method = _method_or_none(method_name, sparsity, params, approximate, calibration_file, single=False)
    ort = _ort(provider, export_dir, threads, mlp_kernels, method)
    if tasks:
        eval_runner().check_task_arguments(tasks, data_dir, limit, calibration_file,
                                           64 if method is not None else None)
    evaluation = {"tasks": tasks, "limit": limit, "data_dir": data_dir, "max_gen_toks": max_gen_toks,
                  "out": eval_out, "log": echo_err, "progress": False}
    if method is not None:
        spec = _hardware(hw, hw_file)
        runner = open_runner(checkpoint, prompts_file, max_prompts, max_new_tokens, echo_err)
        method, targets, calibration = _prepare_method(runner, method, sparsity, calibration_file, prompts_file,
                                                       max_prompts)
        result = alpha_sweep.run_method_sweep(runner, method, calibration, targets, spec,
                                              progress=None if as_json else _method_progress)
        if tasks:
            given = parse_param_options(params).get(method.name, {})
            if method.name == "sparseinfer":
                given.setdefault("alpha", "auto" if sparsity is not None else "1.00")    # as _method_or_none
            ev = eval_runner().run_eval(checkpoint, methods=[f"{method.name}@{s:g}" for s in targets],
                                        params={method.name: given}, approximate=approximate,
                                        calibration_file=calibration_file, **evaluation)
            _add_accuracy(result, ev, lambda r: r["sparsity"] if r["kind"] == "method" else None,
                          lambda r: r["sparsity"], eval_out)
        if as_json:
            echo_json(result)
            return
        click.echo(f"{result['model']} on {result['hardware']}: method {result['method']}, "
                   f"dense {result['dense_latency_ms']:.3f} ms/token")
        acc = _accuracy_columns(result)
        click.echo(format_table(
            ["target", "achieved", "ms/token", "speedup", "bytes skipped", "precision", "recall", "top-1", "mean KL",
             *acc[0], "pareto"],
            [[f"{r['sparsity']:g}", f"{r['achieved_sparsity']:.4f}", f"{r['latency_ms']:.3f}",
              f"{r['speedup_vs_llama.cpp']:.3f}x", f"{r['bytes_skipped']:.4f}", f"{r['precision']:.4f}",
              f"{r['recall']:.4f}", f"{r['top1_agreement']:.3f}", f"{r['mean_kl']:.3g}", *acc[1](r),
              "*" if r["pareto"] else ""] for r in result["rows"]]))
        _echo_accuracy(result)
        return
    alphas = alpha_sweep.parse_alpha_range(alpha_range)
    # --layers syntax is checked before the (slow) checkpoint load: no layer bound yet, so
    # only a malformed range fails here; the bound is checked once the layer count is known
    alpha_sweep.parse_layers(layers, sys.maxsize)
    spec = _hardware(hw, hw_file)
    runner = open_runner(checkpoint, prompts_file, max_prompts, max_new_tokens, echo_err, ort, needs_exact_zeros=True)
    span = alpha_sweep.parse_layers(layers, runner.shape.num_layers)
    result = alpha_sweep.run_sweep(runner, alphas, span, spec, progress=None if as_json else _progress)
    result["engine"] = f"onnxruntime {provider}" if ort else "numpy reference"
    if tasks:
        ev = eval_runner().run_eval(checkpoint, alphas=[r["schedule"] for r in result["rows"]],
                                    provider=provider or "cpu", threads=threads, mlp_kernels=mlp_kernels, **evaluation)
        _add_accuracy(result, ev, lambda r: r["alpha"] if r["kind"] == "sparse" else None,
                      lambda r: r["schedule"], eval_out)
    if plot_file:
        from sparseinfer.sim.plots import plot_sweep

        if tasks:            # accuracy against latency, the front on (latency, accuracy)
            plot_sweep({**result, "rows": [{**r, "pareto": r["pareto_accuracy"]} for r in result["rows"]]},
                       plot_file, quality_key="accuracy_average")
        else:
            plot_sweep(result, plot_file)
    if as_json:
        echo_json(result)
        return
    click.echo(f"{result['model']} on {result['hardware']}: layers {result['layers']}, "
               f"dense {result['dense_latency_ms']:.3f} ms/token")
    acc = _accuracy_columns(result)
    click.echo(format_table(
        ["alpha", "ms/token", "speedup", "pred sparsity", "union sparsity", "top-1", "mean KL", "max |dlogit|",
         *acc[0], "pareto"],
        [[f"{r['alpha']:.3f}", f"{r['latency_ms']:.3f}", f"{r['speedup_vs_llama.cpp']:.3f}x",
          f"{r['predicted_sparsity']:.4f}", f"{r['union_sparsity']:.4f}", f"{r['top1_agreement']:.3f}",
          f"{r['mean_kl']:.3g}", f"{r['max_abs_logit_delta']:.3g}", *acc[1](r), "*" if r["pareto"] else ""]
         for r in result["rows"]]))
    _echo_accuracy(result)
    if plot_file:
        click.echo(f"wrote {plot_file}")


def _add_accuracy(result: dict, ev: dict, eval_key, row_key, eval_out) -> None:
    """Each sweep row's accuracy columns (``runner.merge_accuracy``); ``pareto_accuracy`` marks
    the front of (latency, accuracy)."""
    from sparseinfer.sim.alpha_sweep import pareto_front

    eval_runner().merge_accuracy(result, ev, eval_key, row_key, eval_out)
    front = pareto_front([{"latency_ms": r["latency_ms"], "loss": -r["accuracy_average"]} for r in result["rows"]],
                         "latency_ms", "loss")
    for i, row in enumerate(result["rows"]):
        row["pareto_accuracy"] = i in front


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


def _method_progress(done, total, row):
    echo_err(f"[{done}/{total}] sparsity {row['sparsity']:g}: {row['latency_ms']:.3f} ms, "
             f"achieved {row['achieved_sparsity']:.3f}, top-1 {row['top1_agreement']:.3f}")


def _method_or_none(method_name, sparsity, params, approximate, calibration_file, single: bool):
    """The --method's instance (None for the default sign predictor run by --alpha), its
    arguments checked before the slow checkpoint load."""
    from pathlib import Path

    from sparseinfer.sim.method_base import parse_sparsities
    from sparseinfer.sim.methods import check_method_name, make_method, parse_param_options

    name = check_method_name(method_name)
    by_method = parse_param_options(params)
    if sparsity is not None:
        targets = parse_sparsities(sparsity)
        if single and len(targets) != 1:
            raise click.BadParameter(f"one target sparsity, got {sparsity}", param_hint="--sparsity")
    if calibration_file and not Path(calibration_file).is_file():
        raise click.UsageError(f"no such calibration file: {calibration_file}")
    if name == "sparseinfer" and not by_method and not approximate and sparsity is None:
        return None          # today's behaviour: the sign predictor at --alpha
    if name == "sparseinfer" and sparsity is not None and "alpha" not in by_method.get(name, {}):
        by_method.setdefault(name, {})["alpha"] = "auto"
    unused = sorted(set(by_method) - {name})
    if unused:
        raise click.BadParameter(f"--param names {unused[0]}, but --method is {name}", param_hint="--param")
    return make_method(name, by_method.get(name), approximate)


def _prepare_method(runner, method, sparsity, calibration_file, prompts_file, max_prompts):
    """(method, targets, calibration over the calibration prompts, disjoint from the evaluation ones)."""
    from sparseinfer.sim.method_base import parse_sparsities
    from sparseinfer.sim.method_compare import load_calibration
    from sparseinfer.sim.model_runner import read_prompts

    targets = parse_sparsities(sparsity if sparsity is not None else DEFAULT_METHOD_SPARSITY)
    calibration = load_calibration(runner.checkpoint, calibration_file, 64, read_prompts(prompts_file, max_prompts),
                                   echo_err)
    return method, targets, calibration


COMMANDS = (latency, fig4, hardware, predictor_stats, sweep)


def _calibration_versions(pipeline):
    """The (kernel, version) rows that --calibrate fits: a pipeline's gate+up and down, or all (None)."""
    from sparseinfer.kernels.registry import DEFAULT_PIPELINE, PIPELINES

    name = pipeline or DEFAULT_PIPELINE
    if name == "all":
        return None
    if name not in PIPELINES:
        raise click.BadParameter(f"unknown pipeline {name!r}; expected all or one of {', '.join(PIPELINES)}",
                                 param_hint="--calibrate-pipeline")
    p = PIPELINES[name]
    return {("gate_up", p.gate_up), ("down", p.down)}
