"""The emulator's stand-in for what a GPU enforces: the rules of a CUDA graph recording
(kernels/graph.py; the replays' outputs are checked per pipeline in test_kernels_gpu.py)
and the launch limits."""
from __future__ import annotations

import numpy as np
import pytest

from sparseinfer.kernels import emulator, ops
from sparseinfer.kernels.graph import MLPGraph, capture
from sparseinfer.reference.errors import SparseInferError
from sparseinfer.reference.signs import pack_signs

pytestmark = pytest.mark.emulated


def test_a_recording_runs_nothing_until_replayed_and_then_every_time():
    x = np.random.default_rng(0).standard_normal(70).astype(np.float32)
    with emulator.installed() as xp:
        dx = xp.asarray(x)
        got = capture(lambda: (ops.pack_x_signs(dx), xp.zeros(5, dtype=np.float32)))
        words, zeros = got.result
        # warm-up ran before the recording; the recorded buffers hold garbage until a replay
        assert (words.view(np.uint8) == emulator._UNWRITTEN).all() and (zeros.view(np.uint8) == emulator._UNWRITTEN).all()
        got.replay()
        assert np.array_equal(words, pack_signs(x)) and not zeros.any()
        dx[...] = -dx                       # new input in the same buffer: the replay sees it
        zeros[:] = 7
        got.replay()
        assert np.array_equal(words, pack_signs(-x)) and not zeros.any()


def test_reading_the_device_during_capture_is_an_error_and_ends_the_recording():
    with emulator.installed() as xp:
        dx = xp.asarray(np.ones(40, np.float32))
        with pytest.raises(SparseInferError, match=r"device-to-host copy \(.get\(\)\) during CUDA graph capture"):
            capture(lambda: ops.pack_x_signs(dx).get())
        assert emulator._recording is None
        assert ops.pack_x_signs(dx).get().tolist() == [0, 0]     # eager launches run again


def test_an_empty_graph_is_refused():
    with emulator.installed():
        with pytest.raises(SparseInferError, match="MLPGraph needs at least one layer"):
            MLPGraph([])


def test_launches_a_gpu_would_refuse_are_refused():
    with emulator.installed() as xp:
        words, x = xp.empty(1, dtype=np.uint32), xp.asarray(np.ones(5, np.float32))
        args = (x, words, np.int32(1), np.int32(5), np.int64(5))
        k = emulator.kernel("pack_signs_fp32")
        for grid, block in (((0,), (32,)), ((1,), (2048,)), ((1, 70000), (32,)), ((1,), (0,))):
            with pytest.raises(SparseInferError, match="pack_signs_fp32: invalid launch configuration"):
                k(grid, block, args)
        k((1,), (32,), args)
        assert words.tolist() == [0]
