"""The verifier's case on block-quantized weights: one format's versions and pipelines checked
against ``reference.quant_mlp`` (``verify.Case`` hands them here).

The case's float layer is zero-padded to whole blocks (d rounded up to a multiple of 32: x and
the weights get zero columns, W_down zero rows; the reference refuses a partial block), then
quantized to the format, W_down^T included (``QuantizedMLPWeights.quantize``). Every version
and pipeline must write the reference's bits on those weights. A case keeps the blocks and the
references' results, not the dequantized weights (at the 13B shape 850 MB a format).
"""
from __future__ import annotations

import functools

import numpy as np

from sparseinfer.reference.block_quant import BLOCK
from sparseinfer.reference.quant_mlp import QuantizedMLPWeights, mlp_dense_quant, mlp_sparse_quant

from . import ops
from .expected import same_bits
from .quant_sparse_mlp import QuantSparseMLP
from .registry import PACK_SIGNS_QUANT, QUANT_FAMILIES, QUANT_PIPELINES


def padded_to_blocks(layer) -> tuple:
    """(x, w_gate, w_up, w_down) of ``layer`` with d zero-padded to a multiple of 32."""
    d = layer.x.shape[0]
    pad = -d % BLOCK
    columns = ((0, 0), (0, pad))
    return (np.pad(layer.x, (0, pad)), np.pad(layer.w_gate, columns), np.pad(layer.w_up, columns),
            np.pad(layer.w_down, ((0, pad), (0, 0))))


class _DequantizedOnce(QuantizedMLPWeights):
    """The weights with their dequantized values computed once (every reference asks for them)
    until :meth:`forget`."""

    @functools.cached_property
    def _values(self):
        return super().dequantized()

    def dequantized(self):
        return self._values

    def forget(self) -> None:
        self.__dict__.pop("_values", None)


class QuantCase:
    """One format at a verifier's case: the quantized layer, what each of the format's versions and
    pipelines must write (computed once, on the dequantized weights, which are then dropped) and
    the device copies."""

    def __init__(self, layer, act, alpha_milli: int, fmt: str):
        cp = ops.cupy()
        x, w_gate, w_up, w_down = padded_to_blocks(layer)
        self.fmt, self.act, self.alpha_milli, self.x_host = fmt, act, alpha_milli, x
        self.d = x.shape[0]
        self.weights = weights = _DequantizedOnce.quantize(w_gate, w_up, w_down, fmt)
        self.want, self.trace = mlp_sparse_quant(x, weights, act, alpha_milli / 1000)
        self.want_dense = mlp_dense_quant(x, weights, act)
        self.mlp = QuantSparseMLP(weights, act)
        self.x = self.mlp.to_device_x(x)
        self.x_signs = ops.pack_x_signs(self.x)
        # h3 as the sparse gate_up versions write it: the down versions' input
        self.h3_want = self.mlp.pipeline.gate_up_version().reference(x, weights, act, self.trace.predicted_zero)[1]
        self.h3_dev = cp.asarray(self.h3_want)
        self._wants = {}
        for step in ("pack_signs", "gate_up", "down"):
            for v in QUANT_FAMILIES[f"{step}_{fmt}"].values():
                self._want(v)
        weights.forget()
        self._mlps = {}

    def _want(self, v):
        """What version ``v`` must write (its reference on this case's inputs), once per reference."""
        key = (v.step, v.reference)
        if key not in self._wants:
            if v.step == "pack_signs":
                self._wants[key] = v.reference(self.weights.gate, self.fmt, self.d)
            elif v.step == "gate_up":
                self._wants[key] = v.reference(self.x_host, self.weights, self.act, self.trace.predicted_zero)[1]
            else:
                self._wants[key] = v.reference(self.h3_want, self.weights)
        return self._wants[key]

    def _mlp(self, pipeline: str) -> QuantSparseMLP:
        """The layer under ``pipeline``, sharing one upload of the weights."""
        if pipeline not in self._mlps:
            self._mlps[pipeline] = self.mlp.with_pipeline(pipeline)
        return self._mlps[pipeline]

    def pipeline_verified(self, pipe, got) -> bool:
        return same_bits(got, self.want if pipe.sparse else self.want_dense)

    def check(self, v) -> tuple:
        """(a function that launches version ``v`` of this format again, whether it matched)."""
        mlp, am = self.mlp, self.alpha_milli
        if v.step == "pack_signs":
            # QuantSparseMLP packed its sign words with pack_signs v1 at load time: those are v1's
            words = mlp.w_signs if v is PACK_SIGNS_QUANT[self.fmt]["v1"] else v.run(mlp.w_gate)
            return (lambda: v.run(mlp.w_gate)), np.array_equal(words.get(), self._want(v))
        if v.step == "gate_up":
            h3 = v.run(mlp, self.x, self.x_signs, am)[1].get()
            return (lambda: v.run(mlp, self.x, self.x_signs, am)), same_bits(h3, self._want(v))
        got = v.run(self.h3_dev, mlp.w_down_t).get()
        return (lambda: v.run(self.h3_dev, mlp.w_down_t)), same_bits(got, self._want(v))

    def check_pipeline(self, name: str) -> tuple:
        """(a function that runs pipeline ``name`` again, whether its output matched)."""
        mlp, x, am = self._mlp(name), self.x, self.alpha_milli
        verified = self.pipeline_verified(QUANT_PIPELINES[name], mlp.steps(x, am)[3].get())
        return (lambda: mlp.steps(x, am)), verified

    def touched(self, target) -> int:
        """Bytes ``target`` (a version of this format, or a quantized pipeline) touches here."""
        return target.touched(self.d, self.weights.k, self.fmt, self.trace.rows)
