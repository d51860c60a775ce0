"""Shared test configuration: Hypothesis profiles, and tests marked ``gpu`` skip with the reason
where CuPy or a CUDA device is missing (the one place that decides)."""
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


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    from sparseinfer.kernels import gpu_unavailable_reason

    reason = gpu_unavailable_reason()
    if reason is None:
        return
    import pytest

    for item in gpu_items:
        item.add_marker(pytest.mark.skip(reason=f"GPU tests skipped: {reason}"))
