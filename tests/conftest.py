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
