"""An export folder: the model and the files beside it that hosts read.

``export_checkpoint`` writes ``model.onnx`` (and its ``.data``), ``genai_config.json``,
the tokenizer's files (``tokenizer.json``, ``generation_config.json``, and
``tokenizer_config.json``, what onnxruntime-genai's tokenizer reads) and, for sparse
exports, a copy of the op library that ``genai_config.json`` names. ``tokenizer_for`` and
``prompt_ids`` read them back. The command line (``tools/``) and the evaluation backend
(``evaluation/``) both build on these.
"""
from __future__ import annotations

from pathlib import Path

from sparseinfer.reference.errors import SparseInferError
from sparseinfer.reference.files import replacing, write_json

from .checkpoint import first_id


def genai_ops_library():
    """The op library genai_config.json names for a sparse export: the CUDA flavour (both
    kernels) where it builds, else the CPU one, else none (genai then runs the function bodies)."""
    from . import op_library

    for build in (op_library.cuda_library, op_library.cpu_library):
        try:
            return build()
        except SparseInferError:
            continue
    return None


def export_checkpoint(checkpoint, out, sparse=True, alpha="1.00", target="cpu", debug=False, portable=False,
                      progress=None, dtype="float32", approximate=False) -> Path:
    """Load (a path) or take (a loaded checkpoint), export, and write the folder's other files
    beside the model. ``progress``: called once per layer exported. Returns the model's path."""
    from .checkpoint import load_checkpoint
    from .export import ExportOptions, export_onnx

    ck = load_checkpoint(checkpoint) if not hasattr(checkpoint, "weights") else checkpoint
    opts = ExportOptions(sparse=sparse, alpha=alpha, target=target, debug=debug, portable=portable, dtype=dtype,
                         approximate=approximate)
    path = export_onnx(ck.weights, out, opts, progress=progress,
                       token_ids={"bos_token_id": ck.bos_token_id, "eos_token_id": ck.eos_token_id},
                       ops_library=genai_ops_library() if sparse else None)
    if ck.tokenizer is not None:                   # each written whole (reference.files)
        with replacing(Path(path).with_name("tokenizer.json")) as tmp:
            ck.tokenizer.save(str(tmp))
        ids = {"bos_token_id": ck.bos_token_id, "eos_token_id": ck.eos_token_id}
        write_json(Path(path).with_name("generation_config.json"), ids, indent=None)
        # what onnxruntime-genai's Tokenizer (onnxruntime-extensions) reads besides tokenizer.json
        names = {f"{k}_token": ck.tokenizer.id_to_token(v) for k, v in (("bos", ck.bos_token_id),
                                                                       ("eos", first_id(ck.eos_token_id)))
                 if v is not None}
        write_json(Path(path).with_name("tokenizer_config.json"),
                   {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                    "model_max_length": ck.shape.max_position_embeddings, **names})
    return path


def tokenizer_for(model_path, tokenizer_path=None, vocab_size: int | None = None):
    """(tokenizer, bos id, eos id) of an export: its tokenizer.json (or ``tokenizer_path``) and
    generation_config.json, whose ids must lie inside ``vocab_size`` (the model's; default: the
    tokenizer's), or one line naming the file and field."""
    from .checkpoint import read_generation_config
    from .tokenizer import load_tokenizer_json

    path = Path(tokenizer_path) if tokenizer_path else Path(model_path).with_name("tokenizer.json")
    tok = load_tokenizer_json(path)
    ids = read_generation_config(Path(model_path).with_name("generation_config.json"),
                                 vocab_size or tok.get_vocab_size(with_added_tokens=True))
    return tok, ids["bos_token_id"], ids["eos_token_id"]


def prompt_ids(tok, bos, prompt):
    """Prompt ids. A tokenizer with a post-processor (a GGUF's, built from its add_bos_token /
    add_eos_token; a Hugging Face template) adds BOS / EOS itself; else BOS, if any, goes first."""
    if tok.post_processor is not None:
        return tok.encode(prompt).ids
    ids = tok.encode(prompt, add_special_tokens=False).ids
    return ([bos] if bos is not None else []) + ids
