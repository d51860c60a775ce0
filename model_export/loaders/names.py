"""The Hugging Face tensor names of a Llama checkpoint and the shapes its config implies for them.

The loaders look tensors up under these names; the writers (``synthetic``, the export's
weights, the genai-builder benchmark's converted folder) store them under the same names.
"""
from __future__ import annotations

import numpy as np

from sparseinfer.reference.dtypes import parse_dtype
from sparseinfer.reference.llama import LlamaWeights
from sparseinfer.reference.shapes import ModelShape

EMBEDDING = "model.embed_tokens.weight"        # one row per token of the vocabulary
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"

# Hugging Face tensor names of one decoder layer, by LayerWeights field
LAYER_TENSORS = {
    "input_norm": "input_layernorm.weight",
    "q": "self_attn.q_proj.weight",
    "k": "self_attn.k_proj.weight",
    "v": "self_attn.v_proj.weight",
    "o": "self_attn.o_proj.weight",
    "post_norm": "post_attention_layernorm.weight",
    "gate": "mlp.gate_proj.weight",
    "up": "mlp.up_proj.weight",
    "down": "mlp.down_proj.weight",
}
MLP_FIELDS = ("gate", "up", "down")


def layer_tensor(layer: int, hf: str) -> str:
    """The full name of one of ``LAYER_TENSORS``' names in decoder layer ``layer``."""
    return f"model.layers.{layer}.{hf}"


def named_tensors(weights: LlamaWeights) -> dict[str, np.ndarray]:
    """The model's tensors under their Hugging Face names, as they are (no copy, no cast);
    a tied LM head is the embedding and is not listed twice."""
    out = {EMBEDDING: weights.embed, FINAL_NORM: weights.final_norm}
    if not weights.shape.tie_word_embeddings:
        out[LM_HEAD] = weights.lm_head
    for i, lw in enumerate(weights.layers):
        for field, hf in LAYER_TENSORS.items():
            out[layer_tensor(i, hf)] = getattr(lw, field)
    return out


def hf_tensors(weights: LlamaWeights, dtype) -> dict[str, np.ndarray]:
    """The Hugging Face tensor dict of ``weights`` cast to ``dtype``."""
    dt = parse_dtype(dtype) if isinstance(dtype, str) else np.dtype(dtype)
    return {n: np.ascontiguousarray(a.astype(dt, copy=False)) for n, a in named_tensors(weights).items()}


def tensor_names(shape: ModelShape, layers: int | None = None) -> list[str]:
    """The Hugging Face names of every tensor the config implies, in ``assemble``'s order
    (``layers``: of the first that many decoder layers only)."""
    n = shape.num_layers if layers is None else min(layers, shape.num_layers)
    names = [layer_tensor(i, hf) for i in range(n) for hf in LAYER_TENSORS.values()]
    return [EMBEDDING, *names, FINAL_NORM, *([] if shape.tie_word_embeddings else [LM_HEAD])]


def expected_shapes(shape: ModelShape) -> dict[str, tuple[int, ...]]:
    """Tensor shapes a config implies for one layer (HF layouts), by LayerWeights field."""
    d, k, hd = shape.d, shape.k, shape.head_dim
    return {"input_norm": (d,), "q": (shape.num_heads * hd, d), "k": (shape.num_kv_heads * hd, d),
            "v": (shape.num_kv_heads * hd, d), "o": (d, shape.num_heads * hd), "post_norm": (d,),
            "gate": (k, d), "up": (k, d), "down": (d, k)}
