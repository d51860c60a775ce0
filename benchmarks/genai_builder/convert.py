"""``convert``: a checkpoint as the Hugging Face Llama folder the model builder reads."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sparseinfer.model_export.loaders.config import TOKEN_ID_FIELDS, hf_config
from sparseinfer.model_export.loaders.names import hf_tensors
from sparseinfer.reference.errors import SparseInferError


def builder_config(ck) -> dict:
    """The ``config.json`` of a loaded checkpoint for the builder: ``loaders.config.hf_config``
    (LlamaForCausalLM, float32) and the fields the builder's Llama reads besides."""
    s = ck.shape
    if s.hidden_act != "silu":
        raise SparseInferError(f"{ck.source}: activation {s.hidden_act}; the builder's Llama is SiLU only")
    return {**hf_config(s, "fp32", ck.bos_token_id, ck.eos_token_id), "head_dim": s.head_dim, "rope_scaling": None,
            "attention_bias": False, "mlp_bias": False}


def write_hf_folder(checkpoint, out) -> Path:
    """``checkpoint`` (a path, or a loaded ``Checkpoint``) as a Hugging Face Llama folder."""
    from safetensors.numpy import save_file

    from sparseinfer.model_export.loaders import load_checkpoint

    ck = load_checkpoint(checkpoint) if not hasattr(checkpoint, "weights") else checkpoint
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(builder_config(ck), indent=2) + "\n")
    save_file(hf_tensors(ck.weights, np.float32), str(out / "model.safetensors"), metadata={"format": "pt"})
    ids = {k: getattr(ck, k) for k in TOKEN_ID_FIELDS if getattr(ck, k) is not None}
    (out / "generation_config.json").write_text(json.dumps(ids) + "\n")
    if ck.tokenizer is not None:
        ck.tokenizer.save(str(out / "tokenizer.json"))
        names = {f"{k[:3]}_token": ck.tokenizer.id_to_token(v) for k, v in ids.items()}
        template = getattr(ck.tokenizer, "chat_template", None)
        (out / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
             "model_max_length": ck.shape.max_position_embeddings, **names,
             **({"chat_template": template} if template else {})}, indent=2) + "\n")
    return out
