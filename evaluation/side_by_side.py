"""A checkpoint exported dense and sparse and decoded side by side on onnxruntime
(``sparseinfer compare``): where the tokens part, token agreement, the max |Δlogit| while
both saw the same tokens, tokens/s of each, and the sparse run's decode sparsity and
predictor precision / recall (its export carries debug outputs). With ``quantize`` both exports
put every linear layer on that block format (``export --quantize``): the quantized dense
baseline against the quantized sparse model.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from sparseinfer.reference.errors import SparseInferError

KINDS = ("dense", "sparse")


def compare_dense_sparse(checkpoint, prompt, *, alpha, target, work_dir, portable, max_new_tokens, temperature, top_p,
                         seed, provider, threads, mlp_kernels, quantize=None, export=None) -> tuple[dict, dict]:
    """(result, the text each decoded): ``model_export.generation.compare_generations`` of the dense
    and the sparse run, with the sparse run's stats. The exports go under ``work_dir`` (default:
    a temporary folder); ``export``: ``model_export.export_folder.export_checkpoint`` or a
    function that takes the same arguments (one that shows progress); ``quantize``: both
    exports' block format (each reads the checkpoint itself, so a GGUF keeps its blocks)."""
    from sparseinfer.model_export.decode import OnnxDecoder
    from sparseinfer.model_export.export import quantize_conflicts
    from sparseinfer.model_export.export_folder import export_checkpoint, export_model, prompt_ids
    from sparseinfer.model_export.generation import compare_generations, generate
    from sparseinfer.model_export.loaders import load_checkpoint, open_checkpoint

    export = export or export_checkpoint
    model = export_model(checkpoint)
    if model.suffix.lower() == ".onnx" and model.is_file() and not (Path(checkpoint) / "config.json").is_file():
        raise SparseInferError(f"{checkpoint} is an ONNX export; compare takes the checkpoint (HF directory or "
                               f".gguf) and exports it dense and sparse itself (an export decodes with generate)")
    why = quantize_conflicts(quantize, portable, target=target)
    if why:                                     # before the checkpoint is read
        raise SparseInferError(why)
    if quantize:
        with open_checkpoint(checkpoint) as ck:     # the tokenizer; the exports read the weights
            pass
    else:
        ck = load_checkpoint(checkpoint)
    if ck.tokenizer is None:
        raise SparseInferError(f"{checkpoint}: no tokenizer.json")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(work_dir or tmp)
        runs = {}
        for kind in KINDS:
            path = export(checkpoint if quantize else ck, root / kind / "model.onnx", sparse=kind == "sparse",
                          alpha=alpha, target=target, debug=kind == "sparse", portable=portable, quantize=quantize)
            decoder = OnnxDecoder(path, provider, threads, mlp_kernels)
            runs[kind] = generate(decoder, prompt_ids(ck.tokenizer, ck.bos_token_id, prompt), max_new_tokens,
                                  temperature, top_p, seed, keep_logits=True)
    result = compare_generations(runs["dense"], runs["sparse"])
    result["sparse_stats"] = {**runs["sparse"].stats(), "mlp_kernels": decoder.mlp_kernels}
    result["quantize"] = quantize
    return result, {kind: ck.tokenizer.decode(gen.tokens) for kind, gen in runs.items()}
