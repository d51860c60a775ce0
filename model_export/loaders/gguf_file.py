"""GGUF (llama.cpp / PowerInfer) Llama checkpoints through the ``gguf`` package.

Tensors of type F32 / F16 / BF16 and the quantized types that ``gguf.quants`` can
dequantize (Q8_0, Q4_0, Q4_K, Q6_K, ...) are loaded as float32 (F16 stays float16). llama.cpp's
converter permutes the rows of Q and K for its rotary layout; they are permuted back to the
Hugging Face layout that the rest of the toolkit uses. The tokenizer inside the file (its
``tokenizer.*`` metadata) becomes a ``tokenizers`` tokenizer of the kind the file names
(``model_export.tokenizer.gguf_tokenizer``). The metadata's model keys become a Hugging Face
config (``gguf_config``), checked as a folder's is (``config.check_config``).

GGUF has no activation key for Llama; ``{arch}.hidden_act`` (and
``{arch}.hidden_act_param``), written by this toolkit, are honoured, else SiLU.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from sparseinfer.reference.errors import SparseInferError

from ..tokenizer import gguf_tokenizer
from .config import check_config, token_ids
from .names import EMBEDDING, FINAL_NORM, LAYER_TENSORS, LM_HEAD, layer_tensor, tensor_names
from .tensors import check_no_extra_tensors, check_tensors_present, layer_window
from .weights import Checkpoint, OpenCheckpoint, load_whole

# Hugging Face name (after "model.layers.{i}.") -> GGUF name (after "blk.{i}.")
GGUF_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
GGUF_GLOBAL_NAMES = {EMBEDDING: "token_embd.weight", FINAL_NORM: "output_norm.weight", LM_HEAD: "output.weight"}
assert set(GGUF_LAYER_NAMES) == set(LAYER_TENSORS.values())


def rope_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """HF -> llama.cpp row order of Q / K (pairs of halves interleaved per head)."""
    rows, cols = w.shape
    return w.reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def rope_unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of :func:`rope_permute`."""
    rows, cols = w.shape
    return w.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    if len(f.data) == 1:
        v = f.parts[f.data[0]]
        return bytes(v).decode() if v.dtype == np.uint8 else v[0].item()
    return [bytes(f.parts[j]).decode() if f.parts[j].dtype == np.uint8 else f.parts[j][0].item() for j in f.data]


def _tokenizer_fields(reader) -> dict:
    """Every ``tokenizer.*`` key of the file, arrays as lists (a one-element array too)."""
    from gguf import GGUFValueType

    fields = {}
    for key, f in reader.fields.items():
        if key.startswith("tokenizer."):
            value = _field(reader, key)
            is_array = f.types[0] == GGUFValueType.ARRAY
            fields[key] = value if not is_array or isinstance(value, list) else [value]
    return fields


def _tensor_array(t) -> np.ndarray:
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize

    shape = tuple(int(n) for n in reversed(t.shape))     # GGML lists the fastest axis first
    if t.tensor_type in (Q.F32, Q.F16):
        return np.asarray(t.data).reshape(shape)
    try:
        return dequantize(np.asarray(t.data), t.tensor_type).reshape(shape).astype(np.float32)
    except NotImplementedError:
        raise SparseInferError(f"GGUF tensor {t.name}: type {t.tensor_type.name} cannot be dequantized") from None


def gguf_config(reader, name: str) -> dict:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise SparseInferError(f"{name}: unsupported architecture {arch}; supported: llama")
    g = lambda key, default=None: _field(reader, f"llama.{key}", default)  # noqa: E731
    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": g("embedding_length"),
           "intermediate_size": g("feed_forward_length"), "num_hidden_layers": g("block_count"),
           "num_attention_heads": g("attention.head_count"),
           "num_key_value_heads": g("attention.head_count_kv", g("attention.head_count")),
           "rms_norm_eps": g("attention.layer_norm_rms_epsilon", 1e-6), "rope_theta": g("rope.freq_base", 10000.0),
           "max_position_embeddings": g("context_length", 4096), "vocab_size": g("vocab_size", len(tokens)),
           "hidden_act": g("hidden_act", "silu"), "tie_word_embeddings": "output.weight" not in
           {t.name for t in reader.tensors}, "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
           "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id")}
    if g("hidden_act_param") is not None:
        cfg["hidden_act_param"] = g("hidden_act_param")
    return {k: v for k, v in cfg.items() if v is not None}


