"""Shared test configuration: Hypothesis profiles and the GPU marker."""
from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

# quick: what CI runs (the whole CPU suite well under 10 minutes on 2 cores)
settings.register_profile("ci", max_examples=40, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
# thorough: long manual runs, HYPOTHESIS_PROFILE=thorough pytest
settings.register_profile("thorough", max_examples=2000, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def gpu_unavailable_reason():
    """None when CuPy sees a CUDA device, else why not (one line)."""
    try:
        import cupy
    except Exception as e:  # ImportError, or a broken CUDA install
        return f"CuPy is not importable ({type(e).__name__}: {e})".splitlines()[0]
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        return f"no CUDA device ({type(e).__name__}: {e})".splitlines()[0]
    return None if n > 0 else "no CUDA device (device count 0)"


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    reason = gpu_unavailable_reason()
    if reason is None:
        return
    import pytest

    for item in gpu_items:
        item.add_marker(pytest.mark.skip(reason=f"gpu test skipped: {reason}"))
