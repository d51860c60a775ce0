"""Model shapes as data: the built-in ProSparse models and any Hugging Face config.json.

A foundation fact: the reference model, the kernels' shapes, the simulators and the
checkpoint loader all read shapes from here."""
from __future__ import annotations

import json
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


def from_hf_config(cfg: dict, name: str = "config.json") -> ModelShape:
    missing = [key for key in _REQUIRED if key not in cfg]
    if missing:
        raise SparseInferError(f"{name}: config is missing {', '.join(missing)}")
    heads = int(cfg["num_attention_heads"])
    return ModelShape(
        name=str(cfg.get("_name_or_path") or name), hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["intermediate_size"]), num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads, num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        vocab_size=int(cfg.get("vocab_size", 32000)), hidden_act=activation_from_config(cfg),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)), source=name,
        rope_theta=float(cfg.get("rope_theta") or 10000.0), rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)))


def read_config(path) -> dict:
    """Read a config.json (or a directory holding one), with one-line errors."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise SparseInferError(f"no such config file: {p}")
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
