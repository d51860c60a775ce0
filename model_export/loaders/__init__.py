"""Load Llama / ProSparse checkpoints into ``reference.llama.LlamaWeights``.

``load_checkpoint(path)`` accepts

* a Hugging Face directory (``hf_folder``): ``config.json`` + ``model.safetensors`` or shards
  listed in ``model.safetensors.index.json``; architectures ``LlamaForCausalLM`` and
  ProSparse's ``SparseLlamaForCausalLM`` (model_type ``sparsellama``, ``hidden_act: fatrelu``
  with ``hidden_act_param``); MHA or GQA; tied or untied embeddings; bf16 / fp16 / fp32;
  ``tokenizer.json`` when present;
* a ``.gguf`` file (``gguf_file``).

Both return a ``Checkpoint`` (``weights``); ``open_checkpoint(path)`` gives an
``OpenCheckpoint`` instead, whose tensors are read one at a time (quantized exports). What
they share sits below them, each in one module: the tensor names (``names``), the config's
checks, special tokens and writer (``config``), the per-tensor checks (``tensors``) and the
assembly of the model (``weights``). Every problem is a one-line ``SparseInferError``:
missing file, unsupported architecture, a tensor missing or shaped differently from what the
config implies.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

from .gguf_file import load_gguf_checkpoint, open_gguf_checkpoint
from .hf_folder import load_hf_checkpoint, open_hf_checkpoint
from .weights import Checkpoint, OpenCheckpoint


def load_checkpoint(path) -> Checkpoint:
    """A Hugging Face checkpoint directory or a ``.gguf`` file."""
    p = Path(path)
    if p.suffix.lower() == ".gguf":
        return load_gguf_checkpoint(p)
    return load_hf_checkpoint(p)


@contextlib.contextmanager
def open_checkpoint(path):
    """A Hugging Face checkpoint directory or a ``.gguf`` file as an ``OpenCheckpoint``: checked
    as ``load_checkpoint`` checks it, its tensors read one at a time while it is open."""
    p = Path(path)
    with (open_gguf_checkpoint(p) if p.suffix.lower() == ".gguf" else open_hf_checkpoint(p)) as ck:
        yield ck


__all__ = ["Checkpoint", "OpenCheckpoint", "load_checkpoint", "open_checkpoint"]
