"""Model shapes as data: the built-in ProSparse models and any Hugging Face config.json.

A foundation fact: the reference model, the kernels' shapes, the simulators and the
checkpoint loader all read shapes from here."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from sparseinfer.reference.activations import kind_of_hf_name
from sparseinfer.reference.errors import SparseInferError


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden_size: int            # d
    intermediate_size: int      # k (MLP neurons)
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    hidden_act: str = "relu"
    max_position_embeddings: int = 4096
    source: str = ""
    rope_theta: float = 10000.0         # HF LlamaConfig defaults for the three fields below
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False

    @property
    def d(self) -> int:
        return self.hidden_size

    @property
    def k(self) -> int:
        return self.intermediate_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def to_dict(self) -> dict:
        return asdict(self)


# ProSparse-Llama2 (SparseLLM/prosparse-llama-2-{7b,13b} config.json; paper Sec. V-A):
# Llama-2 shapes with FATReLU (hidden_act_param 0.01).
BUILTIN_MODELS = {
    "prosparse-llama2-7b": ModelShape(
        "prosparse-llama2-7b", 4096, 11008, 32, 32, 32, 32000, "fatrelu:0.01", 4096,
        "SparseLLM/prosparse-llama-2-7b config.json; paper Sec. V-A", rms_norm_eps=1e-5),
    "prosparse-llama2-13b": ModelShape(
        "prosparse-llama2-13b", 5120, 13824, 40, 40, 40, 32000, "fatrelu:0.01", 4096,
        "SparseLLM/prosparse-llama-2-13b config.json; paper Sec. V-A", rms_norm_eps=1e-5),
}

_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def activation_from_config(cfg: dict) -> str:
    """The activation spec (``relu``, ``silu``, ``gelu``, ``gelu_tanh``, ``fatrelu:T``) of a Hugging Face config."""
    act = kind_of_hf_name(cfg.get("hidden_act", "silu"))
    if act == "fatrelu":
        return f"fatrelu:{cfg.get('hidden_act_param', 0.0)}"
    return act


POSITIVE_INT_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                       "num_key_value_heads", "vocab_size", "max_position_embeddings")
POSITIVE_FLOAT_FIELDS = ("rope_theta", "rms_norm_eps")
MAX_POSITIONS = 1 << 20           # max_position_embeddings: the export's rotary tables are [positions, head_dim]


def check_config_fields(cfg: dict, name: str) -> None:
    """Sizes are positive integers (not booleans, strings, floats or null), rope_theta and
    rms_norm_eps finite positive numbers; a field left out keeps the Hugging Face LlamaConfig
    default (a null num_key_value_heads means as many as the heads, a null rope_theta 10000)."""
    for key in POSITIVE_INT_FIELDS:
        if key not in cfg or (key == "num_key_value_heads" and cfg[key] is None):    # default: as many as heads
            continue
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise SparseInferError(f"{name}: field {key} must be a positive integer, got {json.dumps(v)}")
        if key == "max_position_embeddings" and v > MAX_POSITIONS:
            raise SparseInferError(f"{name}: field {key} is {v}; at most {MAX_POSITIONS} are supported")
    for key in POSITIVE_FLOAT_FIELDS:
        if key not in cfg or (key == "rope_theta" and cfg[key] is None):             # default: 10000
            continue
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise SparseInferError(f"{name}: field {key} must be a finite positive number, got {json.dumps(v)}")


def from_hf_config(cfg: dict, name: str = "config.json") -> ModelShape:
    """The model shape of a Hugging Face config: required sizes present, every size a positive
    integer (``check_config_fields``), heads dividing the hidden size and key/value heads the heads;
    one line naming the file and field otherwise. Fields left out take LlamaConfig's defaults."""
    missing = [key for key in _REQUIRED if key not in cfg]
    if missing:
        raise SparseInferError(f"{name}: config is missing {', '.join(missing)}")
    check_config_fields(cfg, name)
    heads = cfg["num_attention_heads"]
    shape = ModelShape(
        name=str(cfg.get("_name_or_path") or name), hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"], num_layers=cfg["num_hidden_layers"],
        num_heads=heads, num_kv_heads=cfg.get("num_key_value_heads") or heads,
        vocab_size=cfg.get("vocab_size", 32000), hidden_act=activation_from_config(cfg),
        max_position_embeddings=cfg.get("max_position_embeddings", 4096), source=name,
        rope_theta=float(cfg.get("rope_theta") or 10000.0), rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)))
    if shape.d % shape.num_heads or shape.num_heads % shape.num_kv_heads:
        raise SparseInferError(f"{name}: hidden_size {shape.d}, {shape.num_heads} heads and "
                               f"{shape.num_kv_heads} key/value heads do not divide evenly")
    return shape


def read_config(path) -> dict:
    """Read a config.json (or a directory holding one), with one-line errors; a directory
    named *.json, or one in place of a checkpoint's config.json, is named as a directory."""
    p = Path(path)
    if p.is_dir() and p.suffix.lower() != ".json":
        p = p / "config.json"
    if p.is_dir():
        raise SparseInferError(f"{p}: a directory, not a config file")
    if not p.exists():
        raise SparseInferError(f"no such config file: {p}")
    if not p.is_file():
        raise SparseInferError(f"{p}: not a regular file, so not a config file")
    try:
        cfg = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SparseInferError(f"cannot read {p}: {e}") from None
    if not isinstance(cfg, dict):
        raise SparseInferError(f"{p}: expected a JSON object")
    return cfg


def load_model(name_or_path: str) -> ModelShape:
    """A built-in model by name, or a Hugging Face config.json (file or directory)."""
    key = str(name_or_path).strip().lower()
    if key in BUILTIN_MODELS:
        return BUILTIN_MODELS[key]
    p = Path(name_or_path)
    if p.suffix == ".json" or p.is_dir():
        return from_hf_config(read_config(p), str(p))
    raise SparseInferError(
        f"unknown model {name_or_path!r}; built-in models: {', '.join(BUILTIN_MODELS)} (or pass a config.json)")
