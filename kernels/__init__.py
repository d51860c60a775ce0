"""CUDA kernels of SparseInfer, compiled through CuPy (NVRTC) and launched from Python.

Importing this package never imports CuPy or needs a GPU; the first kernel launch does.
Sources: ``cuda/*.cu``; versions: :mod:`.registry`, one record each (launches, reference,
bytes touched: :mod:`.traffic`); the layer object: :class:`SparseMLP`; every version checked
against its reference: :mod:`.verify`; the CPU compile gate: :mod:`.compile_check`; the same
sources run on the CPU: :mod:`.emulator` (tests). The onnxruntime op library
(``model_export/native``) runs the same sources on the CUDA provider.
"""
from .device import DeviceMatrix, GpuUnavailable, gpu_unavailable_reason
from .registry import (BASELINE, DEFAULT_PIPELINE, DOWN, FAMILIES, GATE_UP, MLP_FUSED, PACK_SIGNS, PIPELINES,
                       PREDICT)
from .sparse_mlp import SparseMLP

__all__ = ["BASELINE", "DeviceMatrix", "GpuUnavailable", "gpu_unavailable_reason", "DEFAULT_PIPELINE", "DOWN", "FAMILIES",
           "GATE_UP", "MLP_FUSED", "PACK_SIGNS", "PIPELINES", "PREDICT", "SparseMLP"]
