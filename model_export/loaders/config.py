"""A checkpoint's Hugging Face config: the checks made on reading it, its special tokens
(``config.json`` and ``generation_config.json``), and the one writer of a ``config.json``.

The model shape comes from ``reference.shapes.from_hf_config`` (one place for shapes); here
the architecture, the activation and the token ids are checked, each problem one line naming
the file and the field.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sparseinfer.reference.activations import Activation, hf_activation_names
from sparseinfer.reference.dtypes import parse_dtype
from sparseinfer.reference.errors import SparseInferError
from sparseinfer.reference.shapes import ModelShape, from_hf_config

from .names import EMBEDDING

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "SparseLlamaForCausalLM")
SUPPORTED_MODEL_TYPES = ("llama", "sparsellama")
SUPPORTED_ACTIVATIONS = hf_activation_names()
TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id")


def check_config(cfg: dict, name: str) -> ModelShape:
    """Architecture, activation, field and head checks; returns the model shape."""
    archs = cfg.get("architectures") or []
    model_type = str(cfg.get("model_type", "")).lower()
    if not (set(archs) & set(SUPPORTED_ARCHITECTURES) or model_type in SUPPORTED_MODEL_TYPES):
        got = ", ".join(archs) or model_type or "none given"
        raise SparseInferError(f"{name}: unsupported architecture {got}; supported: "
                               f"{', '.join(SUPPORTED_ARCHITECTURES)} (model_type {', '.join(SUPPORTED_MODEL_TYPES)})")
    act = str(cfg.get("hidden_act", "silu")).lower()
    if act not in SUPPORTED_ACTIVATIONS:
        raise SparseInferError(f"{name}: unsupported hidden_act {act!r}; supported: {', '.join(SUPPORTED_ACTIVATIONS)}")
    threshold = cfg.get("hidden_act_param", 0.0)
    if act == "fatrelu" and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                             or not abs(threshold) <= float(np.finfo(np.float32).max)):     # compared in float32
        raise SparseInferError(f"{name}: field hidden_act_param (the FATReLU threshold) must be a number within "
                               f"float32's range, got {json.dumps(threshold)}")
    shape = from_hf_config(cfg, name)
    if shape.head_dim % 2:
        raise SparseInferError(f"{name}: head dimension {shape.head_dim} is odd; rotary embeddings need it even")
    return shape


def token_ids(cfg: dict, vocab_size: int, name: str, embedding_rows: int | None) -> dict:
    """The config's bos_token_id and eos_token_id (``check_token_id``), once the stored
    embedding (``embedding_rows``, one row per token; None: not stored) shows that vocab_size
    is right, so that a vocab_size too small is named as such rather than an id beyond it."""
    if embedding_rows is not None and embedding_rows != vocab_size:
        raise SparseInferError(f"{name}: field vocab_size is {vocab_size}, but tensor {EMBEDDING} holds "
                               f"{embedding_rows} rows, one per token")
    return {key: check_token_id(cfg.get(key), key, vocab_size, name) for key in TOKEN_ID_FIELDS}


def check_token_id(value, key: str, vocab_size: int, name: str) -> int | tuple[int, ...] | None:
    """A special token's id: null (none) or a whole number inside the vocabulary. A list of end
    tokens (Llama 3's configs give two) is checked element by element and kept as a tuple: any
    of them ends a generation (``stop_ids``)."""
    ids = value if isinstance(value, list) and key == "eos_token_id" else [value]
    if value is None or ids == []:
        return None
    for v in ids:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < vocab_size:
            raise SparseInferError(f"{name}: field {key} must be a token id in 0-{vocab_size - 1} (the vocabulary) "
                                   f"or null, got {json.dumps(value)}")
    return tuple(ids) if isinstance(value, list) else value


def stop_ids(eos) -> frozenset[int]:
    """The ids that end a generation, from an eos_token_id: none, one id or a tuple of them."""
    if eos is None:
        return frozenset()
    return frozenset(int(t) for t in eos) if isinstance(eos, (tuple, list)) else frozenset([int(eos)])


def first_id(value) -> int | None:
    """One id for where a single one is needed (a pad id, a token name): the first of several."""
    return value[0] if isinstance(value, (tuple, list)) else value


def read_generation_config(path, vocab_size: int) -> dict:
    """bos_token_id and eos_token_id of a generation_config.json (beside a checkpoint or an
    export), each None when absent, checked as a config's are (``check_token_id``); a file that
    is not a JSON object is one line naming it. No file: both None."""
    p = Path(path)
    if not p.is_file():
        return dict.fromkeys(TOKEN_ID_FIELDS)
    try:
        cfg = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise SparseInferError(f"cannot read {p}: {str(e).splitlines()[0]}") from None
    if not isinstance(cfg, dict):
        raise SparseInferError(f"{p}: expected a JSON object, got {type(cfg).__name__}")
    return token_ids(cfg, vocab_size, str(p), None)


def hf_config(shape: ModelShape, dtype: str = "fp32", bos_token_id=None, eos_token_id=None) -> dict:
    """The Hugging Face ``config.json`` of a model of ``shape`` whose weights are stored as
    ``dtype`` (fp32, fp16, bf16), as ``check_config`` reads it back: LlamaForCausalLM, or
    ProSparse's SparseLlamaForCausalLM (model_type sparsellama) with ``hidden_act_param`` for
    FATReLU. The token ids are written where given, several end tokens as a list."""
    act = Activation.parse(shape.hidden_act)
    fatrelu = act.kind == "fatrelu"
    cfg = {
        "architectures": ["SparseLlamaForCausalLM" if fatrelu else "LlamaForCausalLM"],
        "model_type": "sparsellama" if fatrelu else "llama",
        "hidden_act": act.hf_name, "hidden_size": shape.d, "intermediate_size": shape.k,
        "num_hidden_layers": shape.num_layers, "num_attention_heads": shape.num_heads,
        "num_key_value_heads": shape.num_kv_heads, "vocab_size": shape.vocab_size,
        "max_position_embeddings": shape.max_position_embeddings, "rope_theta": float(shape.rope_theta),
        "rms_norm_eps": float(f"{shape.rms_norm_eps:.7g}"),      # 1e-05, not a float32 neighbour's digits
        "tie_word_embeddings": bool(shape.tie_word_embeddings),
    }
    for key, value in zip(TOKEN_ID_FIELDS, (bos_token_id, eos_token_id)):
        if value is not None:
            cfg[key] = [int(v) for v in value] if isinstance(value, (tuple, list)) else int(value)
    cfg["torch_dtype"] = parse_dtype(dtype).name
    if fatrelu:
        cfg["hidden_act_param"] = float(f"{act.threshold:.7g}")   # 0.01, not its float32 neighbour
    return cfg