class _PastTheEnd(Exception):
    def __init__(self, end: int, part: str):
        super().__init__(end, part)
        self.end, self.part = end, part


def open_gguf(p: Path):
    """A ``gguf.GGUFReader`` over ``p``. The reader slices its memory map without checking the
    file's end, so a truncated file fails later on a short array with an unrelated message;
    here every read past the end is caught and reported as truncation, in one line."""
    from gguf import GGUFReader

    class CheckedReader(GGUFReader):
        def _get(self, offset, dtype, count=1, override_order=None):
            end = int(offset) + np.dtype(dtype).itemsize * int(count)
            if end > len(self.data):
                data_offset = getattr(self, "data_offset", None)     # set once the header is read
                raise _PastTheEnd(end, "header" if data_offset is None or offset < data_offset else "tensor data")
            return super()._get(offset, dtype, count, override_order)

    size = p.stat().st_size
    if size == 0:
        raise SparseInferError(f"{p}: truncated GGUF file: it is empty")
    try:
        return CheckedReader(str(p))
    except _PastTheEnd as e:
        raise SparseInferError(f"{p}: truncated GGUF file: it has {size} bytes, but its {e.part} runs to byte "
                               f"{e.end} at least") from None
    except Exception as e:  # the reader raises ValueError / struct errors on bad files
        raise SparseInferError(f"cannot read GGUF {p}: {str(e).splitlines()[0]}") from None


def rope_heads(hf_name: str, shape) -> int | None:
    """The heads whose rows llama.cpp's converter permuted in tensor ``hf_name`` (Q: the attention
    heads, K: the key/value heads), None for every other tensor."""
    if hf_name.endswith("q_proj.weight"):
        return shape.num_heads
    if hf_name.endswith("k_proj.weight"):
        return shape.num_kv_heads
    return None


@contextlib.contextmanager
def open_gguf_checkpoint(path):
    """The file as an ``OpenCheckpoint`` (metadata, tokenizer and tensor names checked; tensors
    dequantized when asked, Q and K rows back in the Hugging Face order; ``gguf_tensor`` gives
    the file's own tensors)."""
    p = Path(path)
    if not p.is_file():
        raise SparseInferError(f"no such checkpoint: {p}")
    reader = open_gguf(p)
    cfg = gguf_config(reader, str(p))
    shape = check_config(cfg, str(p))
    by_name = {t.name: t for t in reader.tensors}
    embedding = by_name.get(GGUF_GLOBAL_NAMES[EMBEDDING])
    rows = int(embedding.shape[-1]) if embedding is not None and len(embedding.shape) else None    # fastest axis first
    ids = token_ids(cfg, shape.vocab_size, str(p), rows)
    tokenizer = gguf_tokenizer(_tokenizer_fields(reader), str(p))     # before the weights: fails fast
    to_gguf = dict(GGUF_GLOBAL_NAMES)
    window = layer_window(shape.num_layers, by_name)      # (past it no layer holds a tensor)
    for i in range(window):
        to_gguf.update({layer_tensor(i, hf): f"blk.{i}.{gg}" for hf, gg in GGUF_LAYER_NAMES.items()})
    if window < shape.num_layers:
        check_tensors_present([to_gguf.get(n, n) for n in tensor_names(shape, window)], by_name, str(p),
                              absent_layers=shape.num_layers - window)

    def gguf_tensor(hf_name):
        return by_name.get(to_gguf.get(hf_name, hf_name))

    def get(hf_name):
        t = gguf_tensor(hf_name)
        if t is None:
            return None
        a = _tensor_array(t)
        heads = rope_heads(hf_name, shape)
        return a if heads is None else rope_unpermute(a, heads)

    check_no_extra_tensors([to_gguf.get(n, n) for n in tensor_names(shape, window)], by_name, str(p),
                           tied=shape.tie_word_embeddings)
    types = {t.tensor_type.name for t in reader.tensors}
    yield OpenCheckpoint(shape, tokenizer, str(p), get, **ids, gguf_tensor=gguf_tensor, stored_dtypes=types)


def load_gguf_checkpoint(path) -> Checkpoint:
    return load_whole(open_gguf_checkpoint(path))
