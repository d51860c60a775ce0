"""Operation and predictor-memory counts per MLP block, closed form and from a trace.

Conventions of paper Table I: one "op" is one multiply-accumulate of the MLP (3·d·k for
the dense block), one FP16 multiply-accumulate of the DejaVu predictor (d·r + r·k), or
one 32-bit XOR(+popcount) word of the SparseInfer predictor (k·d/32).
"""
from __future__ import annotations

from fractions import Fraction

from sparseinfer.reference import dtypes
from sparseinfer.reference.errors import SparseInferError
from sparseinfer.reference.shapes import ModelShape
from sparseinfer.reference.signs import BYTES_PER_WORD, words_per_row

from . import paper

MIB = 1 << 20
FP16_BYTES = dtypes.itemsize("fp16")
SIGN_WORD_BYTES = BYTES_PER_WORD
METHODS = ("llama.cpp", "PowerInfer", "SparseInfer")


def as_fraction(sparsity) -> Fraction:
    """Sparsity as an exact fraction of its decimal text (0.92 -> 23/25), checked in [0, 1)."""
    try:
        s = Fraction(str(sparsity))
    except (ValueError, ZeroDivisionError):
        raise SparseInferError(f"sparsity {sparsity!r} is not a number") from None
    if not 0 <= s < 1:
        raise SparseInferError(f"sparsity must be in [0, 1), got {sparsity}")
    return s


# Bounds that keep every count exact in float64 (< 2^53) for any model shape of up to 2^16-wide
# layers: a predictor rank above the layers' own sizes is no longer low-rank anyway, and no model
# decodes 16 million tokens of context.
MAX_RANK = 1 << 20
MAX_CONTEXT_TOKENS = 1 << 24


def check_rank(rank: int) -> int:
    if not 1 <= int(rank) <= MAX_RANK:
        raise SparseInferError(f"predictor rank must be in 1..{MAX_RANK}, got {rank}")
    return int(rank)


def check_context(context_tokens: int) -> int:
    if not 0 <= int(context_tokens) <= MAX_CONTEXT_TOKENS:
        raise SparseInferError(f"context length must be in 0..{MAX_CONTEXT_TOKENS} tokens, got {context_tokens}")
    return int(context_tokens)


def dense_mlp_ops(m: ModelShape) -> int:
    """gate + up + down multiply-accumulates: 3·d·k (Table I, llama.cpp row)."""
    return 3 * m.d * m.k


def sparse_mlp_ops(m: ModelShape, sparsity) -> Fraction:
    """3·d·k·(1 − s): the MLP work left when a fraction s of rows is skipped (Table I)."""
    return dense_mlp_ops(m) * (1 - as_fraction(sparsity))


def powerinfer_predictor_ops(m: ModelShape, rank: int = paper.TABLE1_POWERINFER_RANK) -> int:
    """DejaVu predictor, Linear d→r then r→k: d·r + r·k FP16 MACs (Table I)."""
    r = check_rank(rank)
    return m.d * r + r * m.k


def sparseinfer_predictor_ops(m: ModelShape) -> int:
    """k rows of ceil(d/32) 32-bit XOR+popcount words (Table I: k·d/32)."""
    return m.k * words_per_row(m.d)


def powerinfer_predictor_bytes(m: ModelShape, rank: int = paper.TABLE1_POWERINFER_RANK) -> int:
    """FP16 predictor weights of all layers (Sec. V-B: (d·r + r·k)·2 B·L)."""
    return powerinfer_predictor_ops(m, rank) * FP16_BYTES * m.num_layers


def sparseinfer_predictor_bytes(m: ModelShape) -> int:
    """Packed W_gate sign words of all layers (Sec. V-B: k·(d/32)·4 B·L)."""
    return sparseinfer_predictor_ops(m) * SIGN_WORD_BYTES * m.num_layers


def dense_mlp_bytes(d: int, k: int, weight_dtype: str) -> int:
    """The dense MLP block's weight bytes: W_gate, W_up and W_down (3·d·k elements)."""
    return 3 * k * d * dtypes.itemsize(weight_dtype)


