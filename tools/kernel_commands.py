"""Commands over the CUDA kernels: bench (GPU) and kernels (list versions, CPU compile report)."""
from __future__ import annotations

import click

from sparseinfer.kernels.registry import FAMILIES, PIPELINES, QUANT_PIPELINES
from sparseinfer.kernels.shapes import BENCH_MODELS, BENCH_SPARSITIES, LOOP_LAYERS

from . import options
from .output import echo_err, echo_json, format_table


def _parse_sparsities(text: str) -> tuple:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers") from None
    if not all(0.0 <= v < 1.0 for v in values):
        raise click.BadParameter(f"sparsities must be in [0, 1), got {text}")
    return values


@click.command(short_help="Time every kernel version and pipeline on a GPU.")
@click.option("--model", "models", multiple=True, type=click.Choice(BENCH_MODELS),
              help="Model shape(s) to benchmark (default: all of them).")
@click.option("--sparsity", "sparsity", default=",".join(str(s) for s in BENCH_SPARSITIES), show_default=True,
              help="Comma-separated fractions of gate rows built to be predicted zero.")
@click.option("--repeats", default=50, show_default=True, type=click.IntRange(3, 10000),
              help="Timed runs per row (median and 10-90% spread are reported).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, writable=True),
              help="Also write the result JSON here.")
@click.option("--results-dir", type=click.Path(file_okay=False), default=None,
              help="Write <dir>/<device>.json as well (e.g. benchmarks/results).")
@click.option("--loop-layers", default=LOOP_LAYERS, show_default=True, type=click.IntRange(0, 256),
              help="Decode loop: this many copies of the last model's layer at the highest sparsity, "
                   "eager and as one CUDA graph (0: skip).")
@options.plot("Also draw the last model at the highest sparsity as a PNG (see bench-plot).")
def bench(models, sparsity, repeats, json_path, results_dir, loop_layers, plot_file):
    """Time every kernel version and MLP pipeline on the GPU (needs CuPy and a CUDA device).

    ProSparse-7B/13B shapes, fp16 weights, inputs built so that exactly the given
    fraction of gate rows is predicted zero. Each row: verified against the reference,
    median µs and spread (CUDA events, L2 flushed), bytes touched, GB/s, % of peak
    bandwidth, and speedup over cuBLAS dense fp16 GEMVs measured in the same run.
    Then the decode loop: --loop-layers copies of one layer (distinct memory) run back to
    back like a decode step's MLPs, every pipeline and cuBLAS, eager (Python launches each
    kernel) and replayed as one CUDA graph: µs per layer, host µs per layer, speedups.
    Prints tables (progress on stderr); `sparseinfer kernels` lists the versions.
    Without a GPU: one line `error: ...`, exit 2.
    """
    from sparseinfer.benchmarks.kernel_bench import bench_kernels

    result = bench_kernels(models, _parse_sparsities(sparsity), repeats, loop_layers, json_path, results_dir,
                           plot_file, log=echo_err)
    source = result.get("peak_source", "")
    click.echo(f"{result['device']}, CUDA {result['cuda_version']}, peak {result['peak_bandwidth_gb_per_s']} GB/s"
               f"{f' ({source})' if source.startswith(('datasheet', 'unknown')) else ''}, "
               f"empty launch {result['empty_launch_us']} us")
    click.echo(format_table(
        ["kernel", "version", "model", "sparsity", "verified", "us", "GB/s", "% peak", "x dense"],
        [[r["kernel"], r["version"], r["model"], r["sparsity"], "yes" if r["verified"] else "NO"]
         + ([f"{r['latency_us']:.1f}", f"{r['gb_per_s']:.0f}", f"{r['pct_peak']:.0f}", f"{r['speedup_vs_dense']:.2f}"]
            if "error" not in r else [r["error"][:60], "", "", ""])
         for r in result["rows"]]))
    if plot_file:
        from sparseinfer.benchmarks.plots import plot_bench
        click.echo(f"wrote {plot_bench(result, plot_file)}")
    loop = result.get("decode_loop")
    if loop and "error" in loop:
        click.echo(f"\ndecode loop failed: {loop['error']}")
    elif loop:
        click.echo(f"\ndecode loop: {loop['layers']} layers of {loop['model']}, sparsity {loop['sparsity']} "
                   "(us per layer; x dense: against cuBLAS eager / graph)")
        click.echo(format_table(
            ["pipeline", "mode", "verified", "us/layer", "host us/layer", "x dense eager", "x dense graph"],
            [[r["pipeline"], r["mode"], {True: "yes", False: "NO", None: "-"}[r["verified"]]]
             + ([f"{r['us_per_layer']:.1f}", f"{r['host_us_per_layer']:.1f}",
                 *(f"{r[key]:.2f}" if key in r else "-" for key in ("speedup_vs_dense_eager", "speedup_vs_dense_graph"))]
                if "us_per_layer" in r else [r["error"][:60], "", "", ""])
             for r in loop["rows"]]))


