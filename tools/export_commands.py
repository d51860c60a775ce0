"""Commands over checkpoints and ONNX exports: make-checkpoint, export, generate, compare,
bench-decode."""
from __future__ import annotations

import os
from pathlib import Path

import click
import numpy as np

from sparseinfer.model_export.decode import MLP_KERNELS, MLP_KERNELS_HELP
from sparseinfer.model_export.ort_profile import one_line
from sparseinfer.model_export.synthetic import MAX_LAYERS, SYNTHETIC_SHAPES
from sparseinfer.reference.alpha import MAX_ALPHA_MILLI
from sparseinfer.reference.dtypes import WEIGHT_DTYPE_NAMES
from sparseinfer.reference.files import check_replaceable, make_folder, write_json

from sparseinfer.benchmarks.machine import machine_description
from sparseinfer.model_export.export_folder import export_model as _export_model
from sparseinfer.model_export.export_folder import prompt_ids as _prompt_ids
from sparseinfer.model_export.export_folder import tokenizer_for as _tokenizer_for

from .output import FiniteFloat, echo_err, echo_json, format_table
from .token_text import TextStream, display_text


@click.command("make-checkpoint", short_help="Write a synthetic ProSparse-like checkpoint.")
@click.option("--shape", "shape_name", type=click.Choice(list(SYNTHETIC_SHAPES)), default="tiny", show_default=True,
              help="Layer shape: tiny (test shape) or the ProSparse-Llama2 7B / 13B layer shapes.")
@click.option("--layers", type=click.IntRange(1, MAX_LAYERS), default=None,
              help=f"Number of layers, 1..{MAX_LAYERS} (default: the shape's own).")
@click.option("--target-sparsity", type=float, default=0.9, show_default=True,
              help="Fraction of MLP rows whose FATReLU output is zero at decode time.")
@click.option("--dtype", type=click.Choice(list(WEIGHT_DTYPE_NAMES)), default="fp32", show_default=True,
              help="Stored weight type.")
@click.option("--kv-heads", type=click.IntRange(1), default=None,
              help="Key/value heads (GQA), >= 1 and dividing the attention heads; default: the shape's own.")
@click.option("--hidden-act", default=None,
              help="relu, fatrelu:T, silu, gelu or gelu_tanh (default: the shape's FATReLU).")
@click.option("--tie-embeddings", is_flag=True, help="Share the embedding with the LM head.")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True,
              help="Random seed (any integer >= 0).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def make_checkpoint_cmd(shape_name, layers, target_sparsity, dtype, kv_heads, hidden_act, tie_embeddings, seed,
                        out_dir, as_json):
    """Write a synthetic ProSparse-like checkpoint (Hugging Face format).

    config.json, model.safetensors and a byte-level tokenizer.json; random weights whose
    gate pre-activations are mostly negative, calibrated so that the decode-time MLP
    sparsity is --target-sparsity (see model_export/synthetic.py).
    """
    from sparseinfer.model_export.synthetic import make_checkpoint

    path = make_checkpoint(shape_name, out_dir, layers=layers, target_sparsity=target_sparsity, seed=seed,
                           dtype=dtype, kv_heads=kv_heads, hidden_act=hidden_act, tie_embeddings=tie_embeddings)
    info = {"path": str(path), "shape": shape_name, "layers": layers, "dtype": dtype,
            "target_sparsity": target_sparsity, "seed": seed}
    if as_json:
        echo_json(info)
    else:
        click.echo(f"wrote {path} ({shape_name}, {dtype}, target sparsity {target_sparsity})")


ALPHA_HELP = ("α schedule, e.g. 1.00 or '1.03@0-19,1.00' (paper eq. 2; > 1 skips fewer rows); each α in "
              f"0.001..{MAX_ALPHA_MILLI // 1000:,}, with at most 3 decimals.")
TARGET_HELP = ("Predictor formulation. cpu: W_gate sign bits packed in uint64 words, XOR + arithmetic "
               "popcount (k*d/8 bytes per layer, d rounded up to a multiple of 1024; 1/32 of fp32 W_gate). cuda: ±1 int8 signs and "
               "MatMulInteger, since the CUDA EP has no bitwise ops (k*d bytes per layer, 8x the packed words).")


