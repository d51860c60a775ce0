"""What a loader returns (``Checkpoint``) and how it builds the model from named tensors
(``assemble``), whatever the file format it read them from."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sparseinfer.reference.dtypes import WEIGHT_DTYPES
from sparseinfer.reference.errors import SparseInferError
from sparseinfer.reference.llama import LayerWeights, LlamaWeights
from sparseinfer.reference.shapes import ModelShape

from .names import EMBEDDING, FINAL_NORM, LAYER_TENSORS, LM_HEAD, MLP_FIELDS, expected_shapes, layer_tensor
from .tensors import check_tensor


@dataclass
class Checkpoint:
    """Weights, shape, tokenizer (``tokenizers.Tokenizer`` or None) and where they came from."""

    weights: LlamaWeights
    tokenizer: object
    source: str
    stored_dtype: str
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None      # several: any of them ends a generation

    @property
    def shape(self) -> ModelShape:
        return self.weights.shape


def assemble(shape: ModelShape, get, source: str) -> LlamaWeights:
    """Build LlamaWeights from ``get(hf_name) -> ndarray or None`` with shape checks.

    Attention, norms and embeddings become float32; MLP weights keep fp16/bf16/fp32.
    """
    def fetch(name, expected, keep_dtype=False):
        a = get(name)
        if a is None:
            raise SparseInferError(f"{source}: tensor {name} is missing")
        check_tensor(name, a, expected, source)
        if keep_dtype and a.dtype in WEIGHT_DTYPES:
            return np.ascontiguousarray(a)
        return np.ascontiguousarray(a, dtype=np.float32)

    d, v = shape.d, shape.vocab_size
    exp = expected_shapes(shape)
    embed = fetch(EMBEDDING, (v, d))
    layers = []
    for i in range(shape.num_layers):
        fields = {f: fetch(layer_tensor(i, hf), exp[f], keep_dtype=f in MLP_FIELDS)
                  for f, hf in LAYER_TENSORS.items()}
        layers.append(LayerWeights(**fields))
    final_norm = fetch(FINAL_NORM, (d,))
    if shape.tie_word_embeddings:
        lm_head = embed
    else:
        lm_head = fetch(LM_HEAD, (v, d))
    return LlamaWeights(shape=shape, embed=embed, layers=layers, final_norm=final_norm, lm_head=lm_head)