@click.command("bench-plot", short_help="Draw a `bench` results file as one PNG.")
@click.argument("results", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False), help="PNG file to write.")
@click.option("--model", type=click.Choice(BENCH_MODELS), default=None,
              help="Model shape to draw (default: the last one in the results).")
@click.option("--sparsity", type=float, default=None, help="Sparsity to draw (default: the highest).")
@click.option("--vs-sparsity", is_flag=True,
              help="Draw how the figures move with sparsity instead (results at two sparsities or more, e.g. "
                   "`bench --sparsity 0.8,0.9,0.95`): each pipeline's speed-up over cuBLAS and over the faster "
                   "dense row, its % of peak, and each predictor in empty launches, targets dashed.")
@options.json_flag("Print the PNG's path and what it draws (model, sparsity or sparsities) as JSON.")
def bench_plot(results, out, model, sparsity, vs_sparsity, as_json):
    """Draw a `sparseinfer bench` results file (benchmarks/results/<device>.json) as one PNG.

    Left: % of peak bandwidth of every kernel version, the 70 % target dashed, rows that
    failed verification hatched. Right: speed-up over cuBLAS dense of every MLP pipeline,
    one layer and, where present, the decode loop eager and as a CUDA graph; 5x dashed.
    With --vs-sparsity: the MLP pipelines and predictors against sparsity.
    """
    from sparseinfer.benchmarks.plots import pick, plot_bench, plot_sparsity_sweep, sparsity_series
    from sparseinfer.sim.calibrate import read_results

    if vs_sparsity and sparsity is not None:
        raise click.BadParameter("--sparsity picks one sparsity; --vs-sparsity draws them all", param_hint="--sparsity")
    result = read_results(results)
    if vs_sparsity:
        series = sparsity_series(result, model)
        drawn = {"plot": "vs-sparsity", "model": series["model"], "sparsities": series["sparsity"]}
        path = plot_sparsity_sweep(result, out, model)
    else:
        picked_model, picked_sparsity, _ = pick(result, model, sparsity)
        drawn = {"plot": "bench", "model": picked_model, "sparsity": picked_sparsity}
        path = plot_bench(result, out, model, sparsity)
    if as_json:
        echo_json({"path": str(path), "results": str(results), **drawn})
    else:
        click.echo(f"wrote {path}")


@click.command(short_help="List the kernel versions and MLP pipelines.")
@click.option("--compile", "do_compile", is_flag=True,
              help="Also compile every source with NVRTC + ptxas (no GPU needed) and report registers and spills.")
