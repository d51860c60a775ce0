"""Load Llama / ProSparse checkpoints into ``reference.llama.LlamaWeights``.

``load_checkpoint(path)`` accepts
* a Hugging Face directory: ``config.json`` + ``model.safetensors`` or shards listed in
  ``model.safetensors.index.json``; architectures ``LlamaForCausalLM`` and ProSparse's
  ``SparseLlamaForCausalLM`` (model_type ``sparsellama``, ``hidden_act: fatrelu`` with
  ``hidden_act_param``); MHA or GQA; tied or untied embeddings; bf16 / fp16 / fp32;
  ``tokenizer.json`` when present;
* a ``.gguf`` file (see ``gguf_loader``).

The model shape comes from ``reference.shapes.from_hf_config`` (one place for shapes). Every
problem is a one-line ``SparseInferError``: missing file, unsupported architecture,
a tensor missing or shaped differently from what the config implies.
"""
from __future__ import annotations

import contextlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sparseinfer.reference.activations import hf_activation_names
from sparseinfer.reference.dtypes import BFLOAT16, dtype_name
from sparseinfer.reference.errors import SparseInferError
from sparseinfer.reference.llama import LayerWeights, LlamaWeights
from sparseinfer.reference.shapes import ModelShape, from_hf_config, read_config

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "SparseLlamaForCausalLM")
SUPPORTED_MODEL_TYPES = ("llama", "sparsellama")
SUPPORTED_ACTIVATIONS = hf_activation_names()
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
EMBEDDING = "model.embed_tokens.weight"        # one row per token of the vocabulary

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


def named_tensors(weights: LlamaWeights) -> dict[str, np.ndarray]:
    """The model's tensors under their Hugging Face names, as they are (no copy, no cast);
    a tied LM head is the embedding and is not listed twice."""
    out = {EMBEDDING: weights.embed, "model.norm.weight": weights.final_norm}
    if not weights.shape.tie_word_embeddings:
        out["lm_head.weight"] = weights.lm_head
    for i, lw in enumerate(weights.layers):
        for field, hf in LAYER_TENSORS.items():
            out[f"model.layers.{i}.{hf}"] = getattr(lw, field)
    return out


MLP_FIELDS = ("gate", "up", "down")


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


def expected_shapes(shape: ModelShape) -> dict[str, tuple[int, ...]]:
    """Tensor shapes a config implies for one layer (HF layouts), by LayerWeights field."""
    d, k, hd = shape.d, shape.k, shape.head_dim
    return {"input_norm": (d,), "q": (shape.num_heads * hd, d), "k": (shape.num_kv_heads * hd, d),
            "v": (shape.num_kv_heads * hd, d), "o": (d, shape.num_heads * hd), "post_norm": (d,),
            "gate": (k, d), "up": (k, d), "down": (d, k)}


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


TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id")


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


_EXPONENT_BITS = {np.dtype(np.float16): 0x7C00, BFLOAT16: 0x7F80}     # all ones: Inf or NaN
WEIGHT_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), BFLOAT16)


def check_tensor(name: str, array: np.ndarray, expected: tuple[int, ...], source: str) -> None:
    """The config's shape, a float type (an integer type is data mislabelled in its header, whose
    values would become weights of ~1e9), and every value finite (a NaN or Inf weight would decode
    garbage)."""
    if tuple(array.shape) != tuple(expected):
        raise SparseInferError(f"{source}: tensor {name} has shape {tuple(array.shape)}, "
                               f"but the config implies {tuple(expected)}")
    if array.dtype not in WEIGHT_DTYPES:
        raise SparseInferError(f"{source}: tensor {name} is stored as {dtype_name(array.dtype)}; weights must be "
                               f"float32, float16 or bfloat16")
    bits = _EXPONENT_BITS.get(array.dtype)
    bad = (array.view(np.uint16) & bits) == bits if bits is not None else ~np.isfinite(array)
    if bad.any():
        first = np.unravel_index(int(np.argmax(bad)), array.shape)
        raise SparseInferError(f"{source}: tensor {name} holds {int(bad.sum())} non-finite values (NaN or Inf), "
                               f"the first at {tuple(int(i) for i in first)}")


def assemble(shape: ModelShape, get, source: str) -> LlamaWeights:
    """Build LlamaWeights from ``get(hf_name) -> ndarray or None`` with shape checks.

    Attention, norms and embeddings become float32; MLP weights keep fp16/bf16/fp32.
    """
    def fetch(name, expected, keep_dtype=False):
        a = get(name)
        if a is None:
            raise SparseInferError(f"{source}: tensor {name} is missing")
        check_tensor(name, a, expected, source)
        if keep_dtype and a.dtype in (np.dtype(np.float32), np.dtype(np.float16), BFLOAT16):
            return np.ascontiguousarray(a)
        return np.ascontiguousarray(a, dtype=np.float32)

    d, v = shape.d, shape.vocab_size
    exp = expected_shapes(shape)
    embed = fetch(EMBEDDING, (v, d))
    layers = []
    for i in range(shape.num_layers):
        fields = {f: fetch(f"model.layers.{i}.{hf}", exp[f], keep_dtype=f in MLP_FIELDS)
                  for f, hf in LAYER_TENSORS.items()}
        layers.append(LayerWeights(**fields))
    final_norm = fetch("model.norm.weight", (d,))
    if shape.tie_word_embeddings:
        lm_head = embed
    else:
        lm_head = fetch("lm_head.weight", (v, d))
    return LlamaWeights(shape=shape, embed=embed, layers=layers, final_norm=final_norm, lm_head=lm_head)