def _progress():
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)                 # stdout holds only the result
    # off where stderr is not a terminal: rich would end it there with an empty line
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    transient=True, console=console, disable=not console.is_interactive)


def export_checkpoint(checkpoint, out, sparse=True, alpha="1.00", target="cpu", debug=False, quiet=False,
                      portable=False, dtype="float32", approximate=False):
    """model_export.export_folder.export_checkpoint with a progress bar and a line on stderr."""
    from sparseinfer.model_export.checkpoint import load_checkpoint
    from sparseinfer.model_export.export_folder import export_checkpoint as export

    check_replaceable(out, "model")                # before loading: a device or FIFO is refused at once
    ck = load_checkpoint(checkpoint) if not hasattr(checkpoint, "weights") else checkpoint
    with _progress() as bar:
        task = bar.add_task(f"export {'sparse' if sparse else 'dense'}", total=ck.shape.num_layers)
        path = export(ck, out, sparse, alpha, target, debug, portable, progress=lambda: bar.advance(task),
                      dtype=dtype, approximate=approximate)
    if not quiet:
        echo_err(f"wrote {path} ({'sparse, target ' + target + ', alpha ' + alpha if sparse else 'dense'}"
                 f"{', portable' if portable else ', fused attention'}{', debug outputs' if debug else ''}, {dtype})")
    return path


DTYPE_HELP = ("Weights and activations: float32, or float16 (fused form only; half the bytes; the SparseMLP op "
              "widens its fp16 weights exactly and accumulates in float32; a weight beyond float16's range is an "
              "error; onnxruntime's CPU provider runs fp16 MatMuls slowly, fp16 is for GPUs).")
PORTABLE_HELP = ("Standard ONNX ops only (attention, rotary and RMSNorm composed, KV cache grown by Concat), for "
                 "runtimes without onnxruntime's com.microsoft contrib ops. Default: GroupQueryAttention and "
                 "(Skip)SimplifiedLayerNormalization with one in-place KV buffer (onnxruntime-genai's form).")


@click.command("export", short_help="Export a checkpoint to one ONNX model.")
@click.argument("checkpoint", type=click.Path(exists=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output .onnx path.")
@click.option("--alpha", default="1.00", show_default=True, help=ALPHA_HELP)
@click.option("--dense", is_flag=True, help="Dense baseline: no predictor, every MLP row computed.")
@click.option("--target", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True, help=TARGET_HELP)
@click.option("--debug", is_flag=True, help="Add per-layer debug outputs (MLP input, predicted and actual "
                                           "zero masks, computed rows); costs one full gate product per layer.")
@click.option("--portable", is_flag=True, help=PORTABLE_HELP)
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
              help=DTYPE_HELP)
@click.option("--approximate", is_flag=True,
              help="Sparse export of a model without exact zeros (SiLU): the rows the sign predictor calls "
                   "negative are taken as zero, an approximation (measure its quality: compare-methods, eval).")
@click.option("--json", "as_json", is_flag=True,
              help="Print the model's path and form as JSON on stdout instead of the line on stderr.")
def export_cmd(checkpoint, out, alpha, dense, target, debug, portable, dtype, approximate, as_json):
    """Export CHECKPOINT (HF directory or .gguf) to one ONNX model for prefill + decode.

    Decode steps use the sparse MLP: one SparseMLP node per layer (domain ai.sparseinfer),
    run by the op library where a host registers it, else by its function body of standard
    ops; prefill stays dense. Beside the model: genai_config.json, the tokenizer files and,
    for sparse exports, the op library. The graph passes onnx.checker.check_model(full_check=True).
    """
    path = export_checkpoint(checkpoint, out, sparse=not dense, alpha=alpha, target=target, debug=debug,
                             portable=portable, dtype=dtype, approximate=approximate, quiet=as_json)
    if as_json:
        echo_json({"path": str(path), "checkpoint": str(checkpoint), "sparse": not dense,
                   "alpha": None if dense else alpha, "target": None if dense else target,
                   "approximate": approximate, "portable": portable, "debug": debug, "dtype": dtype})


MAX_THREADS = 1024
THREADS = click.option("--threads", type=click.IntRange(1, MAX_THREADS), default=None,
                       help=f"intra-op threads, 1..{MAX_THREADS} (default: onnxruntime's).")
SAMPLING = [
    click.option("--max-new-tokens", type=click.IntRange(1), default=32, show_default=True,
                 help="Tokens to generate, >= 1 (the prompt and these must fit the model's context)."),
    click.option("--temperature", type=FiniteFloat(0), default=0.0, show_default=True,
                 help="Sampling temperature, a finite number >= 0; 0 = greedy."),
    click.option("--top-p", type=FiniteFloat(0, 1, min_open=True), default=1.0, show_default=True,
                 help="Nucleus sampling mass, in (0, 1]; 1 = the whole distribution."),
    click.option("--seed", type=click.IntRange(0), default=0, show_default=True,
                 help="Sampling seed (any integer >= 0)."),
    click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
                 help="onnxruntime execution provider (cuda keeps the KV cache on the GPU with IOBinding)."),
    THREADS,
    click.option("--mlp-kernels", type=click.Choice(MLP_KERNELS), default="auto", show_default=True,
                 help=MLP_KERNELS_HELP),
]


