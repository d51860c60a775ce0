"""The neuron-major weight layout: one contiguous record per neuron (a load-time transform).

Record i holds W_gate[i, :], W_up[i, :] and W_down[:, i] (row i of W_down^T) one after
another, each zero-padded to the row stride ``ld`` of :class:`DeviceMatrix` (d rounded up
to 16 bytes), so the three rows an active neuron needs are one contiguous stream of
3 x ld elements instead of three reads from three matrices far apart. The kernels read the
records through three :class:`DeviceMatrix` views with row stride 3 x ld (:func:`record_views`):
every kernel that takes a row stride runs on them unchanged, in the same order contract.
"""
from __future__ import annotations

import numpy as np

from sparseinfer.reference.mlp import check_mlp_inputs

from .device import DeviceMatrix, padded_rows

ROWS_PER_RECORD = ("gate", "up", "down_t")      # the rows of a record, in order


def stack_records(gate, up, down_t, xp=np):
    """[k, 3, ld]: the padded rows [k, ld] of W_gate, W_up and W_down^T interleaved by neuron
    (NumPy, or the device's arrays with ``xp`` = CuPy)."""
    k, ld = gate.shape
    records = xp.empty((k, len(ROWS_PER_RECORD), ld), dtype=gate.dtype)
    for r, rows in enumerate((gate, up, down_t)):
        records[:, r] = rows
    return records


def neuron_major(w_gate, w_up, w_down) -> np.ndarray:
    """The records [k, 3, ld] of a layer given in Hugging Face layouts (w_gate, w_up [k, d],
    w_down [d, k]), in the storage dtype (raw uint16 bits for fp16 and bf16), zero-padded."""
    w_gate, w_up, w_down = (np.asarray(w) for w in (w_gate, w_up, w_down))
    check_mlp_inputs(np.zeros(w_gate.shape[-1], np.float32), w_gate, w_up, w_down)
    return stack_records(*(padded_rows(w) for w in (w_gate, w_up, np.ascontiguousarray(w_down.T))))


def record_views(records, dtype, d: int) -> tuple[DeviceMatrix, DeviceMatrix, DeviceMatrix]:
    """(W_gate, W_up, W_down^T) as matrices [k, d] inside the records [k, 3, ld]: row i of view
    r starts at record i's row r, the row stride is 3 x ld."""
    k, n, ld = records.shape
    flat = records.reshape(-1)
    return tuple(DeviceMatrix(flat[r * ld:], k, d, n * ld, dtype=np.dtype(dtype)) for r in range(n))