def tensor_names(shape: ModelShape) -> list[str]:
    """The Hugging Face names of every tensor the config implies, in ``assemble``'s order."""
    layers = [f"model.layers.{i}.{hf}" for i in range(shape.num_layers) for hf in LAYER_TENSORS.values()]
    return [EMBEDDING, *layers, "model.norm.weight", *([] if shape.tie_word_embeddings else ["lm_head.weight"])]


def _and_more(names: list[str]) -> str:
    """', and 2 more: b, c' after the first of ``names`` (at most five listed)."""
    if len(names) < 2:
        return ""
    return f", and {len(names) - 1} more: {', '.join(names[1:6])}{', ...' if len(names) > 6 else ''}"


def check_tensors_present(expected: list[str], present, source: str) -> None:
    """Every expected tensor name among ``present``, else one line naming the missing ones."""
    missing = [name for name in expected if name not in present]
    if missing:
        raise SparseInferError(f"{source}: tensor {missing[0]} is missing{_and_more(missing)}")


# Buffers some checkpoints store that the config already implies (recomputed from rope_theta).
DERIVED_TENSOR_SUFFIXES = (".rotary_emb.inv_freq",)
# Stored tensors a loader may pass over: an LM head beside tied embeddings (Hugging Face ties
# them and never reads it) and GGUF's rope_freqs (Llama 3.1's rope-scaling factors, which the
# exporter's rotary embedding does not use).
IGNORED_WHEN_TIED = ("lm_head.weight", "output.weight")
IGNORED_TENSORS = ("rope_freqs.weight",)
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|blk)\.([0-9]+)\.")


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


def _require_regular_file(p: Path, what: str) -> None:
    if not p.is_file():
        raise SparseInferError(f"{p}: {'a directory' if p.is_dir() else 'not a regular file'}, not {what}")