def _with(options):
    def wrap(f):
        for opt in reversed(options):
            f = opt(f)
        return f
    return wrap


@click.command("generate", short_help="Decode text from an ONNX export.")
@click.argument("model", type=click.Path())
@click.option("--prompt", required=True, help="Prompt text.")
@click.option("--tokenizer", "tokenizer_path", type=click.Path(), default=None,
              help="tokenizer.json (default: the one beside MODEL); refused if its vocabulary is too small for the "
                   "model's ids.")
@_with(SAMPLING)
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of streaming.")
def generate_cmd(model, prompt, tokenizer_path, max_new_tokens, temperature, top_p, seed, provider, threads,
                 mlp_kernels, as_json):
    """Decode text from an exported MODEL (its folder or its .onnx file), streaming tokens.

    Control characters and bytes that are not UTF-8 (U+FFFD) print escaped (\\x1b,
    \\ufffd); --json holds the text as decoded. Then prints prefill time, decode
    tokens/s and the rows skipped: with native MLP kernels, the fraction of rows predicted
    zero and of up/down rows computed (counted by the kernels); for exports with --debug,
    the measured decode sparsity and the predictor's precision / recall.
    """
    from sparseinfer.model_export.decode import OnnxDecoder, generate

    model = _export_model(model)
    decoder = OnnxDecoder(model, provider, threads, mlp_kernels)
    # token ids inside the model's vocabulary, or one line naming the file and field
    tok, bos, eos = _tokenizer_for(model, tokenizer_path, decoder.vocab_size)
    ids = _prompt_ids(tok, bos, prompt)
    text = TextStream(tok, ids)

    def stream(t):                       # the prompt, then each token: stdout stays empty if nothing runs
        if len(text.ids) == len(ids):
            click.echo(display_text(prompt, keep_lines=True), nl=False)
        click.echo(display_text(text.push(t), keep_lines=True), nl=False)
    gen = generate(decoder, ids, max_new_tokens, temperature, top_p, seed, on_token=None if as_json else stream,
                   stop_id=eos)
    stats = {**gen.stats(), "mlp_kernels": _kernels_label(decoder)}
    if as_json:
        echo_json({"text": tok.decode(gen.tokens), "tokens": gen.tokens, **stats})
        return
    click.echo(display_text(text.end(), keep_lines=True))
    echo_err(_stats_line(stats))


def _kernels_label(decoder) -> str:
    """What ran the MLPs: 'dense' for a dense export (no SparseMLP node), else the sparse
    export's native kernels or function bodies."""
    return decoder.mlp_kernels if decoder.sparse else "dense"


def _stats_line(st: dict) -> str:
    line = (f"{st['new_tokens']} tokens, prefill {st['prefill_s'] * 1e3:.1f} ms, "
            f"decode {st['decode_tokens_per_s']:.2f} tokens/s ({st['mlp_kernels']} MLP kernels)")
    if "actual_sparsity" in st:
        line += (f", sparsity actual {st['actual_sparsity']:.3f} predicted {st['predicted_sparsity']:.3f}, "
                 f"predictor precision {st['precision']:.3f} recall {st['recall']:.3f}")
    elif "predicted_sparsity" in st:
        line += (f", rows predicted zero {st['predicted_sparsity']:.3f}, up/down rows computed "
                 f"{st['rows_computed']:.3f} (actual sparsity and precision / recall: export with --debug)")
    return line


