"""QuantSparseMLP: one layer's block-quantized MLP weights on the device, called once per token.

Built from ``reference.quant_mlp.QuantizedMLPWeights`` (W_gate and W_up in one block format,
W_down^T in its own, Q8_0 beside Q4_x included; every row d / 32 blocks): the blocks go to the
device as they are (:class:`DeviceBlocks`, never dequantized there as a whole), and W_gate's sign
words are packed on the device from its dequantized weights (``pack_signs_FMT`` v1). It runs a
pipeline of ``QUANT_PIPELINES`` (default ``sparse-FMT``) with :class:`SparseMLP`'s own code:
``mlp(x, alpha)`` returns the output, with ``trace=True`` the reference's ``QuantMLPTrace``.
"""
from __future__ import annotations

from sparseinfer.reference.errors import SparseInferError
from sparseinfer.reference.quant_mlp import QuantizedMLPWeights, QuantMLPTrace

from . import ops
from .device import DeviceBlocks
from .registry import PACK_SIGNS_QUANT, QUANT_PIPELINES
from .sparse_mlp import SparseMLP


class QuantSparseMLP(SparseMLP):
    def __init__(self, weights: QuantizedMLPWeights, activation, pipeline: str | None = None,
                 approximate: bool = False):
        if not isinstance(weights, QuantizedMLPWeights):
            raise SparseInferError(f"QuantSparseMLP takes QuantizedMLPWeights, got {type(weights).__name__}")
        fmt = weights.fmt.name
        self.weight_dtype = fmt
        self.down_format = weights.down_fmt.name
        self.pipeline = self._pipeline(pipeline or f"sparse-{fmt}")
        self.activation = ops.sparse_activation(activation, approximate)
        self.d, self.k = weights.d, weights.k
        self.w_gate = DeviceBlocks.from_host("w_gate", weights.gate, weights.fmt, self.d)
        self.w_up = DeviceBlocks.from_host("w_up", weights.up, weights.fmt, self.d)
        self.w_down_t = DeviceBlocks.from_host("w_down_t", weights.down_t, weights.down_fmt, self.d)
        self.w_signs = PACK_SIGNS_QUANT[fmt]["v1"].run(self.w_gate)
        self._layouts = {}

    def _pipeline(self, name: str):
        ours = [p for p, pipe in QUANT_PIPELINES.items() if pipe.weights == self.weight_dtype]
        if name not in ours:
            raise SparseInferError(f"unknown pipeline {name!r} for {self.weight_dtype} weights; expected one of "
                                   f"{', '.join(ours)}")
        return QUANT_PIPELINES[name]

    def _make_trace(self, **fields) -> QuantMLPTrace:
        return QuantMLPTrace(**fields, down_format=self.down_format)
