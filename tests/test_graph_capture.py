"""The rules of a CUDA graph recording, on the emulator's stand-in (kernels/graph.py): the
replays' outputs themselves are checked per pipeline in test_kernels_gpu.py."""
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