@options.JSON
def kernels(do_compile, as_json):
    """List the kernel versions and MLP pipelines (with --compile: registers and spills per arch).

    The families named with a block format (gate_up_q4_0, ...) and the pipelines whose kernels
    say so run on block-quantized weights (Q8_0, Q4_0, Q4_1). Every version has a one-line description; "bit-exact" ones match the reference's
    order contract bit for bit, "bound" ones are checked against its rigorous error
    bound. --compile needs no GPU: NVRTC and ptxas from the pip packages
    nvidia-cuda-nvrtc-cu12 / nvidia-cuda-nvcc-cu12 (sm_80, sm_87, sm_90).
    """
    data = {"versions": [{"family": v.family, "name": v.name, "deterministic": v.deterministic,
                          "description": v.description} for fam in FAMILIES.values() for v in fam.values()],
            "pipelines": [{"name": p.name, "gate_up": p.gate_up, "down": p.down, "mlp_fused": p.fused or None,
                           "layout": p.layout, "weights": p.weights or None, "description": p.description}
                          for p in (*PIPELINES.values(), *QUANT_PIPELINES.values())]}
    if do_compile:
        from sparseinfer.kernels import compile_check as cc
        try:
            reports = cc.compile_all()
        except cc.ToolMissing as e:
            raise click.ClickException(str(e)) from None
        data["compile"] = [{"source": r.source, "arch": f"sm_{r.arch}", "kernel": k.name, "registers": k.registers,
                            "spill_store_bytes": k.spill_store_bytes, "spill_load_bytes": k.spill_load_bytes,
                            "contract_violations": len(r.contract_violations)}
                           for r in reports for k in r.kernels.values()]
    if as_json:
        echo_json(data)
        return
    click.echo(format_table(["family", "version", "bit-exact", "description"],
                            [[v["family"], v["name"], "yes" if v["deterministic"] else "bound", v["description"]]
                             for v in data["versions"]]))
    click.echo("")
    # a fused pipeline runs its mlp_fused version alone (gate_up / down name the rows it reads)
    click.echo(format_table(["pipeline", "kernels", "layout", "description"],
                            [[p["name"], f"mlp_fused {p['mlp_fused']}" if p["mlp_fused"] else
                              f"{p['gate_up']} + {p['down']}" + (f" ({p['weights']})" if p["weights"] else ""),
                              p["layout"], p["description"]] for p in data["pipelines"]]))
    if do_compile:
        click.echo("")
        click.echo(format_table(["kernel", "arch", "registers", "spill stores B", "spill loads B"],
                                [[c["kernel"], c["arch"], c["registers"], c["spill_store_bytes"],
                                  c["spill_load_bytes"]] for c in data["compile"]]))


@click.command("verify-kernels", short_help="Check every kernel version against the reference.")
@click.option("--backend", type=click.Choice(["auto", "gpu", "emulated"]), default="auto", show_default=True,
              help="gpu: CuPy on a CUDA device; emulated: the same CUDA sources compiled for the CPU with g++ "
                   "(kernels/emulator.py); auto: gpu where there is one.")
@click.option("--model", type=click.Choice(BENCH_MODELS), default=BENCH_MODELS[0], show_default=True,
              help="Activation, and the shape unless --d / --k are given.")
@click.option("--d", "d", type=click.IntRange(1), default=None, help="Hidden size (default: the model's).")
@click.option("--k", "k", type=click.IntRange(1), default=None, help="Intermediate size (default: the model's).")
@click.option("--sparsity", type=click.FloatRange(0.0, 1.0, max_open=True), default=BENCH_SPARSITIES[0],
              show_default=True, help="Fraction of gate rows built to be predicted zero.")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True, help="Seed of the random test inputs.")
@options.JSON
def verify_kernels(backend, model, d, k, sparsity, seed, as_json):
    """Run every kernel version and MLP pipeline once and check it against the reference.

    fp16 weights, x built so that exactly --sparsity of the gate rows is predicted zero
    (as in `sparseinfer bench`). Deterministic versions must match the reference bit for
    bit, the atomic ones stay inside its rigorous error bound. With --backend emulated no
    GPU is needed: the CUDA sources run on the CPU, one fiber per CUDA thread, which checks
    the kernels' logic but not their speed or the GPU's memory model; at the 7B/13B shapes
    it takes a minute or two on 2 cores, at --d 1100 --k 1031 seconds. The versions and
    pipelines on block-quantized weights (Q8_0, Q4_0, Q4_1) run on the layer zero-padded to
    whole blocks of 32 and quantized.
    Exit code 1 when a version does not verify.
    """
    from sparseinfer.kernels.verify import verify_on_backend

    use, rows = verify_on_backend(backend, model, d, k, sparsity, seed, log=echo_err)
    if as_json:
        echo_json({"backend": use, "rows": rows})
    else:
        click.echo(verification_table(rows))
    if not all(r["verified"] for r in rows):
        raise SystemExit(1)


def verification_table(rows: list[dict]) -> str:
    return format_table(["kernel", "version", "d", "k", "sparsity", "backend", "verified"],
                        [[r["kernel"], r["version"], r["d"], r["k"], r["sparsity"], r["backend"],
                          "yes" if r["verified"] else "NO"] for r in rows])


COMMANDS = (bench, bench_plot, kernels, verify_kernels)
