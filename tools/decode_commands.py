"""Commands that decode exports on onnxruntime: generate, compare, quant-quality, bench-decode."""
from __future__ import annotations

import functools

import click

from sparseinfer.benchmarks.genai_builder.rounds import INTERVAL_LEVEL
from sparseinfer.evaluation.quant_quality import DEFAULT_WORK_DIR as QUALITY_WORK_DIR
from sparseinfer.model_export.ort_profile import one_line

from . import options
from .output import echo_err, echo_json, format_table
from .progress import export_checkpoint, progress_bar
from .token_text import TextStream, display_text

INTERVAL = f"{INTERVAL_LEVEL:.0%} interval of the rounds' median"     # bench-decode's wording


@click.command("generate", short_help="Decode text from an ONNX export.")
@click.argument("model", type=click.Path())
@options.PROMPT
@click.option("--tokenizer", "tokenizer_path", type=click.Path(), default=None,
              help="tokenizer.json (default: the one beside MODEL); refused if its vocabulary is too small for the "
                   "model's ids.")
@options.SAMPLING
@options.json_flag("Print machine-readable JSON instead of streaming.")
def generate_cmd(model, prompt, tokenizer_path, max_new_tokens, temperature, top_p, seed, provider, threads,
                 mlp_kernels, as_json):
    """Decode text from an exported MODEL (its folder or its .onnx file), streaming tokens.

    Control characters and bytes that are not UTF-8 (U+FFFD) print escaped (\\x1b,
    \\ufffd); --json holds the text as decoded. Then prints prefill time, decode
    tokens/s and the rows skipped: with native MLP kernels, the fraction of rows predicted
    zero and of up/down rows computed (counted by the kernels); for exports with --debug,
    the measured decode sparsity and the predictor's precision / recall.
    """
    from sparseinfer.benchmarks.decode_bench import kernels_label
    from sparseinfer.model_export.decode import OnnxDecoder
    from sparseinfer.model_export.export_folder import export_model, prompt_ids, tokenizer_for
    from sparseinfer.model_export.generation import generate

    model = export_model(model)
    decoder = OnnxDecoder(model, provider, threads, mlp_kernels)
    # token ids inside the model's vocabulary, or one line naming the file and field
    tok, bos, eos = tokenizer_for(model, tokenizer_path, decoder.vocab_size)
    ids = prompt_ids(tok, bos, prompt)
    text = TextStream(tok, ids)

    def stream(t):                       # the prompt, then each token: stdout stays empty if nothing runs
        if len(text.ids) == len(ids):
            click.echo(display_text(prompt, keep_lines=True), nl=False)
        click.echo(display_text(text.push(t), keep_lines=True), nl=False)
    gen = generate(decoder, ids, max_new_tokens, temperature, top_p, seed, on_token=None if as_json else stream,
                   stop_id=eos)
    stats = {**gen.stats(), "mlp_kernels": kernels_label(decoder)}
    if as_json:
        echo_json({"text": tok.decode(gen.tokens), "tokens": gen.tokens, **stats})
        return
    click.echo(display_text(text.end(), keep_lines=True))
    echo_err(_stats_line(stats))


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
@options.PROMPT
@options.alpha(options.SPARSE_EXPORT_ALPHA_HELP)
@options.TARGET
@options.work_dir("Where the two exports go (default: a temporary directory).")
@options.PORTABLE
@options.QUANTIZE
@options.SAMPLING
@options.JSON
def compare_cmd(checkpoint, prompt, as_json, **settings):
    """Export CHECKPOINT (HF directory or .gguf) dense and sparse, and decode both side by side.

    Takes the checkpoint, not an export (generate decodes an export). Reports the first
    position where the tokens diverge, token agreement (the share of positions where both
    chose the same token), the max |Δlogit| while both saw the same tokens, tokens/s of
    each, and the sparse run's decode sparsity and predictor precision / recall (its
    export carries debug outputs, which adds one full gate product per layer to its time).
    The texts print with control characters and U+FFFD escaped (not in --json).

    --quantize FORMAT exports both in that block format: the quantized dense baseline against
    the quantized sparse model (their quality against float32: quant-quality).
    """
    from sparseinfer.evaluation.side_by_side import compare_dense_sparse

    result, texts = compare_dense_sparse(checkpoint, prompt, export=functools.partial(export_checkpoint, quiet=as_json),
                                         **settings)
    if as_json:
        echo_json(result)
        return
    fmt = f" {result['quantize']}" if result["quantize"] else ""
    for kind, text in texts.items():
        click.echo(f"{kind + fmt:{6 + len(fmt)}s} '{display_text(text)}'")
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


