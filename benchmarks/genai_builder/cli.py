"""The benchmark's command line: ``convert``, ``build`` and ``run``, each parsing its
arguments, calling its step and printing what it did (see the package's docstring)."""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import click

from sparseinfer.reference.errors import SparseInferError

from .build import PRECISIONS, run_builder
from .convert import write_hf_folder
from .report import DEFAULT_PROMPT, TARGET_RATIO, benchmark, read_commands


def own_command_line(ctx: click.Context) -> str:
    """This subcommand's command line, rebuilt from its parsed parameters (the same whether it
    came from a shell or from a test)."""
    words = [Path(sys.executable).as_posix(), "-m", "sparseinfer.benchmarks.genai_builder", ctx.info_name]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if value is None or not isinstance(param, click.Option):
            continue
        flag = param.opts[0]
        if param.is_flag:
            if param.secondary_opts:
                words.append(flag if value else param.secondary_opts[0])
            elif value:
                words.append(flag)
        elif param.multiple:
            for v in value:
                words += [flag, str(v)]
        else:
            words += [flag, str(value)]
    return shlex.join(words)


def _fail(e: Exception):
    click.echo(f"error: {e}", err=True)
    sys.exit(2)


@click.group()
def cli():
    """Our dense export against onnxruntime-genai's model builder (see the package's docstring)."""


@cli.command()
@click.argument("checkpoint", type=click.Path(exists=True))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="The Hugging Face folder to write.")
@click.option("--as-silu", is_flag=True,
              help="Write the checkpoint's SiLU twin (same weights, hidden_act silu): the builder has no FATReLU, "
                   "and a dense model's speed does not depend on its activation.")
def convert(checkpoint, out, as_silu):
    """Write CHECKPOINT (HF folder or GGUF file) as a float32 Hugging Face Llama folder."""
    try:
        path = write_hf_folder(checkpoint, out, as_silu=as_silu)
    except SparseInferError as e:
        _fail(e)
    click.echo(f"wrote {path}: " + ", ".join(sorted(p.name for p in path.iterdir())))


@cli.command()
@click.argument("hf_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="The builder's output folder.")
@click.option("--python", "python", required=True, type=click.Path(exists=True, dir_okay=False),
              help="An interpreter with onnxruntime-genai, onnx_ir, torch and transformers (a side environment).")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None, help="The builder's -c cache folder.")
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True,
              help="The builder's weight precision; int4: round to nearest, blocks of 32, accuracy level 4.")
def build(hf_dir, out, python, cache_dir, precision):
    """Run onnxruntime-genai's model builder on HF_DIR for the CPU provider."""
    try:
        run_builder(python, hf_dir, out, cache_dir, log=click.echo, precision=precision)
    except SparseInferError as e:
        _fail(e)


@cli.command()
@click.option("--ours", required=True, type=click.Path(exists=True, file_okay=False), help="Our export's folder.")
@click.option("--builder", required=True, type=click.Path(exists=True, file_okay=False), help="The builder's folder.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The result JSON.")
@click.option("--prompt", default=DEFAULT_PROMPT, show_default=True, help="Encoded with our export's tokenizer.")
@click.option("--new-tokens", type=click.IntRange(min=2), default=64, show_default=True)
@click.option("--rounds", type=click.IntRange(min=1), default=7, show_default=True, help="Timed rounds.")
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True, help="Untimed rounds first.")
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True, help="Intra-op threads.")
@click.option("--onnx-decoder/--no-onnx-decoder", default=True, show_default=True,
              help="Also time our export on OnnxDecoder.")
@click.option("--profile-dir", type=click.Path(file_okay=False), default=None,
              help="Also profile one genai generation of each model (onnxruntime's profiler) into this folder.")
@click.option("--commands-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Setup commands to record, one per line.")
@click.option("--quiet-wait-s", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Before each round wait up to this long for other processes to use < 0.3 cores (none is paused).")
@click.option("--note", "notes", multiple=True, help="A note for the result (repeatable).")
def run(ours, builder, out, prompt, new_tokens, rounds, warmup, threads, onnx_decoder, profile_dir, commands_file,
        quiet_wait_s, notes):
    """Time decode tokens/s of OURS and BUILDER in alternating rounds; write --out."""
    try:
        commands = read_commands(commands_file) if commands_file else []
        commands.append(own_command_line(click.get_current_context()))
        result = benchmark(ours, builder, prompt=prompt, new_tokens=new_tokens, rounds=rounds, warmup=warmup,
                           threads=threads, onnx_decoder=onnx_decoder, profile_dir=profile_dir, commands=commands,
                           notes=list(notes), log=lambda s: click.echo(s, err=True), quiet_wait_s=quiet_wait_s)
    except SparseInferError as e:
        _fail(e)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1) + "\n")
    t = result["tokens_per_s"]
    click.echo(", ".join(f"{n} {v['median']:.2f} tok/s" for n, v in t.items())
               + f"; ours / builder {result['target']['ratio']:.3f} (target >= {TARGET_RATIO}: "
               + ("met" if result["target"]["met"] else "not met") + f"); wrote {out}")
