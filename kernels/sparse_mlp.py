"""SparseMLP: one layer's weights on the device, called once per token.

Built once from Hugging Face layouts (w_gate, w_up [k, d]; w_down [d, k]): checks them on
the host, packs W_gate's sign words, transposes W_down to [k, d] and keeps everything on
the device. A pipeline on the neuron-major layout (``layout.py``) reads a second copy, the
records built on the device at its first call and shared by every pipeline of the layer.
``mlp(x, alpha)`` returns the output (a CuPy float32 [d]) and, with ``trace=True``, the
reference's :class:`MLPTrace` (mode ``predicted+actual``).
"""
from __future__ import annotations

import copy
import dataclasses

import numpy as np

from sparseinfer.reference.dtypes import WEIGHT_DTYPES, check_no_nan, dtype_name
from sparseinfer.reference.errors import SparseInferError
from sparseinfer.reference.mlp import MLPTrace, check_mlp_inputs
from sparseinfer.reference.signs import alpha_to_milli

from . import layout, ops
from .device import DeviceMatrix, cupy
from .registry import DEFAULT_PIPELINE, FAMILIES, MLP_FUSED, PIPELINES


class SparseMLP:
    down_format = ""                # the block format of W_down^T ("": float, the layer's dtype)

    def __init__(self, w_gate, w_up, w_down, activation, pipeline: str = DEFAULT_PIPELINE, approximate: bool = False):
        self.pipeline = self._pipeline(pipeline)
        self.activation = ops.sparse_activation(activation, approximate)
        w_gate, w_up, w_down = (np.asarray(w) for w in (w_gate, w_up, w_down))
        if w_gate.ndim != 2:
            raise SparseInferError(f"w_gate has shape {w_gate.shape}; expected [k, d]")
        _, self.d, self.k = check_mlp_inputs(np.zeros(w_gate.shape[1], np.float32), w_gate, w_up, w_down)
        # the one NaN check of the weights: here, on the host, in the HF layout (so a NaN in
        # w_down is reported at its [d, k] index, not at the transposed upload's)
        for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
            check_no_nan(name, w)
        self.weight_dtype = dtype_name(w_gate.dtype)
        self.w_gate = DeviceMatrix.from_host("w_gate", w_gate, WEIGHT_DTYPES, check_nan=False)
        self.w_up = DeviceMatrix.from_host("w_up", w_up, WEIGHT_DTYPES, check_nan=False)
        self.w_down_t = DeviceMatrix.from_host("w_down^T", np.ascontiguousarray(w_down.T), WEIGHT_DTYPES,
                                               check_nan=False)
        self.w_signs = ops.pack_signs(self.w_gate)
        self._layouts = {}              # layout -> this layer on it; shared by with_pipeline's copies

    def _pipeline(self, name: str):
        """The record of pipeline ``name`` among those that run this layer's weights."""
        if name not in PIPELINES:
            raise SparseInferError(f"unknown pipeline {name!r}; expected one of {', '.join(PIPELINES)}")
        return PIPELINES[name]

    def with_pipeline(self, pipeline: str) -> "SparseMLP":
        """The same layer run by another pipeline, sharing this one's device weights (no copy)."""
        other = copy.copy(self)
        other.pipeline = self._pipeline(pipeline)
        return other

    def clone(self) -> "SparseMLP":
        """A copy of this layer in new device memory (a stand-in for another layer of the same
        shape and weights: benchmarks over several layers read distinct bytes, as a decode step does)."""
        other = copy.copy(self)
        for name in ("w_gate", "w_up", "w_down_t"):
            setattr(other, name, dataclasses.replace(getattr(self, name), data=getattr(self, name).data.copy()))
        other.w_signs = self.w_signs.copy()
        other._layouts = {}
        return other

    def in_layout(self, name: str) -> "SparseMLP":
        """This layer with w_gate, w_up and w_down_t read from layout ``name`` (built once)."""
        if name == "row-major":
            return self
        if name not in self._layouts:
            records = layout.stack_records(self.w_gate.data, self.w_up.data, self.w_down_t.data, cupy())
            view = copy.copy(self)
            view.w_gate, view.w_up, view.w_down_t = layout.record_views(records, self.w_gate.dtype, self.d)
            self._layouts[name] = view
        return self._layouts[name]

    def to_device_x(self, x, check: bool = True):
        """x as a float32 CuPy vector [d]; with ``check``, NaN is an error (one device sync)."""
        cp = cupy()
        x = cp.ascontiguousarray(cp.asarray(x))
        ops.check_vector("x", x, self.d)
        if check and bool(cp.isnan(x).any()):
            first = int(cp.argmax(cp.isnan(x)))
            raise SparseInferError(f"x contains NaN at index {first}")
        return x

    def steps(self, x, alpha_milli: int):
        """(h1, h3, zero | None, out) of this pipeline; x already on the device."""
        pipe, mlp = self.pipeline, self.in_layout(self.pipeline.layout)
        x_signs = ops.pack_x_signs(x)
        if pipe.fused:
            return MLP_FUSED[pipe.fused].run(mlp, x, x_signs, alpha_milli)
        h1, h3, zero = pipe.gate_up_version().run(mlp, x, x_signs, alpha_milli)
        out = pipe.down_version(self.down_format).run(h3, mlp.w_down_t)
        return h1, h3, zero, out

    def __call__(self, x, alpha=1.0, trace: bool = False, check: bool = True):
        alpha_milli = alpha_to_milli(alpha)
        x = self.to_device_x(x, check)
        h1, _, zero, out = self.steps(x, alpha_milli)
        if not trace:
            return out
        return out, self._trace(x, alpha_milli, h1, zero)

    def _trace(self, x, alpha_milli, h1, zero) -> MLPTrace:
        if zero is None:
            raise SparseInferError(f"pipeline {self.pipeline.name} is dense; a trace needs a sparse pipeline")
        dense = FAMILIES[self.pipeline.gate_up_version().family]["dense"]
        h1_all = dense.run(self, x, None, alpha_milli)[0]                                # the full gate
        predicted_zero = zero.get().astype(bool)
        computed_up = ~predicted_zero & (h1.get() != 0)
        # without exact zeros, the rows whose gate is negative (reference.mlp.mlp_sparse): h1's
        # sign bit, since a warp sum from +0.0 is never -0.0 and these activations keep the sign
        h1_all = h1_all.get()
        actual_zero = h1_all == 0 if self.activation.sparse_capable else np.signbit(h1_all)
        return self._make_trace(mode="predicted+actual", d=self.d, k=self.k, weight_dtype=self.weight_dtype,
                                alpha_milli=alpha_milli, predicted_zero=predicted_zero, actual_zero=actual_zero,
                                computed_gate=~predicted_zero, computed_up=computed_up,
                                computed_down=computed_up.copy())

    def _make_trace(self, **fields) -> MLPTrace:
        return MLPTrace(**fields)