@click.command("compare", short_help="Decode a checkpoint dense and sparse side by side.")
@click.argument("checkpoint", type=click.Path())
@click.option("--prompt", required=True, help="Prompt text.")
@click.option("--alpha", default="1.00", show_default=True, help="The sparse export's " + ALPHA_HELP)
@click.option("--target", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True, help=TARGET_HELP)
@click.option("--work-dir", type=click.Path(file_okay=False), default=None,
              help="Where the two exports go (default: a temporary directory).")
@click.option("--portable", is_flag=True, help=PORTABLE_HELP)
@_with(SAMPLING)
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def compare_cmd(checkpoint, prompt, alpha, target, work_dir, portable, max_new_tokens, temperature, top_p, seed,
                provider, threads, mlp_kernels, as_json):
    """Export CHECKPOINT (HF directory or .gguf) dense and sparse, and decode both side by side.

    Takes the checkpoint, not an export (generate decodes an export). Reports the first
    position where the tokens diverge, token agreement (the share of positions where both
    chose the same token), the max |Δlogit| while both saw the same tokens, tokens/s of
    each, and the sparse run's decode sparsity and predictor precision / recall (its
    export carries debug outputs, which adds one full gate product per layer to its time).
    The texts print with control characters and U+FFFD escaped (not in --json).
    """
    import tempfile

    from sparseinfer.model_export.checkpoint import load_checkpoint
    from sparseinfer.model_export.decode import OnnxDecoder, compare_generations, generate

    export = _export_model(checkpoint)
    if export.suffix.lower() == ".onnx" and export.is_file() and not (Path(checkpoint) / "config.json").is_file():
        raise click.ClickException(f"{checkpoint} is an ONNX export; compare takes the checkpoint (HF directory or "
                                   f".gguf) and exports it dense and sparse itself (an export decodes with generate)")
    ck = load_checkpoint(checkpoint)
    if ck.tokenizer is None:
        raise click.ClickException(f"{checkpoint}: no tokenizer.json")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(work_dir or tmp)
        runs = {}
        for kind in ("dense", "sparse"):
            path = export_checkpoint(ck, root / kind / "model.onnx", sparse=kind == "sparse", alpha=alpha,
                                     target=target, debug=kind == "sparse", quiet=as_json, portable=portable)
            decoder = OnnxDecoder(path, provider, threads, mlp_kernels)
            runs[kind] = generate(decoder, _prompt_ids(ck.tokenizer, ck.bos_token_id, prompt), max_new_tokens,
                                  temperature, top_p, seed, keep_logits=True)
    result = compare_generations(runs["dense"], runs["sparse"])
    result["sparse_stats"] = {**runs["sparse"].stats(), "mlp_kernels": decoder.mlp_kernels}
    if as_json:
        echo_json(result)
        return
    for kind, gen in runs.items():
        click.echo(f"{kind:6s} '{display_text(ck.tokenizer.decode(gen.tokens))}'")
    click.echo(_agreement_line(result))
    click.echo(format_table(["metric", "value"], [
        ["first divergence", "none" if result["first_divergence"] is None else result["first_divergence"]],
        ["max |Δlogit| (same inputs)", f"{result['max_abs_logit_diff']:.3g}"],
        ["dense tokens/s", f"{result['dense_tokens_per_s']:.2f}"],
        ["sparse tokens/s (debug export)", f"{result['sparse_tokens_per_s']:.2f}"]]))
    click.echo(_stats_line(result["sparse_stats"]))


def _agreement_line(r: dict) -> str:
    """compare's token agreement as a sentence: what it counts, and where and why the runs part."""
    n, first = r["tokens_compared"], r["first_divergence"]
    line = f"token agreement {r['token_agreement']:.3f}: dense and sparse chose the same token at "
    if first is None:
        return line + f"all {n} positions"
    line += f"{r['tokens_agreeing']} of {n} positions; they part at token {first} (from 0)"
    if r["dense_logit_gap_at_divergence"] is not None:
        line += (f", where the dense logits of the two choices are {r['dense_logit_gap_at_divergence']:.3g} apart "
                 f"(max |Δlogit| up to there {r['max_abs_logit_diff']:.3g})")
    return line + ", and from there each continues its own text, so later positions agree only by chance"


