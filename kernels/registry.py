"""The kernel versions, by family: one record per version, the one that ``SparseMLP``, the
benchmarks and the verifier (``verify.py``) read.

A record holds everything about its version: a one-line description; the CUDA functions it
launches and how (``launches``, :class:`ops.Launch`: function, threads per block, rows per
warp, persistent grid; the source file is ``Launch.source``); the NumPy reference of what it
must write (``reference``; ``deterministic``: bit for bit, else within the rigorous error
bound); the bytes it touches (``touched(d, k, dtype, rows)``, one of ``traffic.py``'s
functions). A new version is one kernel in ``cuda/`` plus one record here. Per family:

* ``pack_signs``: run(matrix: DeviceMatrix) -> words [rows, ceil(cols/32)];
  reference(a) -> the same words of a host matrix
* ``predict``:    run(w_signs, x_signs, d, alpha_milli) -> (counts, zero, active | None, n_active | None);
  reference(w_signs, x_signs, d, alpha_milli) -> the predicted-zero mask, bool [k]
* ``gate_up``:    run(mlp: SparseMLP, x, x_signs, alpha_milli) -> (h1, h3, zero | None);
  reference(x, w_gate, w_up, activation, predicted_zero) -> (h1, h3). ``predict``: the predict
  version it runs first and reads (its mask or list); "" when it predicts itself or not at all
* ``down``:       run(h3, w_down_t: DeviceMatrix) -> out; reference(h3, w_down_t) -> out
* ``mlp_fused``:  run(mlp: SparseMLP, x, x_signs, alpha_milli) -> (h1, h3, zero, out): the whole MLP in one
  launch; reference(x, w_gate, w_up, w_down, activation, alpha) -> (out, trace)
* ``mlp``:        a gate_up version and a down version run in sequence, or an mlp_fused version
  (``SparseMLP``), on the weights in row-major or neuron-major layout (``layout.py``): :class:`Pipeline`
* ``baseline``:   run(x, w_gate, w_up, w_down [d, k], activation) -> (h1, h3, out): the strong dense
  baseline (not a sparse version; ``deterministic`` False: out is checked against the rigorous bound);
  reference(x, w_gate, w_up, w_down, activation) -> out

Block-quantized weights (``cuda/quant.cu``; Q8_0, Q4_0, Q4_1, ``reference.block_quant``): per
format FMT, families ``pack_signs_FMT``, ``gate_up_FMT`` and ``down_FMT`` whose records'
``weights`` name the format (their ``touched`` takes it as the dtype: whole blocks read), with
``reference.quant_mlp.QuantizedMLPWeights`` ``weights`` in place of float matrices:

* ``pack_signs_FMT``: run(blocks: DeviceBlocks) -> words [rows, cols/32]; reference(blocks, fmt, cols)
* ``gate_up_FMT``:    run(mlp: QuantSparseMLP, x, x_signs, alpha_milli) -> (h1, h3, zero | None);
  reference(x, weights, activation, predicted_zero) -> (h1, h3)
* ``down_FMT``:       run(h3, w_down_t: DeviceBlocks) -> out; reference(h3, weights) -> out
* ``QUANT_PIPELINES``: :class:`Pipeline` records with ``weights`` (``QuantSparseMLP``)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from sparseinfer.reference import mlp_dense, mlp_sparse
from sparseinfer.reference.block_quant import FORMATS
from sparseinfer.reference.order_contract import DOWN_SUB_CHUNKS, down_projection
from sparseinfer.reference.signs import pack_signs

from . import ops, quant_ops, traffic
from .expected import (dense_h1_h3, dense_quant_h1_h3, expected_h1_h3, predicted_zero, quant_down, quant_h1_h3,
                       quant_signs)
from .ops import Launch
from .sources import DOWN_NARROW_THREADS, DOWN_THREADS, FUSED_THREADS, GATE_UP_BATCHED_THREADS, PREDICT_ROWS_PER_WARP


@dataclass(frozen=True)
class Version:
    family: str
    name: str
    description: str
    deterministic: bool          # bit-exact against the reference (else: rigorous error bound)
    launches: tuple              # ops.Launch of each kernel it launches itself, in order
    launcher: Callable           # the family's: launcher(version, *run's arguments)
    reference: Callable          # NumPy: what it must write (the family's signature, above)
    touched: Callable            # bytes touched: touched(d, k, dtype, rows) (traffic.py)
    predict: str = ""            # gate_up: the predict version it runs first and reads
    weights: str = ""            # the block format it reads ("": float weights of any dtype)

    def run(self, *args):
        """Launch this version (the family's signature, above)."""
        return self.launcher(self, *args)

    @property
    def step(self) -> str:
        """The MLP step it does: its family, less a block format's suffix (gate_up_q4_0: gate_up)."""
        return self.family.removesuffix(f"_{self.weights}") if self.weights else self.family


def _family(*versions: Version) -> dict:
    return {v.name: v for v in versions}


# --- launchers: one per way a family's versions launch, each given the version's record ----------

def _pack(v, matrix):
    return ops.pack_signs(matrix, v.launches[0])


def _predict_mask(v, w_signs, x_signs, d, alpha_milli):
    return (*ops.predict(w_signs, x_signs, d, alpha_milli, launch=v.launches[0]), None, None)


def _predict_list(v, w_signs, x_signs, d, alpha_milli):
    counts, zero = ops.predict(w_signs, x_signs, d, alpha_milli, launch=v.launches[0])
    return (counts, zero, *ops.compact_active(zero, v.launches[1]))


def _gate_up_masked(v, mlp, x, x_signs, alpha_milli):
    zero = PREDICT[v.predict].run(mlp.w_signs, x_signs, mlp.d, alpha_milli)[1]
    return (*ops.gate_up_mask(x, mlp.w_gate, mlp.w_up, mlp.activation, zero, launch=v.launches[0]), zero)


def _gate_up_listed(v, mlp, x, x_signs, alpha_milli):
    _, zero, active, n_active = PREDICT[v.predict].run(mlp.w_signs, x_signs, mlp.d, alpha_milli)
    return (*ops.gate_up_list(x, mlp.w_gate, mlp.w_up, mlp.activation, active, n_active, launch=v.launches[0]),
            zero)


def _gate_up_predicting(v, mlp, x, x_signs, alpha_milli):
    _, zero, h1, h3 = ops.gate_up_fused(x, x_signs, mlp.w_signs, mlp.w_gate, mlp.w_up, mlp.activation, alpha_milli,
                                        launch=v.launches[0])
    return h1, h3, zero


def _dense_gate_up(kernel_ops):
    """The dense gate/up launcher of ``kernel_ops`` (``ops`` or ``quant_ops``): every row, no prediction."""
    def launch_dense(v, mlp, x, x_signs, alpha_milli):
        return (*kernel_ops.gate_up_mask(x, mlp.w_gate, mlp.w_up, mlp.activation, None, launch=v.launches[0]), None)
    return launch_dense


def _chunked_down(kernel_ops, dense: bool = False):
    """The chunked down launcher of ``kernel_ops`` (``ops`` or ``quant_ops``); ``dense`` skips no row."""
    def launch_chunks(v, h3, w_down_t):
        return kernel_ops.down_chunks(h3, w_down_t, dense=dense, launch=v.launches[0], chunk_sum=v.launches[1])
    return launch_chunks


_gate_up_dense = _dense_gate_up(ops)
_down_chunked = _chunked_down(ops)
_down_chunked_dense = _chunked_down(ops, dense=True)


def _down_serial(v, h3, w_down_t):
    return ops.down_chunks_serial(h3, w_down_t, launch=v.launches[0])


def _down_atomic(v, h3, w_down_t):
    return ops.down_atomic(h3, w_down_t, launch=v.launches[0])


def _mlp_fused(v, mlp, x, x_signs, alpha_milli):
    return ops.mlp_fused(x, x_signs, mlp.w_signs, mlp.w_gate, mlp.w_up, mlp.w_down_t, mlp.activation, alpha_milli,
                         launch=v.launches[0])


def _dense_gemv(v, x, w_gate, w_up, w_down, activation):
    return ops.dense_gemv_mlp(x, w_gate, w_up, w_down, activation, gate_up=v.launches[0], rows=v.launches[1])


# --- the records ----------------------------------------------------------------------------

PACK_SIGNS = _family(
    Version("pack_signs", "v1", "warp per 32-element word, __ballot_sync packs the 32 sign bits", True,
            (ops.SIGN_PACKING,), _pack, pack_signs, traffic.pack_x),
)


def _predict(name, description, launches, launcher=_predict_mask, touched=traffic.predict):
    return Version("predict", name, description, True, launches, launcher, predicted_zero, touched)


PREDICT = _family(
    _predict("v1", "warp per row: XOR + __popc + butterfly sum, eq. 2 in thousandths; counts and zero mask",
             (Launch("predict_rows"),)),
    _predict("v2", "v1, then one block compacts the active rows into an ascending list (ballot prefix)",
             (Launch("predict_rows"), ops.COMPACTION), _predict_list, traffic.predict_compacted),
    _predict("v3", "v1 reading the sign words 16 bytes per lane where aligned (as the fused gate+up does)",
             (Launch("predict_rows_vec"),)),
    _predict("v4", "4 rows per warp (8 lanes each), every 16-byte quad of sign words a lane reads loaded before "
                   "any is counted (13B: one round trip per row)",
             (Launch("predict_rows_multi", rows_per_warp=PREDICT_ROWS_PER_WARP),)),
)


def _gate_up(name, description, launch, launcher, touched, reference=expected_h1_h3, predict=""):
    return Version("gate_up", name, description, True, (launch,), launcher, reference, touched, predict)


GATE_UP = _family(
    _gate_up("v1_mask", "predict, then warp per row over all k rows; predicted-zero rows write 0, h1 == 0 skips up "
                        "(+AS)", Launch("gate_up_mask_{dtype}"), _gate_up_masked, traffic.gate_up_masked,
             predict="v1"),
    _gate_up("v2_list", "predict + compaction, then warps only over the ascending active list (+AS)",
             Launch("gate_up_list_{dtype}"), _gate_up_listed, traffic.gate_up_listed, predict="v2"),
    _gate_up("v3_fused", "predict + gate + up in one launch, warp per row (+AS)",
             Launch("gate_up_fused_{dtype}"), _gate_up_predicting, traffic.gate_up_predicting),
    _gate_up("v4_persistent", "v3 on a grid resident at once, warps striding over rows; 8 weight chunks per lane "
                              "loaded before they are added (+AS)",
             Launch("gate_up_persistent_{dtype}", persistent=True), _gate_up_predicting, traffic.gate_up_predicting),
    _gate_up("v5_batched", "v3 (warp per row) with v4's loads: 8 weight chunks per lane in flight before they are "
                           "added (+AS)",
             Launch("gate_up_batched_{dtype}", threads=GATE_UP_BATCHED_THREADS), _gate_up_predicting,
             traffic.gate_up_predicting),
    _gate_up("v6_paired", "v5 with the gate and up rows read together: 6 chunks of each per lane in flight, one "
                          "series of round trips for both (reads the up row of every predicted-active row; +AS in "
                          "the result)",
             Launch("gate_up_paired_{dtype}", threads=GATE_UP_BATCHED_THREADS), _gate_up_predicting,
             traffic.gate_up_paired),
    _gate_up("dense", "same warp-per-row structure, every gate and up row (the kernel-quality baseline)",
             Launch("gate_up_mask_{dtype}"), _gate_up_dense, traffic.gate_up_dense, reference=dense_h1_h3),
)

# A block of the chunked down projections: a column tile times the DOWN_SUB_CHUNKS sub-chunks of a chunk.
_CHUNKS = Launch("down_chunks_{dtype}", threads=DOWN_THREADS * DOWN_SUB_CHUNKS)


def _down(name, description, launches, launcher=_down_chunked, touched=traffic.down_chunked, deterministic=True):
    return Version("down", name, description, deterministic, launches, launcher, down_projection, touched)


DOWN = _family(
    _down("v1_chunks", "deterministic: per chunk of rows an ascending list of h3 != 0 rows, partials, chunks added "
                       "in order", (_CHUNKS, ops.CHUNK_SUM)),
    _down("v4_batched", "v1 with each thread loading 8 rows' weights before it adds them (more loads in flight)",
          (Launch("down_chunks_batched_{dtype}", threads=DOWN_THREADS * DOWN_SUB_CHUNKS), ops.CHUNK_SUM)),
    _down("v5_narrow", "v4 on column tiles of 64 threads instead of 128: twice the blocks per chunk, 256 threads "
                       "each (more blocks in flight; the same order per column)",
          (Launch("down_chunks_narrow_{dtype}", threads=DOWN_NARROW_THREADS * DOWN_SUB_CHUNKS), ops.CHUNK_SUM)),
    _down("v3_serial", "v1 in one launch: the last block of each column tile (threadfence + counter) adds the "
                       "chunks' partials in order",
          (Launch("down_chunks_serial_{dtype}", threads=DOWN_THREADS * DOWN_SUB_CHUNKS),), _down_serial),
    _down("v2_atomic", "order free (paper): split-K over row groups skipping h3 == 0, one atomicAdd per column per "
                       "block", (Launch("down_atomic_{dtype}", threads=DOWN_THREADS, rows_per_block=64),),
          _down_atomic, traffic.down_atomic, deterministic=False),
    _down("dense", "v1's structure reading every row (the kernel-quality baseline)", (_CHUNKS, ops.CHUNK_SUM),
          _down_chunked_dense, traffic.down_chunked_dense),
)

MLP_FUSED = _family(
    Version("mlp_fused", "v1", "persistent blocks over the down projection's sub-chunks: warp per neuron predicts, "
                               "reads gate and up together (v6), then the block adds the W_down^T rows of its "
                               "h3 != 0 neurons; the last part of a chunk and the last chunk add the partials in "
                               "order (+AS)", True,
            (Launch("mlp_fused_{dtype}", threads=FUSED_THREADS, persistent=True),), _mlp_fused, mlp_sparse,
            traffic.mlp_fused),
)

BASELINE = _family(
    Version("baseline", "dense-gemv", "strong dense fp16 MLP: two bandwidth-tuned GEMVs (warp per neuron with gate "
                                      "and up chunks in flight together; warp per row of W_down [d, k], 8 chunks "
                                      "per lane in flight), no partials", False,
            (Launch("dense_gate_up_{dtype}"), Launch("dense_rows_{dtype}")), _dense_gemv, mlp_dense,
            traffic.strong_dense),
)


# --- block-quantized weights (quant.cu): the same versions for every format ------------------

def _quant_pack(v, blocks):
    return quant_ops.pack_signs(blocks, v.launches[0])


def _quant_gate_up_masked(v, mlp, x, x_signs, alpha_milli):
    zero = PREDICT[v.predict].run(mlp.w_signs, x_signs, mlp.d, alpha_milli)[1]
    return (*quant_ops.gate_up_mask(x, mlp.w_gate, mlp.w_up, mlp.activation, zero, launch=v.launches[0]), zero)


def _quant_gate_up_paired(v, mlp, x, x_signs, alpha_milli):
    _, zero, h1, h3 = quant_ops.gate_up_paired(x, x_signs, mlp.w_signs, mlp.w_gate, mlp.w_up, mlp.activation,
                                               alpha_milli, launch=v.launches[0])
    return h1, h3, zero


_quant_gate_up_dense = _dense_gate_up(quant_ops)
_quant_down = _chunked_down(quant_ops)
_quant_down_dense = _chunked_down(quant_ops, dense=True)


_QUANT_MASK = Launch("gate_up_quant_mask_{dtype}")
_QUANT_CHUNKS = Launch("down_quant_chunks_{dtype}", threads=DOWN_THREADS * DOWN_SUB_CHUNKS)


def _quant_families(fmt: str) -> tuple[dict, dict, dict]:
    """(pack_signs_FMT, gate_up_FMT, down_FMT): the block-quantized versions on format ``fmt``."""
    def version(step, name, description, launches, launcher, reference, touched, predict=""):
        return Version(f"{step}_{fmt}", name, description, True, launches, launcher, reference, touched, predict,
                       weights=fmt)

    lane = f"lane l dequantizes element l of each {fmt} block (V = 1)"
    pack = _family(version("pack_signs", "v1", f"warp per block: {lane}, __ballot_sync packs the signs of the "
                                               "dequantized weights (load time)",
                           (Launch("pack_signs_quant_{dtype}"),), _quant_pack, quant_signs, traffic.pack_rows))
    gate_up = _family(
        version("gate_up", "v1_mask", f"predict, then warp per row over all k rows, {lane}, 8 blocks in flight; "
                                      "predicted-zero rows write 0, h1 == 0 skips up (+AS)",
                (_QUANT_MASK,), _quant_gate_up_masked, quant_h1_h3, traffic.gate_up_masked, predict="v1"),
        version("gate_up", "v2_paired", f"predict + gate + up in one launch, warp per row, {lane}; the gate and up "
                                        "rows read together, 6 blocks of each in flight (+AS in the result)",
                (Launch("gate_up_quant_paired_{dtype}", threads=GATE_UP_BATCHED_THREADS),), _quant_gate_up_paired,
                quant_h1_h3, traffic.gate_up_paired),
        version("gate_up", "dense", "v1_mask's kernel on every gate and up row (the kernel-quality baseline)",
                (_QUANT_MASK,), _quant_gate_up_dense, dense_quant_h1_h3, traffic.gate_up_dense))
    down = _family(
        version("down", "v1_chunks", f"deterministic, down v1's chunks on {fmt} rows of W_down^T: a thread a "
                                     "quarter of a block's columns, 4 rows' blocks in flight, h3 == 0 rows skipped",
                (_QUANT_CHUNKS, ops.CHUNK_SUM), _quant_down, quant_down, traffic.down_chunked),
        version("down", "dense", "v1_chunks reading every row (the kernel-quality baseline)",
                (_QUANT_CHUNKS, ops.CHUNK_SUM), _quant_down_dense, quant_down, traffic.down_chunked_dense))
    return pack, gate_up, down


_QUANT = {fmt: _quant_families(fmt) for fmt in FORMATS}
PACK_SIGNS_QUANT = {fmt: pack for fmt, (pack, _, _) in _QUANT.items()}        # by format: its family
GATE_UP_QUANT = {fmt: gate_up for fmt, (_, gate_up, _) in _QUANT.items()}
DOWN_QUANT = {fmt: down for fmt, (_, _, down) in _QUANT.items()}

# The quantized families by name (pack_signs_q8_0, gate_up_q8_0, down_q8_0, pack_signs_q4_0, ...).
QUANT_FAMILIES = {f"{step}_{fmt}": family for fmt, families in _QUANT.items()
                  for step, family in zip(("pack_signs", "gate_up", "down"), families)}

FAMILIES = {"pack_signs": PACK_SIGNS, "predict": PREDICT, "gate_up": GATE_UP, "down": DOWN, "mlp_fused": MLP_FUSED,
            "baseline": BASELINE, **QUANT_FAMILIES}
LAYOUTS = ("row-major", "neuron-major")


@dataclass(frozen=True)
class Pipeline:
    """``gate_up`` then ``down``; or, with ``fused``, that mlp_fused version alone, ``gate_up`` and
    ``down`` then naming the separate versions that read the same rows. ``layout``: the weights
    it reads (one of LAYOUTS). ``weights``: a block format (QUANT_PIPELINES: the versions of
    gate_up_FMT and down_FMT, run by ``QuantSparseMLP``); "" for float weights (``SparseMLP``)."""
    name: str
    gate_up: str
    down: str
    description: str
    layout: str = "row-major"
    fused: str = ""
    weights: str = ""

    def gate_up_version(self) -> Version:
        return (GATE_UP_QUANT[self.weights] if self.weights else GATE_UP)[self.gate_up]

    def down_version(self, down_format: str = "") -> Version:
        """Its down version, on W_down^T in ``down_format`` (default: the pipeline's own weights; a
        quantized layer may keep W_down^T in another format, such as Q8_0 beside Q4_0 gate and up)."""
        fmt = down_format or self.weights
        return (DOWN_QUANT[fmt] if fmt else DOWN)[self.down]

    @property
    def deterministic(self) -> bool:
        if self.fused:
            return MLP_FUSED[self.fused].deterministic
        return self.gate_up_version().deterministic and self.down_version().deterministic

    @property
    def sparse(self) -> bool:
        return self.gate_up != "dense"

    def touched(self, d: int, k: int, dtype: str, rows: dict) -> int:
        """Bytes the pipeline touches (as a version's ``touched``; ``dtype``: the block format for a
        quantized pipeline, W_down^T counted in that format too): x's sign words packed (pack_signs
        v1, as ``SparseMLP`` does), then its mlp_fused version, or its gate_up version, after the
        predict version that one reads, and its down version."""
        total = PACK_SIGNS["v1"].touched(d, k, dtype, rows)
        if self.fused:
            return total + MLP_FUSED[self.fused].touched(d, k, dtype, rows)
        gate_up = self.gate_up_version()
        if gate_up.predict:
            total += PREDICT[gate_up.predict].touched(d, k, dtype, rows)
        return total + gate_up.touched(d, k, dtype, rows) + self.down_version().touched(d, k, dtype, rows)


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

# The pipelines on block-quantized weights (QuantSparseMLP), per format: sparse and its dense twin.
QUANT_PIPELINES = {p.name: p for fmt in FORMATS for p in (
    Pipeline(f"sparse-{fmt}", "v2_paired", "v1_chunks", f"{fmt} weights: fused predict+gate+up with gate and up "
             "blocks in flight together, deterministic chunked down on block rows", weights=fmt),
    Pipeline(f"dense-{fmt}", "dense", "dense", f"{fmt} weights: every row in the same kernels (separates sparsity "
             "from kernel quality)", weights=fmt))}
