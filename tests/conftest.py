"""Shared test configuration: Hypothesis profiles; tests marked ``gpu`` skip with the reason
where CuPy or a CUDA device is missing, tests marked ``emulated`` where g++ is, tests marked ``native`` where the op library
cannot be built (no g++, or onnxruntime's headers out of reach), tests marked ``ort_cuda`` where
onnxruntime has no CUDA execution provider; the one place that decides."""
from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

# quick: what CI runs (the whole CPU suite in about 3-4 minutes on 2 cores, 2 of them the emulated kernels)
settings.register_profile("ci", max_examples=40, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
# sanitizer: the GPU tests under compute-sanitizer (benchmarks/gpu_check.py), a few examples each
settings.register_profile("sanitizer", max_examples=3, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
# thorough: long manual runs, HYPOTHESIS_PROFILE=thorough pytest
settings.register_profile("thorough", max_examples=2000, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _skip_marked(items, marker: str, reason_of, label: str) -> None:
    marked = [item for item in items if marker in item.keywords]
    if not marked:
        return
    reason = reason_of()
    if reason is None:
        return
    import pytest

    for item in marked:
        item.add_marker(pytest.mark.skip(reason=f"{label} skipped: {reason}"))


def pytest_collection_modifyitems(config, items):
    from sparseinfer.kernels import gpu_unavailable_reason
    from sparseinfer.kernels.emulator import unavailable_reason as emulator_unavailable_reason
    from sparseinfer.model_export.op_library import unavailable_reason as native_unavailable_reason

    _skip_marked(items, "gpu", gpu_unavailable_reason, "GPU tests")
    _skip_marked(items, "emulated", emulator_unavailable_reason, "emulated-kernel tests")
    _skip_marked(items, "native", native_unavailable_reason, "op-library tests")
    _skip_marked(items, "ort_cuda", _ort_cuda_unavailable_reason, "onnxruntime CUDA tests")


def _ort_cuda_unavailable_reason() -> str | None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        return None
    return f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (install onnxruntime-gpu on a CUDA machine)"
