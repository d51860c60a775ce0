"""What block quantization does to a model's next-token distributions, and what the sparse MLP
does on top of it (``sparseinfer quant-quality``).

A checkpoint is exported three times, each made once and cached as ``sparseinfer eval``'s rows
are (``exports.ensure_export``): dense in float32, dense in the block format, and sparse in the
block format. Each decodes the same fixed text teacher-forced: the first token is the prefill,
every later token one one-token decode step (so the sparse export skips rows as it does when
generating), and the logits at each position predict the text's next token. Per pair
(reference, test), over those positions (``methods.quality``): top-1 agreement (the share of
positions whose argmax is the same), the mean KL(p_reference || p_test) in nats and the largest
|Δlogit|. The pairs, reported apart:

* dense-quantized vs fp32: what the format costs. A GGUF's float32 reference is the file's own
  weights dequantized (what ``load_checkpoint`` reads); its quantized exports keep the file's
  Q8_0 / Q4_0 / Q4_1 blocks whatever the format asked for, and convert the rest (each
  conversion is a note);
* sparse-quantized vs dense-quantized: what the sparse MLP costs in that format;
* sparse-quantized vs fp32: both together.

A model without exact zeros (SiLU, GELU) gets its sparse export with ``approximate``: the rows
the sign predictor calls negative are taken as zero, and the result says so.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from sparseinfer.reference.errors import SparseInferError

DEFAULT_WORK_DIR = "out/quant-quality"
# The fixed text: a paragraph of plain English, short enough for a 512-token context byte by byte.
DEFAULT_TEXT = (
    "The old lighthouse stood at the end of a narrow road that ran along the cliffs. Every evening "
    "the keeper climbed the spiral stairs, cleaned the glass and lit the lamp before the sun went "
    "down. Ships passing in the dark could see its beam from many miles away, and the fishermen in "
    "the village said that no boat had been lost while he was on duty. In winter the wind was so "
    "strong that he tied a rope from the door to the shed, so that he would not be blown over the edge.")
# (name, reference, test): the exports compared, by their keys in ``result["exports"]``
PAIRS = (("dense_quantized_vs_fp32", "fp32", "dense"),
         ("sparse_quantized_vs_dense_quantized", "dense", "sparse"),
         ("sparse_quantized_vs_fp32", "fp32", "sparse"))


def read_text(path) -> str:
    """A --text file: UTF-8 with some text in it, or a one-line error naming the file."""
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise SparseInferError(f"{p}: not UTF-8 text (byte {e.start})") from None
    if not text.strip():
        raise SparseInferError(f"{p}: no text in it")
    return text


def text_ids(tokenizer, bos, text: str, max_tokens: int | None = None, context: int | None = None) -> list[int]:
    """The text's token ids as a prompt is encoded (``export_folder.prompt_ids``: BOS first where the
    model has one), the first ``max_tokens`` of them; at least two (one position to score) and no
    more than ``context``."""
    from sparseinfer.model_export.export_folder import prompt_ids

    ids = prompt_ids(tokenizer, bos, text)[:max_tokens]
    if len(ids) < 2:
        raise SparseInferError(f"the text is {len(ids)} token{'s' if len(ids) != 1 else ''} long; at least 2 are "
                               f"needed (the first is the prefill, each later one is predicted)")
    if context is not None and len(ids) > context:
        raise SparseInferError(f"the text is {len(ids):,} tokens long, more than the model's context of "
                               f"{context:,}; pass --max-tokens {context} or a shorter --text")
    return ids


def teacher_forced_logits(decoder, ids) -> np.ndarray:
    """Logits [len(ids) - 1, vocab], row i predicting ids[i + 1]: ids[0] is the prefill, each later
    id one decode step of one token. The decoder's row counters restart after the prefill, so
    ``decoder.row_counts()`` afterwards counts the decode steps only."""
    decoder.reset()
    logits, _ = decoder.step([ids[0]])
    out = [logits[-1]]
    decoder.row_counts(reset=True)
    for token in ids[1:-1]:
        logits, _ = decoder.step([token])
        out.append(logits[-1])
    return np.stack(out)


def pair_quality(reference: np.ndarray, test: np.ndarray) -> dict:
    """``methods.quality.quality`` of two [positions, vocab] logits, with the positions counted."""
    from sparseinfer.methods.quality import quality

    return {"positions": int(reference.shape[0]), **quality(reference, test)}


def quantization_quality(checkpoint, quantize, text: str | None = None, *, text_source: str | None = None,
                         alpha: str = "1.00", work_dir=DEFAULT_WORK_DIR, threads: int | None = None,
                         max_tokens: int | None = None, log=None, note=None) -> dict:
    """The three exports of ``checkpoint`` (fp32 dense, ``quantize`` dense, ``quantize`` sparse at
    ``alpha``) decoding ``text`` (default ``DEFAULT_TEXT``; ``text_source`` names where it came
    from) teacher-forced on the CPU, and each of ``PAIRS`` compared. Exports are cached under
    ``work_dir``; ``log(line)`` hears what is exported and decoded, ``note(line)`` what a
    quantized export converted (also in the result's ``notes``)."""
    from sparseinfer.model_export.decode import OnnxDecoder
    from sparseinfer.model_export.loaders import open_checkpoint
    from sparseinfer.model_export.machine import machine_description
    from sparseinfer.model_export.quant_weights import check_quantizable
    from sparseinfer.reference.activations import Activation

    from .exports import Row, check_quantize_name, ensure_export, export_root, is_checkpoint, parse_alpha

    fmt = check_quantize_name(quantize)
    if fmt is None:
        raise SparseInferError("a block format is needed: q8_0, q4_0 or q4_1")
    if not Path(checkpoint).exists():
        raise SparseInferError(f"no such checkpoint: {checkpoint}")
    if not is_checkpoint(checkpoint):
        raise SparseInferError(f"{checkpoint}: not a checkpoint (a Hugging Face folder with config.json, or a .gguf)")
    with open_checkpoint(checkpoint) as ck:           # config and tokenizer; the exports read the weights
        shape, tokenizer, bos, source = ck.shape, ck.tokenizer, ck.bos_token_id, ck.source
    check_quantizable(shape, source)                  # before any export
    if tokenizer is None:
        raise SparseInferError(f"{checkpoint}: no tokenizer.json; the text cannot be encoded")
    text = DEFAULT_TEXT if text is None else text
    ids = text_ids(tokenizer, bos, text, max_tokens, shape.max_position_embeddings)
    approximate = not Activation.parse(shape.hidden_act).sparse_capable
    alpha = parse_alpha(alpha, shape.num_layers)
    rows = {"fp32": Row("dense"), "dense": Row("dense", quantize=fmt),
            "sparse": Row("sparse", alpha=alpha, quantize=fmt)}
    labels = {"fp32": "dense fp32", "dense": f"dense {fmt}", "sparse": f"sparse {fmt} (α {alpha})"}
    root = export_root(Path(work_dir) / "exports", checkpoint)
    notes: list[str] = []

    def told(line):
        if line not in notes:
            notes.append(line)
            if note:
                note(line)
    logits, exports, sparse_rows = {}, {}, None
    for name, row in rows.items():
        path = ensure_export(checkpoint, row, root, "cpu", log=log, approximate=approximate and row.kind == "sparse",
                             note=told)
        exports[name] = {"label": labels[name], "export": str(path)}
        decoder = OnnxDecoder(path, "cpu", threads)
        if log:
            log(f"decoding {labels[name]}: {len(ids)} tokens teacher-forced ({decoder.mlp_kernels} MLP kernels)")
        logits[name] = teacher_forced_logits(decoder, ids)
        if row.kind == "sparse":
            sparse_rows = decoder.row_counts()
        del decoder
    pairs = {name: {"reference": exports[ref]["label"], "test": exports[test]["label"],
                    **pair_quality(logits[ref], logits[test])} for name, ref, test in PAIRS}
    return {"checkpoint": str(checkpoint), "quantize": fmt, "alpha": alpha,
            "model": {"name": shape.name, "layers": shape.num_layers, "d": shape.d, "k": shape.k,
                      "activation": shape.hidden_act},
            "approximate": approximate,
            "text": {"source": text_source or "built-in paragraph", "tokens": len(ids),
                     "sha256": hashlib.sha256(text.encode()).hexdigest()},
            "positions": len(ids) - 1, "exports": exports, "pairs": pairs, "sparse_rows": sparse_rows,
            "notes": notes, "machine": machine_description("cpu")}


def table(result: dict) -> tuple[list[str], list[list[str]]]:
    """One row per pair: positions, top-1 agreement, mean KL (nats), max |Δlogit|."""
    headers = ["test vs reference", "positions", "top-1 agreement", "mean KL (nats)", "max |Δlogit|"]
    return headers, [[f"{p['test']} vs {p['reference']}", str(p["positions"]), f"{p['top1_agreement']:.4f}",
                      f"{p['mean_kl']:.3g}", f"{p['max_abs_logit_delta']:.3g}"] for p in result["pairs"].values()]


def summary_lines(result: dict) -> list[str]:
    """What the table was measured on, in sentences."""
    text = result["text"]
    out = [f"{result['checkpoint']} ({result['model']['name']}, {result['model']['layers']} layers), "
           f"{text['source']}: {text['tokens']} tokens teacher-forced (the first the prefill, each later one a "
           f"one-token decode step), {result['positions']} positions scored; KL(p_reference || p_test)"]
    if result["approximate"]:
        out.append(f"sparse {result['quantize']} export approximate: {result['model']['activation']} has no exact "
                   f"zeros, so the rows the sign predictor calls negative are taken as zero (alpha {result['alpha']})")
    rows = result.get("sparse_rows")
    if rows and rows.get("decode_steps_counted"):
        out.append(f"sparse {result['quantize']} decode steps: rows predicted zero {rows['predicted_sparsity']:.3f}, "
                   f"up/down rows computed {rows['rows_computed']:.3f}")
    return out
