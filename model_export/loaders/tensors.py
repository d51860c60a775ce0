"""Checks on a checkpoint's stored tensors, whatever the file format: each one shaped as the
config implies, of a float type and finite; every expected one present; none left over
that the config does not account for. Each problem is one line naming the file and tensor.
"""
from __future__ import annotations

import re

import numpy as np

from sparseinfer.reference.dtypes import BFLOAT16, WEIGHT_DTYPES, dtype_name
from sparseinfer.reference.errors import SparseInferError

from .names import LAYER_TENSORS

_EXPONENT_BITS = {np.dtype(np.float16): 0x7C00, BFLOAT16: 0x7F80}     # all ones: Inf or NaN


def check_tensor(name: str, array: np.ndarray, expected: tuple[int, ...], source: str, finite: bool = True) -> None:
    """The config's shape, a float type (an integer type is data mislabelled in its header, whose
    values would become weights of ~1e9), and every value finite (a NaN or Inf weight would decode
    garbage; ``finite=False``: left to the caller)."""
    if tuple(array.shape) != tuple(expected):
        raise SparseInferError(f"{source}: tensor {name} has shape {tuple(array.shape)}, "
                               f"but the config implies {tuple(expected)}")
    if array.dtype not in WEIGHT_DTYPES:
        raise SparseInferError(f"{source}: tensor {name} is stored as {dtype_name(array.dtype)}; weights must be "
                               f"float32, float16 or bfloat16")
    if not finite:
        return
    bits = _EXPONENT_BITS.get(array.dtype)
    bad = (array.view(np.uint16) & bits) == bits if bits is not None else ~np.isfinite(array)
    if bad.any():
        first = np.unravel_index(int(np.argmax(bad)), array.shape)
        raise SparseInferError(f"{source}: tensor {name} holds {int(bad.sum())} non-finite values (NaN or Inf), "
                               f"the first at {tuple(int(i) for i in first)}")


def _and_more(names: list[str], total: int | None = None) -> str:
    """', and 2 more: b, c' after the first of ``names`` (at most five listed), of ``total`` in
    all (default: as many as listed)."""
    total = len(names) if total is None else total
    if total < 2:
        return ""
    return f", and {total - 1} more: {', '.join(names[1:6])}{', ...' if total > 6 else ''}"


def check_tensors_present(expected: list[str], present, source: str, absent_layers: int = 0) -> None:
    """Every expected tensor name among ``present``, else one line naming the missing ones.
    ``absent_layers``: decoder layers past ``layer_window``'s that ``expected`` leaves out, all
    of whose tensors are missing, counted in the line."""
    missing = [name for name in expected if name not in present]
    if missing:                          # (absent layers leave the window's last layer missing too)
        total = len(missing) + absent_layers * len(LAYER_TENSORS)
        raise SparseInferError(f"{source}: tensor {missing[0]} is missing{_and_more(missing, total)}")


# Buffers some checkpoints store that the config already implies (recomputed from rope_theta).
DERIVED_TENSOR_SUFFIXES = (".rotary_emb.inv_freq",)
# Stored tensors a loader may pass over: an LM head beside tied embeddings (Hugging Face ties
# them and never reads it) and GGUF's rope_freqs (Llama 3.1's rope-scaling factors, which the
# exporter's rotary embedding does not use).
IGNORED_WHEN_TIED = ("lm_head.weight", "output.weight")
IGNORED_TENSORS = ("rope_freqs.weight",)
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|blk)\.([0-9]+)\.")


def layer_window(num_layers: int, present) -> int:
    """How many of the config's decoder layers to list tensor names for: up to one past the
    highest layer index among the stored names (``present``; Hugging Face's layers.N or GGUF's
    blk.N). The layers beyond hold no stored tensor, so their names are all missing and need
    only be counted; a corrupted layer count (2**40) would otherwise build that many names."""
    stored = 1 + max((int(m[1]) for name in present if (m := _LAYER_INDEX.search(name))), default=-1)
    return min(num_layers, stored + 1)


def check_no_extra_tensors(expected: list[str], present, source: str, tied: bool = False) -> None:
    """Every stored tensor in ``present`` is one the config implies (``expected``) or a buffer
    derived from it, else one line naming those it does not account for: weights of more
    layers than the config says would otherwise be dropped silently."""
    known = set(expected) | set(IGNORED_TENSORS) | (set(IGNORED_WHEN_TIED) if tied else set())
    extra = [name for name in present if name not in known and not name.endswith(DERIVED_TENSOR_SUFFIXES)]
    if not extra:
        return
    layers = 1 + max((int(m[1]) for name in expected if (m := _LAYER_INDEX.search(name))), default=-1)
    beyond = [int(m[1]) for name in extra if (m := _LAYER_INDEX.search(name)) and int(m[1]) >= layers]
    why = (f"; the weights hold layer {max(beyond)}, but the config has {layers} layer{'s' if layers != 1 else ''}"
           if beyond else "")
    raise SparseInferError(f"{source}: tensor {extra[0]} is not accounted for by the config{_and_more(extra)}{why}")