def _safetensor_files(root: Path) -> list[Path]:
    index = root / INDEX_FILE
    if index.exists():
        _require_regular_file(index, "a shard index")
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SparseInferError(f"cannot read {index}: {e}") from None
        files = [root / f for f in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.exists():
                raise SparseInferError(f"{root}: shard {f.name} listed in {INDEX_FILE} is missing")
    elif (root / SINGLE_FILE).exists():
        files = [root / SINGLE_FILE]
    else:
        files = sorted(root.glob("*.safetensors"))
        if not files:
            raise SparseInferError(f"{root}: no model.safetensors, {INDEX_FILE} or *.safetensors found")
    for f in files:
        _require_regular_file(f, "a safetensors file")
    return files


# bytes per element of each safetensors dtype (the format's own list)
SAFETENSORS_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
                        "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
HEADER_BYTES_MAX = 100 << 20              # the format's own bound on a header


@dataclass
class SafetensorsHeader:
    """A checked header: each tensor's shape and data bytes [start, end), and the data's size."""

    path: Path
    shapes: dict[str, tuple[int, ...]]
    spans: dict[str, tuple[int, int]]
    data_bytes: int


def check_safetensors_header(f: Path) -> SafetensorsHeader:
    """Each tensor's header entry agrees with its data: a known dtype, a shape of whole numbers,
    and offsets inside the file spanning exactly shape × itemsize bytes; one line naming the file,
    the tensor and the rule broken. (A header can still call F32 data I32, the same size:
    ``check_tensor`` refuses weights of an integer type.) That the entries tile the data is
    ``check_data_tiled``'s, after the tensor names are checked: a removed entry leaves a gap
    that the safetensors library blames on the tensor after it."""
    import struct

    try:
        with open(f, "rb") as fh:
            head = fh.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            text = fh.read(n) if 0 < n <= HEADER_BYTES_MAX else b""
        size = f.stat().st_size
    except OSError as e:
        raise SparseInferError(f"cannot read {f}: {e.strerror or e}") from None
    if not 0 < n <= HEADER_BYTES_MAX or len(text) != n:
        raise SparseInferError(f"{f}: not a safetensors file (its header length {n} does not fit the file's "
                               f"{size} bytes)")
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, ValueError) as e:
        raise SparseInferError(f"{f}: the safetensors header is not JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(header, dict):
        raise SparseInferError(f"{f}: the safetensors header is not a JSON object")
    data_bytes = size - 8 - n
    checked = SafetensorsHeader(f, {}, {}, data_bytes)
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        where = f"{f}: tensor {name}"
        if not isinstance(entry, dict):
            raise SparseInferError(f"{where}: its header entry is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in SAFETENSORS_ITEMSIZE:
            raise SparseInferError(f"{where}: unknown dtype {json.dumps(dtype)} in the header")
        if not isinstance(shape, list) or not all(type(x) is int and x >= 0 for x in shape):
            raise SparseInferError(f"{where}: shape {json.dumps(shape)} in the header is not a list of "
                                   f"whole numbers >= 0")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(x) is int for x in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_bytes):
            raise SparseInferError(f"{where}: data_offsets {json.dumps(offsets)} lie outside the file's "
                                   f"{data_bytes} data bytes")
        expected = math.prod(shape) * SAFETENSORS_ITEMSIZE[dtype]
        if offsets[1] - offsets[0] != expected:
            raise SparseInferError(f"{where}: the header says {dtype} {shape}, {expected} bytes, but its data "
                                   f"spans {offsets[1] - offsets[0]} bytes")
        checked.shapes[name], checked.spans[name] = tuple(shape), tuple(offsets)
    return checked


def check_data_tiled(header: SafetensorsHeader) -> None:
    """The tensors' data follow one another from the first data byte to the last, as the
    format requires: a gap, an overlap or bytes left over is one line naming the bytes and
    the tensors beside them."""
    at, before = 0, None
    for start, end, name in sorted((start, end, name) for name, (start, end) in header.spans.items()):
        if start > at:
            raise SparseInferError(f"{header.path}: data bytes {at}-{start} belong to no tensor in the header "
                                   f"(they lie between {before or 'the header'} and {name})")
        if start < at:
            raise SparseInferError(f"{header.path}: tensors {before} and {name} overlap in the data "
                                   f"(bytes {start}-{at})")
        at, before = end, name
    if at != header.data_bytes:
        raise SparseInferError(f"{header.path}: data bytes {at}-{header.data_bytes} belong to no tensor in the "
                               f"header (they follow {before or 'the header'})")


@contextlib.contextmanager
def _safetensors_reader(files: list[Path], expected: list[str], source: str, tied: bool = False):
    """``get(name) -> ndarray | None`` over the files, each tensor read when asked (so a
    checkpoint is in memory once, not its files' bytes and then its arrays), the set of
    dtypes read so far (bf16 arrives as ml_dtypes.bfloat16) and every stored tensor's shape.
    The headers are checked first, then that each ``expected`` name is there, then the data's
    tiling (``check_data_tiled``)."""
    from safetensors import SafetensorError, safe_open

    errors = (SafetensorError, OSError, ValueError, TypeError)
    headers = [check_safetensors_header(f) for f in files]
    shapes = {name: shape for h in headers for name, shape in h.shapes.items()}
    check_tensors_present(expected, shapes, source)
    check_no_extra_tensors(expected, shapes, source, tied=tied)
    for h in headers:
        check_data_tiled(h)
    with contextlib.ExitStack() as stack:
        where = {}
        for f in files:
            try:
                handle = stack.enter_context(safe_open(str(f), framework="np"))
                where.update(dict.fromkeys(handle.keys(), (f, handle)))
            except errors as e:
                raise SparseInferError(f"cannot read {f}: {e}") from None
        dtypes = set()

        def get(name):
            if name not in where:
                return None
            f, handle = where[name]
            try:
                a = handle.get_tensor(name)
            except errors as e:
                raise SparseInferError(f"cannot read {f}: {e}") from None
            dtypes.add(dtype_name(a.dtype))
            return a

        yield get, dtypes, shapes


def load_hf_checkpoint(path) -> Checkpoint:
    root = Path(path)
    if not root.exists():
        raise SparseInferError(f"no such checkpoint: {root}")
    if not root.is_dir():
        raise SparseInferError(f"{root}: expected a checkpoint directory (config.json + *.safetensors) or a .gguf file")
    cfg = read_config(root)
    config_name = str(root / "config.json")
    shape = check_config(cfg, config_name)
    with _safetensors_reader(_safetensor_files(root), tensor_names(shape), str(root),
                             tied=shape.tie_word_embeddings) as (get, dtypes, shapes):
        embedding = shapes[EMBEDDING]
        ids = token_ids(cfg, shape.vocab_size, config_name, embedding[0] if embedding else None)
        weights = assemble(shape, get, str(root))
    from .tokenizer import load_tokenizer_json
    tok = load_tokenizer_json(root / "tokenizer.json") if (root / "tokenizer.json").is_file() else None
    return Checkpoint(weights=weights, tokenizer=tok, source=str(root), stored_dtype="/".join(sorted(dtypes)), **ids)


def load_checkpoint(path) -> Checkpoint:
    """A Hugging Face checkpoint directory or a ``.gguf`` file."""
    p = Path(path)
    if p.suffix.lower() == ".gguf":
        from .gguf_loader import load_gguf_checkpoint
        return load_gguf_checkpoint(p)
    return load_hf_checkpoint(p)
