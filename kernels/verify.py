"""Every kernel version and MLP pipeline run once at one shape and checked against the
reference: ``sparseinfer verify-kernels``, and the ``verified`` column of ``sparseinfer bench``.

:class:`Case` builds one (shape, sparsity) once: the layer (``make_layer``, fp16 weights, x
built so that exactly that fraction of gate rows is predicted zero), the reference results
and the device copies. :meth:`Case.check` runs one version and compares what it wrote with
its record's ``reference`` (``registry.py``): bit for bit, or, for a version that is not
``deterministic``, within the rigorous error bound. The versions and pipelines on block-quantized
weights run on the same layer padded to whole blocks and quantized (``verify_quant.py``). It runs
on whichever backend ``cupy()`` gives (a GPU, or the CPU emulation of the kernels).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from sparseinfer.reference import Activation, mlp_dense, mlp_sparse
from sparseinfer.reference.dtypes import parse_dtype
from sparseinfer.reference.shapes import BUILTIN_MODELS
from sparseinfer.reference.signs import alpha_to_milli, pack_signs

from . import ops
from .baseline_check import dense_mlp_verified
from .device import DeviceMatrix, cupy
from .expected import same_bits, within_down_bound
from .registry import (BASELINE, DEFAULT_PIPELINE, DOWN, GATE_UP, PACK_SIGNS, PIPELINES, PREDICT, QUANT_FAMILIES,
                       QUANT_PIPELINES)
from .shapes import BENCH_DTYPE, make_layer
from .sparse_mlp import SparseMLP
from .verify_quant import QuantCase

ALPHA = 1.0

# What each row checks (and the benchmark times), by kernel family; ``mlp``: the pipelines; then the
# families on block-quantized weights (``pack_signs_q4_0``, ...) and their pipelines (``mlp_quant``).
TARGET_FAMILIES = {"mlp": PIPELINES, "pack_signs": PACK_SIGNS, "predict": PREDICT, "gate_up": GATE_UP, "down": DOWN,
                   "baseline": BASELINE, **QUANT_FAMILIES, "mlp_quant": QUANT_PIPELINES}
PIPELINE_TARGETS = ("mlp", "mlp_quant")       # the rows that are whole MLP pipelines (several launches each)


def bench_targets():
    """(kernel, version) of every row of the verifier and the benchmark, from the registry."""
    return [(kernel, version) for kernel, family in TARGET_FAMILIES.items() for version in family]


@dataclass
class Check:
    """One version run once at a case: how to launch it again, and whether it matched the reference."""
    kernel: str
    version: str
    fn: Callable           # launches the kernel(s) once, asynchronously
    verified: bool


class Case:
    """One (shape, sparsity): the layer, the reference results and the device copies, built once
    and shared by every version's check."""

    def __init__(self, shape, sparsity: float, seed: int = 0, log=print):
        cp = cupy()
        self.shape, self.sparsity = shape, sparsity
        self.act = Activation.parse(BUILTIN_MODELS[shape.model].hidden_act)
        layer = self.layer = make_layer(shape.d, shape.k, parse_dtype(BENCH_DTYPE), sparsity, seed)
        self.signs = pack_signs(layer.w_gate), pack_signs(layer.x)
        self.want, self.trace = mlp_sparse(layer.x, layer.w_gate, layer.w_up, layer.w_down, self.act, ALPHA,
                                           w_signs=self.signs[0])
        self.want_dense = mlp_dense(layer.x, layer.w_gate, layer.w_up, layer.w_down, self.act)
        self._wants = {}
        # h3 as the sparse gate_up versions write it: the down versions' input
        self.h3_want = self._want(GATE_UP[PIPELINES[DEFAULT_PIPELINE].gate_up], *self._gate_up_inputs)[1]
        self.w_down_t = np.ascontiguousarray(layer.w_down.T)
        self.alpha_milli = alpha_to_milli(ALPHA)
        log(f"{shape.model} sparsity {sparsity}: predicted {self.trace.predicted_sparsity:.4f}, rows {self.trace.rows}")
        self.mlps = {}
        self.quants = {}                   # block format -> its QuantCase, built when first checked
        self.mlp = self._mlp(DEFAULT_PIPELINE)
        self.x = self.mlp.to_device_x(layer.x)
        self.x_signs = ops.pack_x_signs(self.x)
        self.h3_dev = cp.asarray(self.h3_want)

    @property
    def _gate_up_inputs(self) -> tuple:
        layer = self.layer
        return layer.x, layer.w_gate, layer.w_up, self.act, self.trace.predicted_zero

    def _want(self, version, *inputs):
        """``version.reference(*inputs)``, computed once per family and reference function (the
        inputs of one family are the same at one case)."""
        key = (version.family, version.reference)
        if key not in self._wants:
            self._wants[key] = version.reference(*inputs)
        return self._wants[key]

    def _mlp(self, pipeline: str) -> SparseMLP:
        """The layer under ``pipeline``; one upload of the weights, shared by every pipeline."""
        if pipeline not in self.mlps:
            if self.mlps:
                self.mlps[pipeline] = next(iter(self.mlps.values())).with_pipeline(pipeline)
            else:
                layer = self.layer
                self.mlps[pipeline] = SparseMLP(layer.w_gate, layer.w_up, layer.w_down, self.act, pipeline=pipeline)
        return self.mlps[pipeline]

    def quant(self, fmt: str) -> QuantCase:
        """The layer padded to whole blocks and quantized to ``fmt``, with its references (built once)."""
        if fmt not in self.quants:
            self.quants[fmt] = QuantCase(self.layer, self.act, self.alpha_milli, fmt)
        return self.quants[fmt]

    def touched(self, kernel: str, version: str) -> int:
        """Bytes ``version`` of ``kernel`` (or a pipeline) touches at this shape, from its record:
        the rows this case's trace reads (a dense version reads every row whatever they are); a
        quantized one's at its padded d, its format's blocks, its own trace's rows."""
        target = TARGET_FAMILIES[kernel][version]
        if target.weights:
            return self.quant(target.weights).touched(target)
        return target.touched(self.shape.d, self.shape.k, BENCH_DTYPE, self.trace.rows)

    def pipeline_verified(self, pipe, got) -> bool:
        """A pipeline's output (host) against the reference: bits, or the atomic bound."""
        if not pipe.sparse:
            return same_bits(got, self.want_dense)
        if pipe.deterministic:
            return same_bits(got, self.want)
        return bool(within_down_bound(got, self.h3_want, self.w_down_t).all())

    def check(self, kernel: str, version: str) -> Check:
        """Run ``version`` of ``kernel`` once, verify it against the reference at this shape."""
        shape, am, layer = self.shape, self.alpha_milli, self.layer
        x, x_signs = self.x, self.x_signs
        if kernel not in TARGET_FAMILIES:
            raise ValueError(f"unknown benchmark kernel {kernel!r}; expected one of {', '.join(TARGET_FAMILIES)}")
        if kernel == "mlp":
            pipe, mlp = PIPELINES[version], self._mlp(version)
            verified = self.pipeline_verified(pipe, mlp.steps(x, am)[3].get())
            return Check(kernel, version, lambda: mlp.steps(x, am), verified)
        if kernel == "mlp_quant":
            return Check(kernel, version, *self.quant(QUANT_PIPELINES[version].weights).check_pipeline(version))
        v = TARGET_FAMILIES[kernel][version]
        if v.weights:
            return Check(kernel, version, *self.quant(v.weights).check(v))
        if kernel == "pack_signs":        # the per-token packing of x, as a 1-row matrix
            x_row = DeviceMatrix(x, 1, shape.d, shape.d, dtype=np.dtype(np.float32))
            verified = np.array_equal(v.run(x_row).get()[0], self._want(v, layer.x))
            return Check(kernel, version, lambda: v.run(x_row), verified)
        if kernel == "predict":
            w_signs = self.mlp.w_signs
            zero = v.run(w_signs, x_signs, shape.d, am)[1]
            verified = np.array_equal(zero.get().astype(bool), self._want(v, *self.signs, shape.d, am))
            return Check(kernel, version, lambda: v.run(w_signs, x_signs, shape.d, am), verified)
        if kernel == "gate_up":
            mlp = self.mlp
            h3 = v.run(mlp, x, x_signs, am)[1].get()
            verified = same_bits(h3, self._want(v, *self._gate_up_inputs)[1])
            return Check(kernel, version, lambda: v.run(mlp, x, x_signs, am), verified)
        if kernel == "down":
            h3, wt = self.h3_dev, self.mlp.w_down_t
            got = v.run(h3, wt).get()
            verified = (same_bits(got, self._want(v, self.h3_want, self.w_down_t)) if v.deterministic
                        else bool(within_down_bound(got, self.h3_want, self.w_down_t).all()))
            return Check(kernel, version, lambda: v.run(h3, wt), verified)
        # baseline: the strong dense MLP, W_down in the HF layout (its own upload)
        mlp, w_down = self.mlp, self._w_down_dense()
        h1, h3, out = (a.get() for a in v.run(x, mlp.w_gate, mlp.w_up, w_down, self.act))
        verified = (same_bits(out, self._want(v, layer.x, layer.w_gate, layer.w_up, layer.w_down, self.act))
                    if v.deterministic else
                    dense_mlp_verified(h1, h3, out, layer.x, layer.w_gate, layer.w_up, self.w_down_t, self.act))
        return Check(kernel, version, lambda: v.run(x, mlp.w_gate, mlp.w_up, w_down, self.act), verified)

    def _w_down_dense(self) -> DeviceMatrix:
        """W_down [d, k] (Hugging Face layout) on the device, for the strong dense baseline."""
        if getattr(self, "_w_down_dev", None) is None:
            self._w_down_dev = DeviceMatrix.from_host("w_down", self.layer.w_down, check_nan=False)
        return self._w_down_dev


