"""``genai_config.json`` beside an export, so onnxruntime-genai's ``Model(dir)`` and its
Generator decode it with no hand edits (the layout its model builder writes).

The fused form's KV cache is one buffer shared by past and present
(``past_present_share_buffer: true``); the portable form grows it by Concat (``false``).
``head_size`` is the KV tensors' head size (padded to a multiple of 16 in the fused form).
Sparse exports name the op library (``session_options.custom_ops_library``) when one was
built at export time: a copy beside the model (genai loads custom-op libraries only from
the model's folder), so genai runs the native SparseMLP kernel; without it genai runs the
function bodies. The copy is built for the exporting machine (``sparseinfer build-ops`` on
another one, and copy its library over it).
"""
from __future__ import annotations

from pathlib import Path

from sparseinfer.reference.files import copy_whole, write_json

from .loaders.config import first_id

GENAI_CONFIG = "genai_config.json"


def genai_config(meta: dict[str, str], shape, filename: str, token_ids: dict | None = None,
                 ops_library: Path | None = None) -> dict:
    """The config for an export with metadata ``meta`` (``sparseinfer.*``) of model ``shape``;
    ``ops_library``: the custom-op library genai registers for the decoder session."""
    ids = {k: v for k, v in (token_ids or {}).items() if v is not None}
    context = int(meta["sparseinfer.max_length"])
    eos = ids.get("eos_token_id")               # an id, or a list of them (genai stops on any)
    model = {
        "type": "llama",
        "context_length": context,
        "vocab_size": shape.vocab_size,
        **({"bos_token_id": ids["bos_token_id"]} if "bos_token_id" in ids else {}),
        **({"eos_token_id": list(eos) if isinstance(eos, tuple) else eos,
            "pad_token_id": ids.get("pad_token_id", first_id(eos))} if eos is not None else {}),
        "decoder": {
            "session_options": {"log_id": "onnxruntime-genai", "provider_options": [],
                                **({"custom_ops_library": Path(ops_library).name} if ops_library else {})},
            "filename": filename,
            "head_size": int(meta["sparseinfer.head_dim"]),
            "hidden_size": shape.d,
            "num_attention_heads": shape.num_heads,
            "num_hidden_layers": shape.num_layers,
            "num_key_value_heads": shape.num_kv_heads,
            "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                       "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
            "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                        "present_value_names": "present.%d.value"},
        },
    }
    search = {"do_sample": False, "num_beams": 1, "num_return_sequences": 1, "max_length": context, "min_length": 0,
              "temperature": 1.0, "top_k": 1, "top_p": 1.0, "repetition_penalty": 1.0, "length_penalty": 1.0,
              "diversity_penalty": 0.0, "no_repeat_ngram_size": 0, "early_stopping": True,
              "past_present_share_buffer": meta["sparseinfer.kv_cache"] == "shared"}
    return {"model": model, "search": search}


def write_genai_config(model_path, meta: dict[str, str], shape, token_ids: dict | None = None,
                       ops_library: Path | None = None) -> Path:
    path = Path(model_path).with_name(GENAI_CONFIG)
    if ops_library:                    # beside the model, written whole (temporary name, then rename)
        copy_whole(ops_library, path.with_name(Path(ops_library).name))
    config = genai_config(meta, shape, Path(model_path).name, token_ids, ops_library)
    return write_json(path, config)