def _profile_decodes(paths, kernels_of, provider, threads, prompt, tokens, work) -> dict:
    """Each model decoded once more, ``tokens`` tokens, in a session with onnxruntime's profiler
    on; the decode steps' profile summarised (ort_profile), the prefill left out."""
    import gc

    from sparseinfer.model_export.decode import OnnxDecoder, generate
    from sparseinfer.model_export.ort_profile import summarize

    out = {"decode_tokens": tokens}
    for kind, path in paths.items():
        decoder = OnnxDecoder(path, provider, mlp_kernels=kernels_of[kind], threads=threads,
                              profile=str(work / "profiles" / kind))
        generate(decoder, prompt, tokens)
        out[kind] = summarize(decoder.end_profiling(), skip_runs=1)
        del decoder
        gc.collect()
    return out


@click.command("bench-decode", short_help="Dense vs sparse decode tokens/s on onnxruntime.")
@click.option("--checkpoint", type=click.Path(), default=None,
              help="Checkpoint directory; default: make a synthetic one (--shape, --layers, --target-sparsity).")
@click.option("--shape", "shape_name", type=click.Choice(list(SYNTHETIC_SHAPES)), default="prosparse-7b",
              show_default=True, help="Synthetic layer shape when no --checkpoint is given.")
@click.option("--layers", type=click.IntRange(1, MAX_LAYERS), default=4, show_default=True)
@click.option("--target-sparsity", type=float, default=0.9, show_default=True)
@click.option("--alpha", default="1.00", show_default=True, help="The sparse export's " + ALPHA_HELP)
@click.option("--target", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True, help=TARGET_HELP)
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@THREADS
@click.option("--mlp-kernels", type=click.Choice(MLP_KERNELS), default="auto", show_default=True,
              help=MLP_KERNELS_HELP + " With native kernels the sparse export is also timed on its function "
                   "bodies (row 'sparse-function').")
@click.option("--tokens", type=click.IntRange(2), default=32, show_default=True,
              help="Tokens generated per run, >= 2 (the first comes from the prefill, the rest are decode steps).")
@click.option("--repeats", type=click.IntRange(1), default=3, show_default=True,
              help="Runs per model, >= 1 (median reported).")
@click.option("--prompt-tokens", type=click.IntRange(1, 1 << 20), default=None,
              help="Prompt length in tokens (the short prompt's ids repeated), to time the prefill too: the dense "
                   "export's MatMuls against the sparse export's op, which runs prefill densely (default: a short "
                   "prompt, 'The quick brown fox').")
@click.option("--profile-tokens", type=click.IntRange(0, 4096), default=0, show_default=True,
              help="After the timed rounds, decode this many tokens per model in a new session with "
                   "onnxruntime's profiler on: time per token by execution provider and the top ops "
                   "(the JSON's 'profile'; traces in the work dir). 0: no profile.")
@click.option("--portable", is_flag=True, help=PORTABLE_HELP)
@click.option("--cuda-graph", is_flag=True,
              help="Also time the dense and sparse exports with each decode step replayed as a CUDA graph (rows "
                   "'dense-graph', 'sparse-graph'; --provider cuda, fused exports): the steps' inputs and outputs "
                   "are bound once, with fixed shapes.")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
              help=DTYPE_HELP)
@click.option("--with-portable", is_flag=True,
              help="Also time the dense export in the portable form (row 'dense-portable', in the same alternated "
                   "rounds; 'speedup_dense_over_dense_portable' in the JSON).")
@click.option("--work-dir", type=click.Path(file_okay=False), default="out/bench-decode", show_default=True,
              help="Where the checkpoint and the exports are written.")
