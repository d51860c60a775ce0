"""CUDA kernels of SparseInfer, compiled through CuPy (NVRTC) and launched from Python.

Importing this package never imports CuPy or needs a GPU; the first kernel launch does.
Sources: ``cuda/*.cu``; versions: :mod:`.registry`, one record each (launches, reference,
bytes touched: :mod:`.traffic`); the layer object: :class:`SparseMLP`, and on block-quantized
weights (Q8_0, Q4_0, Q4_1; ``cuda/quant.cu``) :class:`QuantSparseMLP`; every version checked
against its reference: :mod:`.verify`; the CPU compile gate: :mod:`.compile_check`; the same
sources run on the CPU: :mod:`.emulator` (tests). The onnxruntime op library
(``model_export/native``) runs the same sources on the CUDA provider.
"""
from .device import DeviceBlocks, DeviceMatrix, GpuUnavailable, gpu_unavailable_reason
from .quant_sparse_mlp import QuantSparseMLP
from .registry import (BASELINE, DEFAULT_PIPELINE, DOWN, DOWN_QUANT, FAMILIES, GATE_UP, GATE_UP_QUANT, MLP_FUSED,
                       PACK_SIGNS, PACK_SIGNS_QUANT, PIPELINES, PREDICT, QUANT_PIPELINES)
from .sparse_mlp import SparseMLP

__all__ = ["BASELINE", "DeviceBlocks", "DeviceMatrix", "GpuUnavailable", "gpu_unavailable_reason", "DEFAULT_PIPELINE",
           "DOWN", "DOWN_QUANT", "FAMILIES", "GATE_UP", "GATE_UP_QUANT", "MLP_FUSED", "PACK_SIGNS", "PACK_SIGNS_QUANT",
           "PIPELINES", "PREDICT", "QUANT_PIPELINES", "QuantSparseMLP", "SparseMLP"]
