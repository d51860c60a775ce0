"""Commands of the latency model: latency, fig4, hardware."""
from __future__ import annotations

import click

from sparseinfer.reference.shapes import load_model
from sparseinfer.sim import latency as lat
from sparseinfer.sim.hardware import builtin_hardware, load_hardware

from . import options
from .output import echo_json, format_table, rel_diff


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


def _fmt_calibration(calibration: dict, results_file) -> list[str]:
    return [f"calibrated from {results_file} ({calibration['device']}, {calibration['date']}): "
            + ", ".join(f"{k} {v:.3g}" for k, v in calibration["efficiency"].items()),
            format_table(["kernel", "version", "model", "sparsity", "class", "measured us", "model us", "error"],
                         [[r["kernel"], r["version"], r["model"], f"{r['sparsity']:g}", r["class"],
                           f"{r['measured_us']:.1f}", f"{r['model_us']:.1f}", f"{r['rel_error']:+.1%}"]
                          for r in calibration["rows"]]),
            f"launch time: {calibration['launch_source']}; fitted rows: "
            + (", ".join(calibration["versions"]) + " and cuBLAS" if calibration["versions"] else "all"),
            ""]


def _calibration_versions(pipeline):
    """--calibrate-pipeline as the (kernel, version) rows that --calibrate fits: a pipeline's
    gate+up and down, or all (None)."""
    from sparseinfer.kernels.registry import DEFAULT_PIPELINE, PIPELINES

    name = pipeline or DEFAULT_PIPELINE
    if name == "all":
        return None
    if name not in PIPELINES:
        raise click.BadParameter(f"unknown pipeline {name!r}; expected all or one of {', '.join(PIPELINES)}",
                                 param_hint="--calibrate-pipeline")
    p = PIPELINES[name]
    return {("gate_up", p.gate_up), ("down", p.down)}


@click.command(short_help="Per-token decode latency of each method.")
@options.model()
@options.HW
@options.alpha()
@click.option("--sparsity", default=None,
              help="True activation sparsity in [0, 1) (default: the model's reported one, 0.8880 for 13B).")
@options.CONTEXT
@options.rank()
@click.option("--ops", "show_ops", default=None, type=click.Choice(lat.METHODS),
              help="Also print the per-op breakdown of one method.")
@click.option("--calibrate", "results_file", type=click.Path(dir_okay=False),
              help="Benchmark results JSON (benchmarks/results/*.json): fit the platform's efficiency "
                   "constants to it, report the model's error per measured row, then simulate with them.")
@click.option("--calibrate-pipeline", "pipeline", default=None, show_default="the default pipeline",
              help="With --calibrate: fit the sparse fraction to this kernel pipeline's gate+up and down rows "
                   "(`sparseinfer kernels` lists them) and the dense one to the file's cuBLAS timings; `all` fits "
                   "every verified kernel row.")
@options.JSON
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
    from sparseinfer.sim.calibrate import calibrated_decode_latency, read_results

    model = load_model(model_name)
    spec = load_hardware(hw_file or hw)
    if pipeline is not None and not results_file:
        raise click.UsageError("--calibrate-pipeline needs --calibrate RESULTS.json")
    results = read_results(results_file) if results_file else None
    data = calibrated_decode_latency(model, spec, results, _calibration_versions(pipeline) if results_file else None,
                                     alpha=alpha, sparsity=sparsity, context_tokens=context_tokens, rank=rank)
    if as_json:
        echo_json(data)
        return
    calibration = data.get("calibration")
    for line in _fmt_calibration(calibration, results_file) if calibration else []:
        click.echo(line)
    eff = data["efficiency"]
    si = data["sparseinfer_layers"]
    click.echo(f"{model.name} on {data['hardware']}: alpha {alpha}, context {context_tokens}, "
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
@options.HW
@options.CONTEXT
@options.plot("Also write a PNG bar chart here.")
@options.json_flag("Print machine-readable JSON rows.")
def fig4(hw, hw_file, context_tokens, plot_file, as_json):
    """Reproduce the paper's Fig. 4 speedups (Jetson Orin AGX) beside the published values.

    Eight numbers: 13B and 7B at α 1.00, 13B at 1.02 and 7B at 1.03 on the first 20
    layers; SparseInfer (+KF+AS) versus llama.cpp and versus PowerInfer.
    """
    spec = load_hardware(hw_file or hw)
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
@options.JSON
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


COMMANDS = (latency, fig4, hardware)