@click.option("--out", "out_json", type=click.Path(dir_okay=False), default=None,
              help="Write the results as JSON here (e.g. benchmarks/results/cpu-decode.json).")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def bench_decode_cmd(checkpoint, shape_name, layers, target_sparsity, alpha, target, provider, threads, mlp_kernels,
                     tokens, repeats, prompt_tokens, profile_tokens, portable, dtype, with_portable, cuda_graph,
                     work_dir, out_json, as_json):
    """Dense vs sparse decode tokens/s of the same checkpoint, measured in the same run.

    Both exports are written first and flushed to disk, then both are loaded and decode
    the same greedy continuation length after the same prompt: one warm-up each, then
    --repeats rounds that alternate dense and sparse, so that a drift of the machine's
    state hits all alike. Reported: the median tokens/s of each and the median of the
    per-round sparse/dense ratios (the speed-up).
    """
    from sparseinfer.model_export.decode import OnnxDecoder, generate
    from sparseinfer.model_export.synthetic import make_checkpoint

    if cuda_graph and (provider != "cuda" or portable):
        raise click.UsageError("--cuda-graph needs --provider cuda and the fused export form (not --portable)")
    work = Path(work_dir)
    if checkpoint is None:
        checkpoint = work / f"synthetic-{shape_name}-{layers}l-s{target_sparsity}"
        if not (checkpoint / "config.json").is_file():
            make_checkpoint(shape_name, checkpoint, layers=layers, target_sparsity=target_sparsity)
    from sparseinfer.model_export.checkpoint import load_checkpoint
    ck = load_checkpoint(checkpoint)
    prompt = _prompt_ids(ck.tokenizer, ck.bos_token_id, "The quick brown fox") if ck.tokenizer else [0, 1, 2, 3]
    if prompt_tokens:
        if prompt_tokens + tokens > ck.shape.max_position_embeddings:
            raise click.BadParameter(f"{prompt_tokens} prompt tokens and {tokens} generated exceed the model's context "
                                     f"of {ck.shape.max_position_embeddings}", param_hint="--prompt-tokens")
        prompt = [prompt[i % len(prompt)] for i in range(prompt_tokens)]
    kinds = ("dense", "sparse")
    form = "-portable" if portable else ""
    form += "" if dtype == "float32" else f"-{dtype}"
    paths = {kind: export_checkpoint(ck, work / f"{kind}-{target}{form}" / "model.onnx", sparse=kind == "sparse",
                                     alpha=alpha, target=target, quiet=as_json, portable=portable, dtype=dtype)
             for kind in kinds}
    if with_portable and not portable:
        paths["dense-portable"] = export_checkpoint(ck, work / f"dense-{target}-portable" / "model.onnx", sparse=False,
                                                    target=target, quiet=as_json, portable=True)
    os.sync()  # no write-back of the fresh exports competes with the timed decodes
    decoders = {kind: OnnxDecoder(paths[kind], provider, threads, mlp_kernels) for kind in paths}
    if decoders["sparse"].mlp_kernels == "native":
        paths["sparse-function"] = paths["sparse"]
        decoders["sparse-function"] = OnnxDecoder(paths["sparse"], provider, threads, "function")
    if cuda_graph:                       # the same exports, decode steps replayed as CUDA graphs
        for kind in kinds:
            paths[f"{kind}-graph"] = paths[kind]
            decoders[f"{kind}-graph"] = OnnxDecoder(paths[kind], provider, threads, mlp_kernels, cuda_graph=True)
    runs, prefills, last = {kind: [] for kind in decoders}, {kind: [] for kind in decoders}, {}
    with _progress() as bar:
        task = bar.add_task(f"decode {'/'.join(decoders)} alternately", total=len(decoders) * (repeats + 1))
        for r in range(repeats + 1):
            for kind, decoder in decoders.items():
                last[kind] = generate(decoder, prompt, tokens)
                if r:  # round 0 is the warm-up
                    runs[kind].append(last[kind].decode_tokens_per_s)
                    prefills[kind].append(last[kind].prefill_s * 1e3)
                bar.advance(task)
    rows = {kind: {"tokens_per_s_median": float(np.median(runs[kind])), "tokens_per_s_runs": runs[kind],
                   "prefill_ms_median": float(np.median(prefills[kind])),
                   "mlp_kernels": _kernels_label(decoders[kind]),
                   "model_bytes": sum(f.stat().st_size for f in paths[kind].parent.glob("model.onnx*")),
                   **({"rows_of_last_run": last[kind].kernel_rows} if last[kind].kernel_rows else {})}
            for kind in decoders}
    ratios = {kind: [s / d for s, d in zip(runs[kind], runs["dense"])] for kind in decoders if kind != "dense"}
    kernels_of = {kind: decoder.mlp_kernels for kind, decoder in decoders.items()}
    decoders.clear()                       # free the timed sessions before the profiled ones
    result = {"benchmark": "decode", "checkpoint": str(checkpoint), "shape": ck.shape.to_dict(), "alpha": alpha,
              "target": target, "dtype": dtype, "provider": provider, "threads": threads, "decode_tokens": tokens,
              "prompt_tokens": len(prompt),
              "repeats": repeats, "portable": portable, **rows,
              "speedup": float(np.median(ratios["sparse"])), "speedup_per_round": ratios["sparse"],
              **({"speedup_function_bodies": float(np.median(ratios["sparse-function"]))}
                 if "sparse-function" in ratios else {}),
              **({"speedup_dense_over_dense_portable": float(np.median([1 / r for r in ratios["dense-portable"]]))}
                 if "dense-portable" in ratios else {}),
              "machine": machine_description(provider), "complete": not profile_tokens}

    def save():
        if out_json:
            make_folder(Path(out_json).parent)
            write_json(out_json, result)

    save()                                 # the timed rounds are kept even if the profiles are cut short
    profiles = _profile_decodes({k: v for k, v in paths.items() if not k.endswith("-graph")}, kernels_of,
                                provider, threads, prompt, profile_tokens, work) \
        if profile_tokens else None
    if profiles:
        result.update(profile=profiles, complete=True)
        save()
    if as_json:
        echo_json(result)
        return
    click.echo(format_table(["model", "MLP kernels", "tokens/s (median)", "runs", f"prefill ms ({len(prompt)} tokens)"], [
        [k, v["mlp_kernels"], f"{v['tokens_per_s_median']:.2f}", " ".join(f"{x:.2f}" for x in v["tokens_per_s_runs"]),
         f"{v['prefill_ms_median']:.1f}"] for k, v in rows.items()]))
    if "speedup_function_bodies" in result:
        click.echo(f"sparse (function bodies) / dense: {result['speedup_function_bodies']:.2f}x")
    if "speedup_dense_over_dense_portable" in result:
        click.echo(f"dense (fused) / dense (portable): {result['speedup_dense_over_dense_portable']:.2f}x")
    for kind, summary in (profiles or {}).items():
        if kind != "decode_tokens":
            click.echo(f"profile {kind}: {one_line(summary)}")
    where = ", ".join(result["machine"].get("gpu") or []) or result["machine"]["cpu"]
    click.echo(f"sparse / dense: {result['speedup']:.2f}x ({ck.shape.name}, {ck.shape.num_layers} layers, "
               f"{provider} provider, {where}, {result['machine']['date']})")


