"""Shapes as data, shared by the GPU tests and the benchmarks, and the input builder.

``TEST_SHAPES`` are tails (d not a multiple of 32 or of the vector width, k crossing the
down projection's row chunks); ``BENCH_SHAPES`` are the built-in ProSparse models.
:func:`make_layer` builds a layer and an x where exactly a chosen set of gate rows is
predicted zero (and, by a wide margin, truly negative), so a test or a benchmark can ask
for a target sparsity and get exactly it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sparseinfer.reference.errors import SparseInferError
from sparseinfer.reference.order_contract import DOWN_ROW_CHUNK
from sparseinfer.reference.shapes import BUILTIN_MODELS

# d values that hit every tail of the 32-bit sign words and of the 16-byte vector chunks
# (used by the reference's property tests too).
TAIL_DS = (1, 2, 31, 32, 33, 63, 64, 97, 255, 256, 257, 300)
# (d, k): d = 1, 31, 33, 97 and the models' 4096 / 5120; k odd and across row chunks; d = 300
# (10 sign words: every other row 16-byte aligned, two whole quads, then a 12-bit tail word).
TEST_SHAPES = ((1, 37), (31, 64), (33, 97), (97, 600), (256, DOWN_ROW_CHUNK + 1), (300, 129), (4096, 300),
               (5120, 1031))
BENCH_MODELS = ("prosparse-llama2-7b", "prosparse-llama2-13b")
BENCH_SPARSITIES = (0.90, 0.92)
# The benchmark's decode loop: copies of one layer in distinct memory (13B: 8 x 425 MB of
# fp16 weights, far beyond any L2), run back to back as a decode step runs its layers.
LOOP_LAYERS = 8
BENCH_DTYPE = "fp16"

# Fraction of negative products in a row built to be predicted zero / kept.
_NEG_FRACTION_ZERO_ROW = 0.75
_NEG_FRACTION_KEPT_ROW = 0.25


@dataclass(frozen=True)
class BenchShape:
    model: str
    d: int
    k: int


BENCH_SHAPES = tuple(BenchShape(name, BUILTIN_MODELS[name].d, BUILTIN_MODELS[name].k) for name in BENCH_MODELS)


@dataclass
class Layer:
    x: np.ndarray          # float32 [d]
    w_gate: np.ndarray     # [k, d]
    w_up: np.ndarray       # [k, d]
    w_down: np.ndarray     # [d, k] (Hugging Face layout)
    zero_rows: np.ndarray  # bool [k]: the rows built to be predicted zero


def make_layer(d: int, k: int, dtype, sparsity: float, seed: int) -> Layer:
    """Weights of ``dtype`` and x with exactly ``round(sparsity * k)`` rows predicted zero.

    Every element is nonzero (magnitudes in [0.5, 3.5) / sqrt(d)); a zero row has exactly
    round(0.75 d) negative products with x, a kept row round(0.25 d), so eq. 2 flags
    exactly the chosen rows for any alpha in [0.9, 1.1] (for d >= 1) and their gate
    pre-activations are negative by a wide margin for d large.
    """
    if not 0.0 <= sparsity <= 1.0:
        raise SparseInferError(f"sparsity must be in [0, 1], got {sparsity}")
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    x = (rng.uniform(0.5, 3.5, d) * rng.choice([-1.0, 1.0], d)).astype(np.float32)
    zero_rows = np.zeros(k, dtype=bool)
    zero_rows[rng.permutation(k)[:int(round(sparsity * k))]] = True
    n_neg = np.where(zero_rows, round(_NEG_FRACTION_ZERO_ROW * d), round(_NEG_FRACTION_KEPT_ROW * d))
    # exactly n_neg[i] negative products per row, at positions shuffled row by row
    product_negative = rng.permuted(np.arange(d)[None, :] < n_neg[:, None], axis=1)
    scale = np.float32(1.0 / np.sqrt(d))
    magnitude = rng.uniform(0.5, 3.5, (k, d)).astype(np.float32) * scale
    w_gate = np.where(product_negative ^ (x < 0)[None, :], -magnitude, magnitude).astype(dtype)
    w_up = (rng.standard_normal((k, d), dtype=np.float32) * scale).astype(dtype)
    w_down = (rng.standard_normal((d, k), dtype=np.float32) / np.float32(np.sqrt(k))).astype(dtype)
    return Layer(x, w_gate, w_up, w_down, zero_rows)
