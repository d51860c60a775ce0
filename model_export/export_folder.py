"""An export folder: the model and the files beside it that hosts read.

``export_checkpoint`` writes ``model.onnx`` (and its ``.data``), ``genai_config.json``,
the tokenizer's files (``tokenizer.json``, ``generation_config.json``, and
``tokenizer_config.json``, what onnxruntime-genai's tokenizer reads) and, for sparse
exports, a copy of the op library that ``genai_config.json`` names. ``export_model``,
``tokenizer_for`` and ``prompt_ids`` read them back. The command line (``tools/``) and the
evaluation backend (``evaluation/``) both build on these.
"""
from __future__ import annotations

from pathlib import Path

from sparseinfer.reference.errors import SparseInferError
from sparseinfer.reference.files import write_json

from .loaders.config import first_id


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
                      progress=None, dtype="float32", approximate=False, quantize=None, accuracy_level=0,
                      note=None) -> Path:
    """Load (a path) or take (a loaded ``Checkpoint``, or an ``OpenCheckpoint``) and export it with
    the folder's other files, all moved into place together. ``progress``: called once per layer
    exported. ``quantize``: a block format (a path is then read one layer at a time, never whole
    in float32), ``accuracy_level`` its MatMulNBits nodes'; ``note(line)``: told what the
    quantization converted. Returns the model's path."""
    from .export import ExportOptions, export_onnx, quantize_conflicts
    from .loaders import OpenCheckpoint, load_checkpoint, open_checkpoint

    opts = ExportOptions(sparse=sparse, alpha=alpha, target=target, debug=debug, portable=portable, dtype=dtype,
                         approximate=approximate, quantize=quantize, accuracy_level=accuracy_level)
    why = quantize_conflicts(quantize, portable, dtype, target, accuracy_level)
    if why:                                    # before the checkpoint is read
        raise SparseInferError(why)
    def export(ck):
        if isinstance(ck, OpenCheckpoint) or not quantize:
            weights = ck if isinstance(ck, OpenCheckpoint) else ck.weights
        else:                                  # a loaded checkpoint, named as itself in what is noted
            weights = OpenCheckpoint.of(ck)
        library = genai_ops_library() if sparse or quantize else None
        return export_onnx(weights, out, opts, progress=progress, token_ids=special_token_ids(ck),
                           ops_library=library, companions=tokenizer_files(ck), note=note)

    if hasattr(checkpoint, "tokenizer"):       # a Checkpoint or an OpenCheckpoint
        return export(checkpoint)
    if quantize:
        with open_checkpoint(checkpoint) as ck:
            return export(ck)
    return export(load_checkpoint(checkpoint))


def special_token_ids(ck) -> dict:
    """The checkpoint's BOS and EOS ids, as genai_config.json and generation_config.json hold them."""
    return {"bos_token_id": ck.bos_token_id, "eos_token_id": ck.eos_token_id}


def tokenizer_files(ck) -> dict:
    """{file name: write(path)} of the tokenizer's files in an export folder (none without a
    tokenizer), staged and moved in with the model (model_export.export.export_onnx)."""
    if ck.tokenizer is None:
        return {}
    # what onnxruntime-genai's Tokenizer (onnxruntime-extensions) reads besides tokenizer.json
    names = {f"{k}_token": ck.tokenizer.id_to_token(v) for k, v in (("bos", ck.bos_token_id),
                                                                   ("eos", first_id(ck.eos_token_id)))
             if v is not None}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "model_max_length": ck.shape.max_position_embeddings, **names}
    return {"tokenizer.json": lambda path: ck.tokenizer.save(str(path)),
            "generation_config.json": lambda path: write_json(path, special_token_ids(ck), indent=None),
            "tokenizer_config.json": lambda path: write_json(path, config)}


def export_model(path) -> Path:
    """The model file of an export given as its folder (what onnxruntime-genai takes) or as the
    .onnx file itself."""
    p = Path(path)
    return p / "model.onnx" if p.is_dir() else p


def tokenizer_for(model_path, tokenizer_path=None, vocab_size: int | None = None):
    """(tokenizer, bos id, eos id) of an export: its tokenizer.json (or ``tokenizer_path``) and
    generation_config.json, whose ids must lie inside ``vocab_size`` (the model's; default: the
    tokenizer's), or one line naming the file and field. A tokenizer too small for the model
    is refused, naming both sizes: one that lacks the BOS / EOS ids, or, where
    generation_config.json names none, one with fewer tokens than the model (a model's
    vocabulary may be padded past its tokenizer's, so a smaller one is not wrong in itself)."""
    from .loaders.config import TOKEN_ID_FIELDS, read_generation_config
    from .tokenizer import load_tokenizer_json

    path = Path(tokenizer_path) if tokenizer_path else Path(model_path).with_name("tokenizer.json")
    tok = load_tokenizer_json(path)
    size = tok.get_vocab_size(with_added_tokens=True)
    model_size = vocab_size or size
    ids = read_generation_config(Path(model_path).with_name("generation_config.json"), model_size)
    special = {}                                   # the model's BOS / EOS ids -> their field
    for key in TOKEN_ID_FIELDS:
        for i in ids[key] if isinstance(ids[key], tuple) else [ids[key]]:
            if i is not None:
                special[i] = key
    missing = max((i for i in special if i >= size), default=None)
    if missing is not None or (not special and model_size > size):
        why = f" (its {special[missing]} {missing} is not among them)" if missing is not None else ""
        raise SparseInferError(f"{path} has {size:,} token{'s' if size != 1 else ''}, too few to encode and "
                               f"decode the ids of the {model_size:,}-token model{why}")
    return tok, ids["bos_token_id"], ids["eos_token_id"]


def prompt_ids(tok, bos, prompt):
    """Prompt ids. A tokenizer with a post-processor (a GGUF's, built from its add_bos_token /
    add_eos_token; a Hugging Face template) adds BOS / EOS itself; else BOS, if any, goes first."""
    if tok.post_processor is not None:
        return tok.encode(prompt).ids
    ids = tok.encode(prompt, add_special_tokens=False).ids
    return ([bos] if bos is not None else []) + ids
