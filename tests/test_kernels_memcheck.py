"""The emulated kernels under AddressSanitizer: the CPU's stand-in for compute-sanitizer memcheck.

Each check runs in a subprocess whose emulated kernels are built with -fsanitize=address
and which loads libasan first (``emulator.memcheck_env``). Out-of-bounds or freed-memory
accesses on global (NumPy), ``__shared__`` (static) or local memory end it with an
AddressSanitizer report. compute-sanitizer's memcheck runs on a GPU (benchmarks/README.md;
clean on an H200, 2026-11-26).
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from sparseinfer.kernels import emulator
from sparseinfer.reference.errors import SparseInferError

pytestmark = pytest.mark.emulated

PLANTED_OVERRUN = """
import numpy as np
from sparseinfer.kernels import emulator
with emulator.installed():
    x = np.ones(10, np.float32)                 # told d = 64: lanes 10..63 read past the end
    emulator.kernel("pack_signs_fp32")((1,), (64,), (x, np.zeros(2, np.uint32), np.int32(1), np.int32(64),
                                                     np.int64(64)))
"""


@pytest.fixture(scope="module")
def env():
    try:
        return emulator.memcheck_env()
    except SparseInferError as e:
        pytest.skip(str(e))


def _run(args, env):
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=600)


def test_a_planted_overrun_is_reported(env):
    r = _run(["-c", PLANTED_OVERRUN], env)
    assert r.returncode != 0
    assert "ERROR: AddressSanitizer: heap-buffer-overflow" in r.stderr and "pack_signs_impl" in r.stderr


@pytest.mark.parametrize("d,k", [(1, 37), (33, 97), (97, 600)])
def test_every_kernel_version_is_clean_under_addresssanitizer(env, d, k):
    r = _run(["-m", "sparseinfer.tools.cli", "verify-kernels", "--backend", "emulated", "--d", str(d), "--k", str(k)],
             env)
    assert "ERROR: AddressSanitizer" not in r.stderr, r.stderr[-3000:]
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count(" yes") == len(r.stdout.splitlines()) - 2       # every row verified
