"""``sparseinfer tour``: the main job, one command that shows what the suite does.

Runs, in order: Table I (exact op counts), Fig. 4 (latency model on Jetson Orin, with a
plot), every CUDA kernel version checked against the reference (on the GPU, or on the CPU
emulation of the kernels), a small synthetic ProSparse-like checkpoint decoded dense and
sparse side by side through onnxruntime, and the per-layer predictor precision/recall of
that checkpoint (Fig. 3 style plot). Everything it writes goes under ``--out``.
"""
from __future__ import annotations

from pathlib import Path

import click

from sparseinfer.kernels.shapes import BENCH_MODELS, BENCH_SPARSITIES

from . import options
from .decode_commands import compare_cmd
from .dse_commands import predictor_stats
from .export_commands import make_checkpoint_cmd
from .kernel_commands import verification_table
from .latency_commands import fig4
from .output import echo_json, keeping_json
from .sim_commands import table1

TOUR_KERNEL_SHAPE = (1100, 1031)     # d, k: tails in every kernel, seconds on the emulator
TOUR_PROMPT = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May."


def _step(title: str) -> None:
    click.echo("")
    click.secho(f"== {title}", bold=True)


class _Steps:
    """Runs the tour's steps: each command's text under its title, or with --json its
    result kept under ``key`` of one document (output.keeping_json)."""

    def __init__(self, ctx, as_json: bool):
        self.ctx, self.as_json, self.result = ctx, as_json, {}

    def title(self, title: str | None) -> None:
        if title and not self.as_json:
            _step(title)

    def run(self, key: str, title: str | None, command, **params) -> None:
        self.title(title)
        if not self.as_json:
            self.ctx.invoke(command, **params)
            return
        with keeping_json() as kept:
            self.ctx.invoke(command, as_json=True, **params)
        self.result[key] = kept[0]


@click.command(short_help="The main job: Table I, Fig. 4, a model dense vs sparse.")
@click.option("--out", "out_dir", default="out", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the synthetic checkpoint, the ONNX exports and the plots.")
@options.max_new_tokens(24, "Decode steps of the dense/sparse comparison.")
@options.json_flag("Print one JSON document instead: each step's result (the --json of table1, fig4, "
                   "verify-kernels, make-checkpoint, compare, predictor-stats) and the files written.")
@click.pass_context
def tour(ctx, out_dir, max_new_tokens, as_json):
    """The main job: Table I, Fig. 4, and a synthetic model decoded dense vs sparse.

    \b
    1. Table I for ProSparse-Llama2-13B (operation counts, predictor memory) beside the paper.
    2. Fig. 4 speedups from the Jetson Orin latency model, plot in OUT/fig4.png.
    3. Every CUDA kernel version and pipeline run once and checked against the reference
       (d 1100, k 1031): on the GPU if there is one, else on the CPU emulation of the kernels.
    4. A tiny synthetic ProSparse-like checkpoint (OUT/tiny), exported to ONNX dense and
       sparse and decoded side by side on onnxruntime (CPU): divergence, |Δlogit|, tokens/s,
       measured sparsity and predictor precision/recall.
    5. Per-layer predictor precision/recall of that checkpoint, plot in OUT/fig3.png.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    steps = _Steps(ctx, as_json)
    steps.run("table1", "Table I: ProSparse-Llama2-13B, one MLP block per token", table1)
    steps.run("fig4", "Fig. 4: end-to-end speedups on Jetson Orin AGX (latency model)", fig4,
              plot_file=str(out / "fig4.png"))
    steps.title("CUDA kernels vs the reference (GPU, or the CPU emulation of the same sources)")
    from sparseinfer.kernels import emulator, gpu_unavailable_reason
    from sparseinfer.kernels.verify import verify_on_backend

    no_gpu, no_emulator = gpu_unavailable_reason(), emulator.unavailable_reason()
    if no_gpu and no_emulator:
        steps.result["kernels"] = {"skipped": f"{no_gpu}; {no_emulator}"}
        if not as_json:
            click.echo(f"skipped: {no_gpu}; {no_emulator}")
    else:
        d, k = TOUR_KERNEL_SHAPE
        use, rows = verify_on_backend("auto", BENCH_MODELS[0], d, k, BENCH_SPARSITIES[0], seed=0, log=lambda line: None)
        steps.result["kernels"] = {"backend": use, "rows": rows}
        if not as_json:
            click.echo(verification_table(rows))      # the table only: verify-kernels' progress lines would repeat it
        if not all(r["verified"] for r in rows):
            if as_json:
                echo_json(steps.result)
            raise SystemExit(1)
    ckpt = out / "tiny"
    steps.run("checkpoint", "A synthetic ProSparse-like checkpoint, dense vs sparse on onnxruntime",
              make_checkpoint_cmd, shape_name="tiny", out_dir=str(ckpt))
    steps.run("compare", None, compare_cmd, checkpoint=str(ckpt), prompt=TOUR_PROMPT, work_dir=str(out / "onnx"),
              max_new_tokens=max_new_tokens)
    steps.run("predictor_stats", "Predictor precision / recall per layer (Fig. 3 style)", predictor_stats,
              checkpoint=str(ckpt), plot_file=str(out / "fig3.png"))
    files = {"fig4": out / "fig4.png", "fig3": out / "fig3.png", "checkpoint": ckpt, "onnx": out / "onnx"}
    if as_json:
        echo_json({**steps.result, "files": {k: str(v) for k, v in files.items()}})
    else:
        click.echo(f"\nwrote {', '.join(str(v) for v in files.values())}")


COMMANDS = (tour,)
