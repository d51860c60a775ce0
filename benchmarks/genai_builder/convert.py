"""``convert``: a checkpoint as the Hugging Face Llama folder the model builder reads, or its
SiLU twin.

The builder's Llama takes SiLU and ReLU (``BUILDER_ACTIVATIONS``; onnxruntime-genai 0.18) but
has no FATReLU (ProSparse's activation, our synthetic checkpoints'), so such a checkpoint is
compared through its SiLU twin (``as_silu``): the same weights, the same shape, ``hidden_act``
silu. For the dense model's speed the activation does not matter:
a dense MLP reads every weight and computes every row whatever the activation is, and the
activation itself is one elementwise op over ``intermediate_size`` values a token, next to
three matrix products of ``hidden_size * intermediate_size`` weights each. The twin's tokens
differ from the original's; only its speed stands in for it.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from sparseinfer.model_export.loaders.config import TOKEN_ID_FIELDS, hf_config
from sparseinfer.model_export.loaders.names import hf_tensors
from sparseinfer.reference.errors import SparseInferError
from sparseinfer.reference.files import commit, staging_folder, write_json


BUILDER_ACTIVATIONS = ("silu", "relu")          # the activations the builder's Llama has


def builder_config(ck) -> dict:
    """The ``config.json`` of a loaded checkpoint for the builder: ``loaders.config.hf_config``
    (LlamaForCausalLM, float32) and the fields the builder's Llama reads besides."""
    s = ck.shape
    if s.hidden_act not in BUILDER_ACTIVATIONS:
        raise SparseInferError(f"{ck.source}: activation {s.hidden_act}; the builder's Llama has "
                               f"{' and '.join(BUILDER_ACTIVATIONS)} only (convert --as-silu writes the "
                               f"checkpoint's SiLU twin)")
    return {**hf_config(s, "fp32", ck.bos_token_id, ck.eos_token_id), "head_dim": s.head_dim, "rope_scaling": None,
            "attention_bias": False, "mlp_bias": False}


def silu_twin(ck):
    """The loaded checkpoint ``ck`` with ``hidden_act`` silu: the same arrays (not copied)."""
    weights = dataclasses.replace(ck.weights, shape=dataclasses.replace(ck.shape, hidden_act="silu"))
    return dataclasses.replace(ck, weights=weights)


# the folder's files, moved into place in this order: config.json, which marks it complete, last
HF_FOLDER_FILES = ("model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                   "config.json")


def write_hf_folder(checkpoint, out, as_silu: bool = False) -> Path:
    """``checkpoint`` (a path, or a loaded ``Checkpoint``) as a Hugging Face Llama folder; with
    ``as_silu``, its SiLU twin (``silu_twin``).

    Written whole: every file goes to a staging folder inside ``out`` and they are moved into
    place together, config.json last (``reference.files.commit``; a tokenizer file the previous
    folder had and this checkpoint has not is removed), so a failed or interrupted write leaves
    a folder that was there as it was, and none that was not."""
    from safetensors.numpy import save_file

    from sparseinfer.model_export.loaders import load_checkpoint
    from sparseinfer.model_export.loaders.config import first_id

    ck = load_checkpoint(checkpoint) if not hasattr(checkpoint, "weights") else checkpoint
    if as_silu:
        ck = silu_twin(ck)
    config = builder_config(ck)                     # an activation the builder lacks is refused before writing
    out = Path(out)
    ids = {k: getattr(ck, k) for k in TOKEN_ID_FIELDS if getattr(ck, k) is not None}
    with staging_folder(out, "hf", target=out) as stage:
        save_file(hf_tensors(ck.weights, np.float32), str(stage / "model.safetensors"), metadata={"format": "pt"})
        write_json(stage / "generation_config.json", ids, indent=None)
        if ck.tokenizer is not None:
            ck.tokenizer.save(str(stage / "tokenizer.json"))
            names = {f"{k[:3]}_token": ck.tokenizer.id_to_token(first_id(v)) for k, v in ids.items()}
            template = getattr(ck.tokenizer, "chat_template", None)
            write_json(stage / "tokenizer_config.json",
                       {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                        "model_max_length": ck.shape.max_position_embeddings, **names,
                        **({"chat_template": template} if template else {})})
        write_json(stage / "config.json", config)
        commit(stage, out, list(HF_FOLDER_FILES))
    return out