@click.command("quant-quality", short_help="Top-1 agreement and KL of quantized exports vs fp32.")
@click.argument("checkpoint", type=click.Path())
@options.quantize("The block format of the two quantized exports, q8_0, q4_0 or q4_1, as `export --quantize` (a "
                  "GGUF keeps its own Q8_0 / Q4_0 / Q4_1 blocks whatever this says, and converts the rest).",
                  required=True)
@click.option("--text", "text_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="UTF-8 text to decode teacher-forced (default: a built-in paragraph of plain English).")
@click.option("--max-tokens", type=click.IntRange(2), default=None,
              help="Use only the text's first N tokens, >= 2 (default: all of it).")
@options.alpha(options.SPARSE_EXPORT_ALPHA_HELP)
@options.threads()
@options.work_dir("Where the three exports are made once and cached.", default=QUALITY_WORK_DIR)
@options.JSON
def quant_quality_cmd(checkpoint, quantize, text_file, max_tokens, alpha, threads, work_dir, as_json):
    """Quality of CHECKPOINT (HF directory or .gguf) quantized, dense and sparse, on the CPU.

    Exports it dense in float32, dense in the block format and sparse in the block format
    (cached under --work-dir), decodes the same text through each teacher-forced (the first
    token as the prefill, each later one as a one-token decode step, so the sparse MLP skips
    rows) and compares the next-token distributions at every position: top-1 agreement, mean
    KL(p_reference || p_test) in nats and max |Δlogit|, for dense-quantized vs fp32 (what the
    format costs) and sparse-quantized vs dense-quantized (what sparsity costs on top), and
    sparse-quantized vs fp32. A SiLU / GELU model's sparse export is approximate (rows
    predicted negative taken as zero), and the output says so. Example:

    \b
        sparseinfer quant-quality SmolLM2-135M-Instruct.Q4_1.gguf --quantize q4_1 --json
    """
    from sparseinfer.evaluation.quant_quality import quantization_quality, read_text, summary_lines, table

    text = read_text(text_file) if text_file else None
    result = quantization_quality(checkpoint, quantize, text, text_source=text_file, alpha=alpha, work_dir=work_dir,
                                  threads=threads, max_tokens=max_tokens, log=None if as_json else echo_err,
                                  note=lambda line: echo_err(f"note: {line}"))
    if as_json:
        echo_json(result)
        return
    click.echo(format_table(*table(result)))
    for line in summary_lines(result):
        click.echo(line)


@click.command("bench-decode", short_help="Dense vs sparse decode tokens/s on onnxruntime.")
@click.option("--checkpoint", type=click.Path(), default=None,
              help="Checkpoint directory; default: make a synthetic one (--shape, --layers, --target-sparsity).")
@options.shape("prosparse-7b", "Synthetic layer shape when no --checkpoint is given.")
@options.layers(default=4)
@options.target_sparsity()
@options.alpha(options.SPARSE_EXPORT_ALPHA_HELP)
@options.TARGET
@options.provider()
@options.threads()
@options.mlp_kernels(options.MLP_KERNELS_HELP + " With native kernels the sparse export is also timed on its "
                     "function bodies (row 'sparse-function').")
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
@options.PORTABLE
@click.option("--cuda-graph", is_flag=True,
              help="Also time the dense and sparse exports with each decode step replayed as a CUDA graph (rows "
                   "'dense-graph', 'sparse-graph'; --provider cuda, fused exports): the steps' inputs and outputs "
                   "are bound once, with fixed shapes.")
@options.dtype()
@options.QUANTIZE
@options.ACCURACY_LEVEL
@click.option("--with-portable", is_flag=True,
              help="Also time the dense export in the portable form (row 'dense-portable', in the same alternated "
                   "rounds; 'speedup_dense_over_dense_portable' in the JSON).")
@click.option("--peer", type=click.Choice(["genai-int4"]), default=None,
              help="Also time onnxruntime-genai's model builder's int4 model of the same weights (a SiLU twin "
                   "where the builder lacks the activation) against our sparse export, both under genai's "
                   "Generator in alternating rounds ('peer' in the JSON).")
@click.option("--peer-model", type=click.Path(file_okay=False), default=None,
              help="The builder's int4 folder, built before (python -m sparseinfer.benchmarks.genai_builder build "
                   "--precision int4).")
@click.option("--builder-python", type=click.Path(dir_okay=False), default=None,
              help="An interpreter with torch, transformers, onnxruntime-genai and onnx_ir, to build the peer under "
                   "--work-dir when --peer-model is not given.")
@options.work_dir("Where the checkpoint and the exports are written.", default="out/bench-decode")
@click.option("--out", "out_json", type=click.Path(dir_okay=False), default=None,
              help="Write the results as JSON here (e.g. benchmarks/results/cpu-decode.json).")
@options.JSON
def bench_decode_cmd(checkpoint, as_json, **settings):
    """Dense vs sparse decode tokens/s of the same checkpoint, measured in the same run.

    Both exports are written first and flushed to disk, then both are loaded and decode
    the same greedy continuation length after the same prompt: one warm-up each, then
    --repeats rounds that alternate dense and sparse, so that a drift of the machine's
    state hits all alike, the order reversed every other round; for the second half of
    the rounds both are loaded anew in the reverse order (a session created second ran
    faster by itself). Reported: the median tokens/s of each and the median of the
    per-round sparse/dense ratios (the speed-up), with a 90% bootstrap interval of that
    median (rounds resampled within each creation order: how closely the rounds pin it, not
    where another run's would fall).

    The JSON's machine.huge_pages records the kernel's transparent-huge-page mode and
    GLIBC_TUNABLES' glibc.malloc.hugetlb. Where huge pages come only on request (madvise)
    and malloc is not told to ask, onnxruntime's packed MatMulNBits weights sit on 4 KiB
    pages, and there the second session's advantage shows: a note after the results says so.
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 in the environment puts every model's on 2 MiB
    pages, and both orders then decode alike (README, "Huge pages").

    --quantize FORMAT times sparse against dense in that block format (both exports
    quantized, the dense one with MatMulNBits where it holds the format).
    """
    from sparseinfer.benchmarks.decode_bench import bench_decode, timed_rows
    from sparseinfer.model_export.machine import huge_page_note

    result = bench_decode(checkpoint, export=functools.partial(export_checkpoint, quiet=as_json), bar=progress_bar,
                          **settings)
    if as_json:
        echo_json(result)
        return
    rows = timed_rows(result)
    click.echo(format_table(["model", "MLP kernels", "tokens/s (median)", "runs",
                             f"prefill ms ({result['prompt_tokens']} tokens)"], [
        [k, v["mlp_kernels"], f"{v['tokens_per_s_median']:.2f}", " ".join(f"{x:.2f}" for x in v["tokens_per_s_runs"]),
         f"{v['prefill_ms_median']:.1f}"] for k, v in rows.items()]))
    if "speedup_function_bodies" in result:
        click.echo(f"sparse (function bodies) / dense: {result['speedup_function_bodies']:.2f}x")
    if "speedup_dense_over_dense_portable" in result:
        click.echo(f"dense (fused) / dense (portable): {result['speedup_dense_over_dense_portable']:.2f}x")
    for kind, summary in result.get("profile", {}).items():
        if kind != "decode_tokens":
            click.echo(f"profile {kind}: {one_line(summary)}")
    where = ", ".join(result["machine"].get("gpu") or []) or result["machine"]["cpu"]
    weights = f", weights in {result['quantize']}" if result.get("quantize") else ""
    if "peer" in result:
        peer = result["peer"]
        low, high = peer["speedup_median_per_round_interval"]
        click.echo(f"sparse / {peer['name']}: {peer['speedup']:.2f}x ({peer['ours_tokens_per_s_median']:.2f} vs "
                   f"{peer['tokens_per_s_median']:.2f} tokens/s under onnxruntime-genai's Generator; per round: "
                   f"median {peer['speedup_median_per_round']:.2f}, {INTERVAL}: {low:.2f}-{high:.2f})")
    low, high = result["speedup_interval"]
    click.echo(f"sparse / dense: {result['speedup']:.2f}x{weights} ({result['shape']['name']}, "
               f"{result['shape']['num_layers']} layers, {result['provider']} provider, {where}, "
               f"{result['machine']['date']}); {INTERVAL}: {low:.2f}-{high:.2f}")
    note = huge_page_note(result["machine"]["huge_pages"]) if result["provider"] == "cpu" else None
    if note:
        echo_err(f"note: {note}")


COMMANDS = (generate_cmd, compare_cmd, quant_quality_cmd, bench_decode_cmd)
