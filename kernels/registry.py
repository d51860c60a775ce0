"""The kernel versions, by family, each with a one-line description.

Tests and benchmarks iterate over these dictionaries, so a new version is one kernel in
``cuda/`` plus one entry here. Every ``run`` of a family has the same signature:

* ``pack_signs``: run(matrix: DeviceMatrix) -> words [rows, ceil(cols/32)]
* ``predict``:    run(w_signs, x_signs, d, alpha_milli) -> (counts, zero, active | None, n_active | None)
* ``gate_up``:    run(mlp: SparseMLP, x, x_signs, alpha_milli) -> (h1, h3, zero | None)
* ``down``:       run(h3, w_down_t: DeviceMatrix) -> out
* ``mlp_fused``:  run(mlp: SparseMLP, x, x_signs, alpha_milli) -> (h1, h3, zero, out): the whole MLP in one launch
* ``mlp``:        a gate_up version and a down version run in sequence, or an mlp_fused version
  (``SparseMLP``), on the weights in row-major or neuron-major layout (``layout.py``)
* ``baseline``:   run(x, w_gate, w_up, w_down [d, k], activation) -> (h1, h3, out): the strong dense
  baseline (not a sparse version; ``deterministic`` False: out is checked against the rigorous bound)
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

from . import ops


@dataclass(frozen=True)
class Version:
    family: str
    name: str
    description: str
    deterministic: bool          # bit-exact against the reference (else: rigorous error bound)
    run: Callable


def _family(family: str, *entries) -> dict:
    return {name: Version(family, name, desc, det, run) for name, desc, det, run in entries}


def _predict_mask(w_signs, x_signs, d, alpha_milli, vector_loads=False, multi_row=False):
    return (*ops.predict(w_signs, x_signs, d, alpha_milli, vector_loads, multi_row), None, None)


def _predict_v2(w_signs, x_signs, d, alpha_milli):
    counts, zero = ops.predict(w_signs, x_signs, d, alpha_milli)
    return (counts, zero, *ops.compact_active(zero))


def _gate_up_mask(mlp, x, x_signs, alpha_milli):
    _, zero = ops.predict(mlp.w_signs, x_signs, mlp.d, alpha_milli)
    return (*ops.gate_up_mask(x, mlp.w_gate, mlp.w_up, mlp.activation, zero), zero)


def _gate_up_list(mlp, x, x_signs, alpha_milli):
    _, zero = ops.predict(mlp.w_signs, x_signs, mlp.d, alpha_milli)
    active, n_active = ops.compact_active(zero)
    return (*ops.gate_up_list(x, mlp.w_gate, mlp.w_up, mlp.activation, active, n_active), zero)


def _gate_up_fused(mlp, x, x_signs, alpha_milli, kind="fused"):
    _, zero, h1, h3 = ops.gate_up_fused(x, x_signs, mlp.w_signs, mlp.w_gate, mlp.w_up, mlp.activation, alpha_milli,
                                        kind=kind)
    return h1, h3, zero


def _gate_up_dense(mlp, x, x_signs, alpha_milli):
    return (*ops.gate_up_mask(x, mlp.w_gate, mlp.w_up, mlp.activation, None), None)


PACK_SIGNS = _family(
    "pack_signs",
    ("v1", "warp per 32-element word, __ballot_sync packs the 32 sign bits", True, ops.pack_signs),
)

PREDICT = _family(
    "predict",
    ("v1", "warp per row: XOR + __popc + butterfly sum, eq. 2 in thousandths; counts and zero mask", True,
     _predict_mask),
    ("v2", "v1, then one block compacts the active rows into an ascending list (ballot prefix)", True, _predict_v2),
    ("v3", "v1 reading the sign words 16 bytes per lane where aligned (as the fused gate+up does)", True,
     functools.partial(_predict_mask, vector_loads=True)),
    ("v4", "4 rows per warp (8 lanes each), every 16-byte quad of sign words a lane reads loaded before any is "
           "counted (13B: one round trip per row)", True, functools.partial(_predict_mask, multi_row=True)),
)

GATE_UP = _family(
    "gate_up",
    ("v1_mask", "predict, then warp per row over all k rows; predicted-zero rows write 0, h1 == 0 skips up (+AS)",
     True, _gate_up_mask),
    ("v2_list", "predict + compaction, then warps only over the ascending active list (+AS)", True, _gate_up_list),
    ("v3_fused", "predict + gate + up in one launch, warp per row (+AS)", True, _gate_up_fused),
    ("v4_persistent", "v3 on a grid resident at once, warps striding over rows; 8 weight chunks per lane "
                      "loaded before they are added (+AS)", True, functools.partial(_gate_up_fused, kind="persistent")),
    ("v5_batched", "v3 (warp per row) with v4's loads: 8 weight chunks per lane in flight before they are added "
                   "(+AS)", True, functools.partial(_gate_up_fused, kind="batched")),
    ("v6_paired", "v5 with the gate and up rows read together: 6 chunks of each per lane in flight, one series "
                  "of round trips for both (reads the up row of every predicted-active row; +AS in the result)",
     True, functools.partial(_gate_up_fused, kind="paired")),
    ("dense", "same warp-per-row structure, every gate and up row (the kernel-quality baseline)", True,
     _gate_up_dense),
)

DOWN = _family(
    "down",
    ("v1_chunks", "deterministic: per chunk of rows an ascending list of h3 != 0 rows, partials, chunks added "
                  "in order", True, lambda h3, wt: ops.down_chunks(h3, wt)),
    ("v4_batched", "v1 with each thread loading 8 rows' weights before it adds them (more loads in flight)",
     True, lambda h3, wt: ops.down_chunks(h3, wt, batched=True)),
    ("v5_narrow", "v4 on column tiles of 64 threads instead of 128: twice the blocks per chunk, 256 threads each "
                  "(more blocks in flight; the same order per column)", True,
     lambda h3, wt: ops.down_chunks(h3, wt, narrow=True)),
    ("v3_serial", "v1 in one launch: the last block of each column tile (threadfence + counter) adds the "
                  "chunks' partials in order", True, lambda h3, wt: ops.down_chunks_serial(h3, wt)),
    ("v2_atomic", "order free (paper): split-K over row groups skipping h3 == 0, one atomicAdd per column per block",
     False, lambda h3, wt: ops.down_atomic(h3, wt)),
    ("dense", "v1's structure reading every row (the kernel-quality baseline)", True,
     lambda h3, wt: ops.down_chunks(h3, wt, dense=True)),
)


def _mlp_fused(mlp, x, x_signs, alpha_milli):
    return ops.mlp_fused(x, x_signs, mlp.w_signs, mlp.w_gate, mlp.w_up, mlp.w_down_t, mlp.activation, alpha_milli)


MLP_FUSED = _family(
    "mlp_fused",
    ("v1", "persistent blocks over the down projection's sub-chunks: warp per neuron predicts, reads gate and up "
           "together (v6), then the block adds the W_down^T rows of its h3 != 0 neurons; the last part of a chunk "
           "and the last chunk add the partials in order (+AS)", True, _mlp_fused),
)

BASELINE = _family(
    "baseline",
    ("dense-gemv", "strong dense fp16 MLP: two bandwidth-tuned GEMVs (warp per neuron with gate and up chunks in "
                   "flight together; warp per row of W_down [d, k], 8 chunks per lane in flight), no partials",
     False, ops.dense_gemv_mlp),
)

FAMILIES = {"pack_signs": PACK_SIGNS, "predict": PREDICT, "gate_up": GATE_UP, "down": DOWN, "mlp_fused": MLP_FUSED,
            "baseline": BASELINE}
LAYOUTS = ("row-major", "neuron-major")


@dataclass(frozen=True)
class Pipeline:
    """``gate_up`` then ``down``; or, with ``fused``, that mlp_fused version alone, ``gate_up`` and
    ``down`` then naming the separate versions that read the same rows (its bytes and trace).
    ``layout``: the weights it reads (one of LAYOUTS)."""
    name: str
    gate_up: str
    down: str
    description: str
    layout: str = "row-major"
    fused: str = ""

    @property
    def deterministic(self) -> bool:
        if self.fused:
            return MLP_FUSED[self.fused].deterministic
        return GATE_UP[self.gate_up].deterministic and DOWN[self.down].deterministic

    @property
    def sparse(self) -> bool:
        return self.gate_up != "dense"


PIPELINES = {p.name: p for p in (
    Pipeline("sparse-fused", "v3_fused", "v1_chunks", "fused predict+gate+up, deterministic down"),
    Pipeline("sparse-mask", "v1_mask", "v1_chunks", "predict kernel, masked gate+up, deterministic down"),
    Pipeline("sparse-list", "v2_list", "v1_chunks", "predict + compaction, list gate+up, deterministic down"),
    Pipeline("sparse-persistent", "v4_persistent", "v3_serial",
             "persistent fused predict+gate+up, one-launch deterministic down"),
    Pipeline("sparse-batched", "v5_batched", "v4_batched", "fused predict+gate+up and deterministic down, each "
             "with 8 loads in flight per lane/thread (default: the fastest measured, H200 2026-11-26)"),
    Pipeline("sparse-paired", "v6_paired", "v5_narrow", "fused predict+gate+up with gate and up loads in flight "
             "together, deterministic down on narrow column tiles (candidate)"),
    Pipeline("sparse-neuron-major", "v6_paired", "v5_narrow", "sparse-paired on the neuron-major layout: a neuron's "
             "gate, up and W_down^T rows one contiguous record (candidate)", layout="neuron-major"),
    Pipeline("fused", "v6_paired", "v5_narrow", "predict, gate, up and down in one persistent launch (mlp_fused v1), "
             "row-major weights (candidate)", fused="v1"),
    Pipeline("fused-neuron-major", "v6_paired", "v5_narrow", "mlp_fused v1 on the neuron-major layout: each active "
             "neuron one contiguous stream of its three rows (candidate)", layout="neuron-major", fused="v1"),
    Pipeline("sparse-atomic", "v3_fused", "v2_atomic", "fused gate+up, the paper's atomicAdd down"),
    Pipeline("dense", "dense", "dense", "every row in the same kernels (separates sparsity from kernel quality)"),
)}
DEFAULT_PIPELINE = "sparse-batched"
