"""What a loader returns (``Checkpoint``, or ``OpenCheckpoint`` for a checkpoint read one
tensor at a time) and how it builds the model from named tensors (``assemble``), whatever the
file format it read them from."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from sparseinfer.reference.dtypes import WEIGHT_DTYPES
from sparseinfer.reference.errors import SparseInferError
from sparseinfer.reference.llama import LayerWeights, LlamaWeights
from sparseinfer.reference.shapes import ModelShape

from .names import (EMBEDDING, FINAL_NORM, LAYER_TENSORS, LM_HEAD, MLP_FIELDS, expected_shapes, layer_tensor,
                    named_tensors)
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


def fetch_tensor(get, name: str, expected: tuple[int, ...], source: str, keep_dtype: bool = False,
                 finite: bool = True) -> np.ndarray:
    """``get(name)``, checked (``check_tensor``; ``finite=False`` leaves the values to the caller,
    a quantizer that names the block), as float32 or, with ``keep_dtype``, its stored float type."""
    a = get(name)
    if a is None:
        raise SparseInferError(f"{source}: tensor {name} is missing")
    check_tensor(name, a, expected, source, finite=finite)
    if keep_dtype and a.dtype in WEIGHT_DTYPES:
        return np.ascontiguousarray(a)
    return np.ascontiguousarray(a, dtype=np.float32)


@dataclass
class OpenCheckpoint:
    """A checkpoint whose config, special tokens and tokenizer are read and checked, and whose
    tensors are read when asked: ``get(hf_name)`` gives a stored tensor in its Hugging Face layout
    (None if absent; unchecked: ``fetch_tensor`` checks it), so an export can hold one tensor
    at a time. A GGUF's ``gguf_tensor(hf_name)`` gives the file's own tensor (its blocks, Q and K
    rows in llama.cpp's order: ``gguf_file.rope_heads``)."""

    shape: ModelShape
    tokenizer: object
    source: str
    get: Callable[[str], np.ndarray | None]
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    gguf_tensor: Callable[[str], object] | None = None
    stored_dtypes: set = field(default_factory=set)     # the types read so far (a folder) or stored (a GGUF)

    @classmethod
    def of(cls, ck: "Checkpoint") -> "OpenCheckpoint":
        """A loaded checkpoint seen through the same interface (its arrays, already checked)."""
        return cls(ck.shape, ck.tokenizer, ck.source, named_tensors(ck.weights).get, ck.bos_token_id,
                   ck.eos_token_id, stored_dtypes=set(ck.stored_dtype.split("/")))


def assemble(shape: ModelShape, get, source: str) -> LlamaWeights:
    """Build LlamaWeights from ``get(hf_name) -> ndarray or None`` with shape checks.

    Attention, norms and embeddings become float32; MLP weights keep fp16/bf16/fp32.
    """
    def fetch(name, expected, keep_dtype=False):
        return fetch_tensor(get, name, expected, source, keep_dtype)

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


def load_whole(opened) -> Checkpoint:
    """Every tensor of a checkpoint read and checked: ``opened`` is a loader's context manager
    that gives an ``OpenCheckpoint`` (``open_hf_checkpoint(path)``, ``open_gguf_checkpoint(path)``)."""
    with opened as ck:
        weights = assemble(ck.shape, ck.get, ck.source)
    return Checkpoint(weights=weights, tokenizer=ck.tokenizer, source=ck.source,
                      stored_dtype="/".join(sorted(ck.stored_dtypes)), bos_token_id=ck.bos_token_id,
                      eos_token_id=ck.eos_token_id)