def verify_case(shape, sparsity: float, seed: int = 0, log=print) -> list[dict]:
    """Every version and pipeline run once at ``shape`` and checked against the reference; no timing."""
    case = Case(shape, sparsity, seed, log)
    rows = []
    for kernel, version in bench_targets():
        verified = case.check(kernel, version).verified
        rows.append({"kernel": kernel, "version": version, "model": shape.model, "d": shape.d, "k": shape.k,
                     "sparsity": sparsity, "verified": verified})
        log(f"  {kernel} {version}: {'verified' if verified else 'MISMATCH'}")
    return rows


def verify_on_backend(backend: str, model: str, d: int | None, k: int | None, sparsity: float, seed: int = 0,
                      log=print) -> tuple[str, list[dict]]:
    """``sparseinfer verify-kernels``: (the backend used, ``verify_case``'s rows, each naming it).

    ``backend``: gpu (CuPy on a CUDA device), emulated (the CUDA sources compiled for the CPU,
    ``emulator``) or auto (gpu where there is one). ``model`` gives the activation, and the
    shape unless ``d`` / ``k`` are given. ``log`` gets a header and a line per version."""
    import contextlib

    from . import device, emulator
    from .shapes import BENCH_SHAPES, BenchShape

    use = backend
    if backend != "emulated":
        reason = device.gpu_unavailable_reason()
        if backend == "gpu" and reason:
            raise device.GpuUnavailable(f"--backend gpu needs a CUDA GPU: {reason}")
        use = "gpu" if reason is None else "emulated"
    ref = next(s for s in BENCH_SHAPES if s.model == model)
    shape = BenchShape(model, d or ref.d, k or ref.k)
    log(f"backend {use}: {model} activation, d {shape.d}, k {shape.k}, sparsity {sparsity}")
    with emulator.installed() if use == "emulated" else contextlib.nullcontext():
        rows = verify_case(shape, sparsity, seed, log=log)
    for r in rows:
        r["backend"] = use
    return use, rows