@click.command("build-ops", short_help="Build the native sparse-MLP op library.")
@click.option("--cuda/--no-cuda", default=None,
              help="Build the CUDA-provider library too (default: where nvcc and the CUDA runtime are found; "
                   "--cuda makes their absence an error).")
@click.option("--json", "as_json", is_flag=True, help="Print {cpu, cuda, onnxruntime_api, headers_api, reason}.")
def build_ops_cmd(cuda, as_json):
    """Build the native sparse-MLP op library for onnxruntime and print its path(s).

    One SparseMLP node per layer of a sparse export runs as one native kernel in any
    onnxruntime host that registers the library (SessionOptions.register_custom_ops_library):
    the C++ CPU kernel always, the CUDA kernels (kernels/cuda, on the CUDA provider's stream)
    where nvcc is found. Built once and cached under ~/.cache/sparseinfer/ops
    (SPARSEINFER_OPS_CACHE) by sources, flags and compiler versions; onnxruntime's C API
    headers come from ORT_INCLUDE_DIR, a system install, or Debian's libonnxruntime-dev
    (fetched once). generate, compare and bench-decode build it on first use.
    """
    from sparseinfer.model_export import op_library

    built = op_library.build(cuda)
    if as_json:
        echo_json(built.as_dict())
        return
    click.echo(f"cpu:  {built.cpu}")
    click.echo(f"cuda: {built.cuda or '-'}" + (f"  ({built.reason})" if built.reason else ""))
    click.echo(f"asks onnxruntime for C API {built.onnxruntime_api} (headers: API {built.headers_api})")


COMMANDS = (make_checkpoint_cmd, export_cmd, generate_cmd, compare_cmd, bench_decode_cmd, build_ops_cmd)