def ops_per_layer(m: ModelShape, sparsity, rank: int = paper.TABLE1_POWERINFER_RANK) -> list[dict]:
    """Rows of Table I for any model: method, prediction ops, MLP block ops."""
    sparse = sparse_mlp_ops(m, sparsity)
    return [
        {"method": "llama.cpp", "prediction_ops": 0, "mlp_ops": dense_mlp_ops(m)},
        {"method": "PowerInfer", "prediction_ops": powerinfer_predictor_ops(m, rank), "mlp_ops": sparse},
        {"method": "SparseInfer", "prediction_ops": sparseinfer_predictor_ops(m), "mlp_ops": sparse},
    ]


def ops_per_token(m: ModelShape, sparsity, rank: int = paper.TABLE1_POWERINFER_RANK) -> list[dict]:
    """Per-layer rows times the number of layers (MLP blocks only)."""
    return [{key: (v * m.num_layers if key != "method" else v) for key, v in row.items()}
            for row in ops_per_layer(m, sparsity, rank)]


def predictor_memory_mib(m: ModelShape, rank: int = paper.TABLE1_POWERINFER_RANK) -> dict:
    return {"PowerInfer": powerinfer_predictor_bytes(m, rank) / MIB,
            "SparseInfer": sparseinfer_predictor_bytes(m) / MIB}


def ops_from_trace(trace) -> dict:
    """Prediction and MLP ops actually executed in one reference ``mlp_sparse`` call."""
    return {"method": "SparseInfer", "mode": trace.mode, "prediction_ops": trace.predictor_xor_words,
            "mlp_ops": trace.macs["total"]}


def number(v):
    """JSON-friendly value: ints stay ints, fractions become floats."""
    if isinstance(v, Fraction):
        return int(v) if v.denominator == 1 else float(v)
    return v


def table1(m: ModelShape, sparsity=paper.TABLE1_SPARSITY, rank: int = paper.TABLE1_POWERINFER_RANK) -> dict:
    """Table I as data (the shape of ``sparseinfer table1 --json``)."""
    mem = predictor_memory_mib(m, rank)
    return {
        "model": m.name,
        "sparsity": float(as_fraction(sparsity)),
        "rank": rank,
        "rows": [{k: number(v) for k, v in row.items()} for row in ops_per_layer(m, sparsity, rank)],
        "predictor_memory_mib": mem,
        "predictor_memory_ratio": mem["PowerInfer"] / mem["SparseInfer"],
    }


def op_counts(m: ModelShape, sparsity, rank: int = paper.TABLE1_POWERINFER_RANK) -> dict:
    """Operation counts of one MLP block and of a whole token, per method (the shape of
    ``sparseinfer ops --json``)."""
    return {"model": m.name, "d": m.d, "k": m.k, "num_layers": m.num_layers,
            "sparsity": float(as_fraction(sparsity)), "rank": rank,
            "per_layer": [{k: number(v) for k, v in r.items()} for r in ops_per_layer(m, sparsity, rank)],
            "per_token": [{k: number(v) for k, v in r.items()} for r in ops_per_token(m, sparsity, rank)]}


def predictor_memory(m: ModelShape, rank: int = paper.TABLE1_POWERINFER_RANK) -> dict:
    """A whole model's predictor memory per method and their ratio (``sparseinfer memory --json``)."""
    mem = predictor_memory_mib(m, rank)
    return {"model": m.name, "num_layers": m.num_layers, "rank": rank, "predictor_memory_mib": mem,
            "ratio": mem["PowerInfer"] / mem["SparseInfer"]}


# ---- decode-step counts outside the MLP block (used by the latency model) ----

def kv_dim(m: ModelShape) -> int:
    """Width of one layer's K (or V) vector: num_kv_heads · head_dim (= d without GQA)."""
    return m.num_kv_heads * m.head_dim


def attention_projection_macs(m: ModelShape) -> int:
    """Q, K, V and O projections of one layer for one token: d·d + 2·d·kv_dim + d·d MACs."""
    return 2 * m.d * m.d + 2 * m.d * kv_dim(m)


def kv_cache_bytes(m: ModelShape, context_tokens: int, itemsize: int = FP16_BYTES) -> int:
    """K and V cache read by one layer's attention at ``context_tokens`` positions."""
    return 2 * check_context(context_tokens) * kv_dim(m) * itemsize


def kv_cache_macs(m: ModelShape, context_tokens: int) -> int:
    """q·K^T and softmax·V of one layer for one token: 2 · context · d MACs."""
    return 2 * check_context(context_tokens) * m.d


def lm_head_macs(m: ModelShape) -> int:
    """Output projection vocab × d (one token)."""
    return m.vocab_size * m.d

