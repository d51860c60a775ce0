"""Test cases for the kernel tests: Hypothesis strategies, the expected values from the
reference, and comparisons that explain their failures. Shared by the GPU tests and the
CPU test that checks the cases themselves are non-trivial."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import strategies as st

from sparseinfer.kernels.expected import expected_h1_h3, quant_h1_h3
from sparseinfer.kernels.shapes import TEST_SHAPES, make_layer
from sparseinfer.reference.block_quant import FORMATS, Q8_0
from sparseinfer.reference.dtypes import WEIGHT_DTYPES, dtype_name
from sparseinfer.reference.order_contract import DOWN_ROW_CHUNK
from sparseinfer.reference.quant_mlp import QuantizedMLPWeights
from sparseinfer.reference.signs import negative_product_counts, pack_signs, zero_rows_from_counts

FEATURES = ("neg_zero", "subnormal", "ties", "x_all_negative", "x_all_positive")
ACTIVATIONS = ("relu", "fatrelu:0.01")
_SUBNORMAL = {"fp32": 1e-40, "fp16": 2.0 ** -20, "bf16": 1e-40}


@dataclass
class Case:
    d: int
    k: int
    dtype: np.dtype
    alpha_milli: int
    seed: int
    activation: str
    features: tuple
    x: np.ndarray
    w_gate: np.ndarray
    w_up: np.ndarray
    w_down: np.ndarray

    def __str__(self):
        return (f"d={self.d} k={self.k} dtype={dtype_name(self.dtype)} alpha_milli={self.alpha_milli} "
                f"seed={self.seed} act={self.activation} features={','.join(self.features) or '-'}")

    # --- expected values from the reference ---
    @property
    def counts(self):
        return negative_product_counts(pack_signs(self.w_gate), pack_signs(self.x), self.d)

    @property
    def predicted_zero(self):
        return zero_rows_from_counts(self.counts, self.d, self.alpha_milli)

    def h1_h3(self, sparse: bool = True):
        """(h1, h3) in the contract: sparse = predicted rows skipped and +AS; else dense."""
        return expected_h1_h3(self.x, self.w_gate, self.w_up, self.activation,
                              self.predicted_zero if sparse else None)

    def assert_nontrivial(self):
        z = self.predicted_zero
        _, h3 = self.h1_h3()
        assert z.any() and (~z).any(), f"trivial case (skipped {int(z.sum())} of {self.k}): {self}"
        assert (h3 != 0).any(), f"trivial case (every h3 is zero): {self}"


def _set_negative_products(w_row, x, n_neg, rng):
    """Re-sign w_row so that exactly n_neg products with x are negative (x has no zeros)."""
    neg = np.zeros(w_row.size, dtype=bool)
    neg[rng.permutation(w_row.size)[:n_neg]] = True
    mag = np.abs(w_row.astype(np.float32))
    return np.where(neg ^ (x < 0), -mag, mag).astype(w_row.dtype)


def build_case(d, k, dtype, alpha_milli, seed, activation, features, sparsity=0.9) -> Case:
    layer = make_layer(d, k, dtype, sparsity, seed)
    rng = np.random.default_rng(seed + 1)
    x, wg = layer.x.copy(), layer.w_gate.copy()
    if {"x_all_negative", "x_all_positive"} & set(features):
        x = -np.abs(x) if "x_all_negative" in features else np.abs(x)
        # the layer's rows were signed for the old x: re-sign them for the new one so that
        # about `sparsity` of them are still predicted zero (60 % negative products) and the
        # rest kept (40 %), for every alpha in [0.9, 1.1]
        zero = rng.permutation(k) < min(max(round(sparsity * k), 1), k - 1)
        for r in range(k):
            wg[r] = _set_negative_products(wg[r], x, -(-6 * d // 10) if zero[r] else 4 * d // 10, rng)
    if "ties" in features and d % 2 == 0:           # N_neg == N_pos: skipped iff alpha < 1
        for r in rng.choice(k, size=max(1, k // 8), replace=False):
            wg[r] = _set_negative_products(wg[r], x, d // 2, rng)
    n_special = max(1, d // 8)      # weights touched
    n_x = d // 8                      # x entries touched (none for d < 8: x must keep a nonzero)
    if "neg_zero" in features:
        x[rng.choice(d, n_x, replace=False)] = np.float32(-0.0)
        wg[rng.choice(k, n_special), rng.choice(d, n_special)] = -0.0
    if "subnormal" in features:
        tiny = _SUBNORMAL[dtype_name(dtype)]
        x[rng.choice(d, n_x, replace=False)] = np.float32(1e-40) * rng.choice([-1, 1], n_x)
        wg[rng.choice(k, n_special), rng.choice(d, n_special)] = tiny * rng.choice([-1, 1], n_special)
    return Case(d, k, np.dtype(dtype), alpha_milli, seed, activation, tuple(sorted(features)),
                x, wg, layer.w_up, layer.w_down)


@st.composite
def cases(draw, shapes=TEST_SHAPES, dtypes=WEIGHT_DTYPES):
    d, k = draw(st.sampled_from(shapes))
    dtype = draw(st.sampled_from(dtypes))
    alpha_milli = draw(st.one_of(st.just(1000), st.integers(900, 1100)))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    activation = draw(st.sampled_from(ACTIVATIONS))
    features = draw(st.sets(st.sampled_from(FEATURES), max_size=3))
    if {"x_all_negative", "x_all_positive"} <= features:
        features.discard("x_all_positive")
    sparsity = draw(st.sampled_from([0.5, 0.9, 0.92]))
    return build_case(d, k, dtype, alpha_milli, seed, activation, features, sparsity)


# (d, k) of the block-quantized kernels' cases: d whole blocks (32 and 96 included: one and three
# blocks, so lanes add one or three products before the butterfly; 320: 10 sign words, every
# other row's 16-byte aligned), k odd, not a multiple of a block's warps, and across the down
# projection's chunks.
QUANT_SHAPES = ((32, 37), (64, 97), (96, 600), (256, DOWN_ROW_CHUNK + 1), (320, 129), (1024, 65))


@dataclass
class QuantCase:
    """A float case (``build_case``) quantized: W_gate and W_up in ``fmt``, W_down^T in ``down_fmt``."""
    base: Case
    weights: QuantizedMLPWeights

    def __str__(self):
        return f"{self.base} fmt={self.fmt} down_fmt={self.down_fmt}"

    @property
    def fmt(self) -> str:
        return self.weights.fmt.name

    @property
    def down_fmt(self) -> str:
        return self.weights.down_fmt.name

    @property
    def x(self):
        return self.base.x

    @property
    def activation(self):
        return self.base.activation

    @property
    def alpha_milli(self) -> int:
        return self.base.alpha_milli

    @property
    def w_signs(self):
        return pack_signs(self.weights.dequantized()[0])

    @property
    def predicted_zero(self):
        return zero_rows_from_counts(negative_product_counts(self.w_signs, pack_signs(self.x), self.base.d),
                                     self.base.d, self.alpha_milli)

    def h1_h3(self, sparse: bool = True):
        return quant_h1_h3(self.x, self.weights, self.activation, self.predicted_zero if sparse else None)

    def assert_nontrivial(self):
        z = self.predicted_zero
        _, h3 = self.h1_h3()
        assert z.any() and (~z).any(), f"trivial case (skipped {int(z.sum())} of {self.base.k}): {self}"
        assert (h3 != 0).any(), f"trivial case (every h3 is zero): {self}"


def build_quant_case(d, k, dtype, alpha_milli, seed, activation, features, fmt, down_fmt=None,
                     sparsity=0.9) -> QuantCase:
    base = build_case(d, k, dtype, alpha_milli, seed, activation, features, sparsity)
    return QuantCase(base, QuantizedMLPWeights.quantize(base.w_gate, base.w_up, base.w_down, fmt, down_fmt))


@st.composite
def quant_cases(draw, shapes=QUANT_SHAPES):
    """A float case drawn as ``cases`` does, on a whole-block shape, quantized to a format, with
    W_down^T in that format or in Q8_0 (the exporter's choice for 4-bit files)."""
    base = draw(cases(shapes=shapes))
    fmt = draw(st.sampled_from(list(FORMATS)))
    down_fmt = draw(st.sampled_from([fmt, Q8_0.name]))
    return QuantCase(base, QuantizedMLPWeights.quantize(base.w_gate, base.w_up, base.w_down, fmt, down_fmt))


def mismatch_report(got, want, what: str, case) -> str:
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape:
        return f"{what}: shape {got.shape} != expected {want.shape} ({case})"
    if got.dtype.kind == "f":
        bad = got.view(np.uint32) != want.astype(np.float32).view(np.uint32)
    else:
        bad = got != want
    idx = np.flatnonzero(bad)
    if idx.size == 0:
        return ""
    first = ", ".join(f"[{i}] got {got.flat[i]!r} want {want.flat[i]!r}" for i in idx[:5])
    return f"{what}: {idx.size} of {got.size} differ; first {first} ({case})"


def assert_same(got, want, what: str, case) -> None:
    """Exact comparison (bit patterns for floats) with a self-explaining failure."""
    msg = mismatch_report(got, want, what, case)
    assert not msg, msg


@contextlib.contextmanager
def mutated(src: str, old: str, new: str):
    """The emulator builds ``src`` with ``old`` replaced by ``new`` inside the block."""
    from sparseinfer.kernels import emulator, sources

    text = sources.raw_text(src)
    assert text.count(old) == 1, old
    orig = sources.raw_text
    emulator._library.cache_clear()
    emulator.raw_text = sources.raw_text = lambda name: (text.replace(old, new) if name == src else orig(name))
    try:
        yield
    finally:
        emulator.raw_text = sources.raw_text = orig
        emulator._library.cache_clear()


@pytest.fixture(scope="module")
def emu():
    """The kernels on the CPU emulation for a test module (``from kernel_cases import emu``):
    yields its CuPy stand-in; skips where g++ is missing."""
    from sparseinfer.kernels import emulator

    if emulator.unavailable_reason():
        pytest.skip(emulator.unavailable_reason())
    with emulator.installed() as xp:
        yield xp


# Every kernel test runs once per backend: ``gpu`` (marker ``gpu``, skipped by conftest where there
# is no device) and ``emulated`` (marker ``emulated``: the kernels built for the CPU).
BACKENDS = [pytest.param("gpu", marks=pytest.mark.gpu), pytest.param("emulated", marks=pytest.mark.emulated)]


@contextlib.contextmanager
def on_backend(name: str):
    """The kernels on ``name`` (one of BACKENDS) while inside; yields ``name``."""
    from sparseinfer.kernels import emulator

    with emulator.installed() if name == "emulated" else contextlib.nullcontext():
        yield name


def to_host(a) -> np.ndarray:
    """A device (CuPy) or host array as a NumPy array."""
    return a.get() if hasattr(a, "get") else np.asarray(a)
