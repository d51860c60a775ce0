"""The op library's CUDA launcher (model_export/native/sparse_mlp_cuda.cu), without a GPU.

* emulated: the launcher's host code, built by g++ against kernels/cuda/cpu_emulation.h, runs
  the project's kernels on the CPU emulator; ``sparseinfer_cuda_sparse_mlp`` called through
  ctypes equals the reference bit for bit: ``mlp_sparse(mode="predicted+actual")`` and its
  trace's masks for one token, ``mlp_dense`` per token for several. Shapes with tails (d not
  a multiple of 32 or 128, k across and inside the down projection's chunks of 512 rows),
  α, relu and fatrelu, silu and the gelus (approximate: predicted-negative rows skipped; their
  actual_zero is a negative gate), x with +0.0 / -0.0 entries, sign words with their own row stride
  (padding filled with garbage, which a wrong stride reads), outputs and scratch starting
  as 0xFF bytes (stale memory).
* compile gate: nvcc compiles the launcher with the op library's command; no register spill
  in the kernels it launches; the PTX keeps the order contract (no FMA, no .ftz); and where
  cuobjdump is there, their SASS has no FTZ instruction but the integer-division idiom.
"""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent))

import native_cuda as nc  # noqa: E402
from helpers import assert_bits_equal, mlp_weights  # noqa: E402

from sparseinfer.kernels.compile_check import _pip_nvidia_dirs, contract_violations  # noqa: E402
from sparseinfer.kernels.shapes import make_layer  # noqa: E402
from sparseinfer.reference import order_contract as oc  # noqa: E402
from sparseinfer.reference.activations import Activation  # noqa: E402
from sparseinfer.reference.mlp import mlp_dense, mlp_sparse  # noqa: E402
from sparseinfer.reference.signs import pack_signs, words_per_row  # noqa: E402

# (d, k): d = 1, 31, 33, 97, 130, 300 (sign-word tails, 16-byte chunk tails, rows of 10 words
# where every other row is 16-byte aligned); k odd, inside one chunk of 512 rows, across
# two, and 1100 (three chunks, the last partial: a reversed chunk order changes the bits).
SHAPES = ((1, 37), (31, 64), (33, 97), (97, 600), (130, 1100), (300, 129), (300, 1100), (64, 513))
ACTIVATIONS = ("relu", "fatrelu:0.01", "fatrelu:-0.02", "silu", "gelu", "gelu_tanh")
PADS = (0, 1, 3, "export")       # extra uint32 words per sign row; export: uint64 words in groups of 16
# The emulator takes a few ms per call at these shapes: the profile's examples (40 in CI).
FEW = settings().max_examples
INVALID_VALUE = 1                # cudaErrorInvalidValue


@dataclass
class Layer:
    d: int
    k: int
    x: np.ndarray          # [n_tokens, d]
    w_gate: np.ndarray
    w_up: np.ndarray
    w_down: np.ndarray     # [d, k], Hugging Face layout
    w_down_t: np.ndarray
    w_signs: np.ndarray    # uint32 [k, stride]: pack_signs(w_gate) then garbage words
    activation: str
    alpha_milli: int

    @property
    def n_words(self) -> int:
        return words_per_row(self.d)

    def __str__(self):
        return (f"d={self.d} k={self.k} tokens={self.x.shape[0]} stride={self.w_signs.shape[1]} "
                f"act={self.activation} alpha_milli={self.alpha_milli}")


def sign_stride(d: int, pad) -> int:
    if pad == "export":
        return 2 * 16 * -(-words_per_row(d) // 32)      # ceil(d / 64) uint64 words, padded to 16
    return words_per_row(d) + pad


def build_layer(d, k, n_tokens, seed, weights, pad, activation, alpha_milli, dtype=np.float32) -> Layer:
    """``dtype``: the weights' type (fp16 weights are the fp32 ones rounded, then used as they are)."""
    rng = np.random.default_rng(seed)
    if weights == "predictor":    # exactly 90 % of the rows built to be predicted zero
        layer = make_layer(d, k, np.float32, 0.9, seed)
        x0, wg, wu, wd = layer.x, layer.w_gate, layer.w_up, layer.w_down
    else:                         # Gaussian: the predictor both misses zeros and skips nonzeros
        x0, wg, wu, wd = mlp_weights(rng, d, k, np.float32, sparsity=0.6)
    xs = [x0] + [x0 * rng.choice(np.float32([-1, 1]), d) * rng.uniform(0.5, 2, d).astype(np.float32)
                 for _ in range(n_tokens - 1)]
    x = np.stack(xs).astype(np.float32)
    if d >= 4:                    # exact zeros of both signs (-0.0 packs as a positive sign)
        for row in x:
            at = rng.choice(d, 2 * max(1, d // 10), replace=False)
            half = at.size // 2
            row[at[:half]] = np.float32(0.0)
            row[at[half:]] = np.float32(-0.0)
    wg, wu, wd = (np.ascontiguousarray(w.astype(dtype)) for w in (wg, wu, wd))
    words = pack_signs(wg)
    stride = sign_stride(d, pad)
    w_signs = rng.integers(0, 2**32, (k, stride), dtype=np.uint64).astype(np.uint32)   # garbage past the row
    w_signs[:, :words.shape[1]] = words
    return Layer(d, k, np.ascontiguousarray(x), wg, wu, wd, np.ascontiguousarray(wd.T), w_signs, activation,
                 alpha_milli)


def run(layer: Layer, masks: bool = True, stride: int | None = None, scratch_buf: np.ndarray | None = None,
        **override) -> nc.Result:
    """One call; ``override`` replaces fields of the arguments (a NULL pointer, a bad value)."""
    if stride is not None:
        override["sign_stride"] = stride
    return nc.call(layer.x, layer.w_gate, layer.w_up, layer.w_down_t, layer.w_signs, layer.d, layer.k,
                   layer.activation, layer.alpha_milli, "fp16" if layer.w_gate.dtype == np.float16 else "fp32",
                   masks=masks, scratch_buf=scratch_buf, override=override)


def expected_decode(layer: Layer):
    """(out, trace) of the reference for the one token."""
    return mlp_sparse(layer.x[0], layer.w_gate, layer.w_up, layer.w_down, layer.activation,
                      alpha=layer.alpha_milli / 1000, mode="predicted+actual", w_down_t=layer.w_down_t,
                      approximate=not Activation.parse(layer.activation).sparse_capable)


def check_decode(layer: Layer, masks: bool = True, **kw):
    got = run(layer, masks=masks, **kw)
    assert got.rc == 0, f"{nc.error_text(got.rc)} ({layer})"
    want, trace = expected_decode(layer)
    assert trace.alpha_milli == layer.alpha_milli
    assert_bits_equal(got.out[0], want, "out", str(layer))
    if masks:
        np.testing.assert_array_equal(got.predicted_zero, trace.predicted_zero.astype(np.uint8),
                                      err_msg=f"predicted_zero ({layer})")
        np.testing.assert_array_equal(got.computed, trace.computed_up.astype(np.uint8), err_msg=f"computed ({layer})")
        np.testing.assert_array_equal(got.actual_zero, trace.actual_zero.astype(np.uint8),
                                      err_msg=f"actual_zero ({layer})")
    return got, trace


def check_prefill(layer: Layer, **kw):
    got = run(layer, **kw)
    assert got.rc == 0, f"{nc.error_text(got.rc)} ({layer})"
    for t in range(layer.x.shape[0]):
        want = mlp_dense(layer.x[t], layer.w_gate, layer.w_up, layer.w_down, layer.activation,
                         w_down_t=layer.w_down_t)
        assert_bits_equal(got.out[t], want, f"out[token {t}]", str(layer))
    # the masks are decode-only: a prefill call leaves them as they were
    assert (got.predicted_zero == nc.UNWRITTEN).all() and (got.computed == nc.UNWRITTEN).all()
    assert (got.actual_zero == nc.UNWRITTEN).all()
    return got


@pytest.fixture(scope="module")
def lib():
    return nc.emulated_library()


@pytest.fixture(params=["forward", "reverse"])
def thread_order(request, lib):
    """Threads first-to-last or last-to-first between barriers (a difference is a race)."""
    lib.sparseinfer_cuda_emulation_order(int(request.param == "reverse"))
    yield request.param
    lib.sparseinfer_cuda_emulation_order(0)


_layer_args = dict(shape=st.sampled_from(SHAPES), seed=st.integers(0, 2**31 - 1),
                   weights=st.sampled_from(["predictor", "gaussian"]), pad=st.sampled_from(PADS),
                   activation=st.sampled_from(ACTIVATIONS),
                   alpha_milli=st.one_of(st.just(1000), st.integers(850, 1150)),
                   dtype=st.sampled_from([np.float32, np.float16]))


@pytest.mark.emulated
@settings(max_examples=FEW)
@given(**_layer_args, masks=st.booleans())
@example(shape=(300, 1100), seed=7, weights="gaussian", pad="export", activation="relu", alpha_milli=1000,
         dtype=np.float32, masks=True)
@example(shape=(33, 97), seed=3, weights="predictor", pad=3, activation="fatrelu:0.01", alpha_milli=1030,
         dtype=np.float32, masks=False)
@example(shape=(300, 1100), seed=5, weights="gaussian", pad="export", activation="relu", alpha_milli=1000,
         dtype=np.float16, masks=True)
def test_decode_equals_the_reference_bit_for_bit(lib, shape, seed, weights, pad, activation, alpha_milli, dtype,
                                                 masks):
    d, k = shape
    check_decode(build_layer(d, k, 1, seed, weights, pad, activation, alpha_milli, dtype), masks=masks)


@pytest.mark.emulated
@settings(max_examples=FEW)
@given(**_layer_args, n_tokens=st.sampled_from([2, 3]))
@example(shape=(300, 1100), seed=11, weights="gaussian", pad=0, activation="relu", alpha_milli=1000,
         dtype=np.float32, n_tokens=3)
@example(shape=(260, 700), seed=12, weights="gaussian", pad=0, activation="relu", alpha_milli=1000,
         dtype=np.float16, n_tokens=2)
def test_prefill_runs_the_dense_pipeline_token_by_token(lib, shape, seed, weights, pad, activation, alpha_milli,
                                                        dtype, n_tokens):
    d, k = shape
    check_prefill(build_layer(d, k, n_tokens, seed, weights, pad, activation, alpha_milli, dtype))


def _reordered_down(h3, w_down_t, reverse_chunks: bool, reverse_subs: bool):
    """The contract's down projection with the chunks or the sub-chunks added in reverse."""
    k, d = w_down_t.shape
    n_chunks = -(-k // oc.DOWN_ROW_CHUNK)
    sub_rows = oc.DOWN_ROW_CHUNK // oc.DOWN_SUB_CHUNKS
    q = oc._sequential_partials(h3, w_down_t, sub_rows, n_chunks * oc.DOWN_SUB_CHUNKS)
    q = q.reshape(n_chunks, oc.DOWN_SUB_CHUNKS, d).transpose(1, 0, 2)
    partial = oc._sum_in_order(q[::-1] if reverse_subs else q)
    return oc._sum_in_order(partial[::-1] if reverse_chunks else partial)


@pytest.mark.emulated
def test_the_fixed_layer_tells_wrong_orders_and_strides_apart(lib, thread_order):
    """The layer below is one on which a launcher with the chunks or sub-chunks added in another
    order, or reading the sign words at ceil(d / 32) words per row, gives other bits; the
    launcher gives the reference's, with the emulator's threads in either order."""
    layer = build_layer(300, 1100, 1, 7, "gaussian", "export", "relu", 1000)
    got, trace = check_decode(layer)
    # non-trivial: rows skipped, rows kept with h1 == 0 (+AS), rows computed, in every chunk
    kept_zero = ~trace.predicted_zero & trace.actual_zero
    assert trace.predicted_zero.any() and kept_zero.any() and trace.computed_up.any()
    assert all(trace.computed_up[c:c + oc.DOWN_ROW_CHUNK].any() for c in range(0, layer.k, oc.DOWN_ROW_CHUNK))
    # what the same inputs give in the wrong orders: other bits than the reference's
    x = layer.x[0]
    h1 = np.where(trace.computed_gate, Activation.parse("relu")(oc.warp_dot_rows(layer.w_gate, x)), np.float32(0))
    h2 = np.where(trace.computed_up, oc.warp_dot_rows(layer.w_up, x), np.float32(0))
    h3 = (h1 * h2).astype(np.float32)
    right = oc.down_projection(h3, layer.w_down_t)
    assert_bits_equal(got.out[0], right, "out")
    for rc, rs in ((True, False), (False, True)):
        wrong = _reordered_down(h3, layer.w_down_t, rc, rs)
        assert (wrong.view(np.uint32) != right.view(np.uint32)).any(), f"chunks reversed {rc}, subs reversed {rs}"
    # a launcher that took the stride from d reads garbage words as signs
    wrong_stride = run(layer, stride=layer.n_words)
    assert wrong_stride.rc == 0
    assert (wrong_stride.predicted_zero != trace.predicted_zero).any()


@pytest.mark.emulated
def test_one_scratch_serves_call_after_call(lib):
    """Nothing of a call's state outlives it: the same scratch (never cleared) gives the
    reference's bits for another token, a prefill in between, and the first token again."""
    d, k = 97, 600
    first = build_layer(d, k, 1, 21, "predictor", 1, "fatrelu:0.01", 1000)
    second = build_layer(d, k, 1, 22, "predictor", 1, "fatrelu:0.01", 1000)
    prefill = build_layer(d, k, 3, 23, "gaussian", 1, "fatrelu:0.01", 1000)
    scratch = nc.poisoned(lib.sparseinfer_cuda_scratch_bytes(3, d, k), np.uint8)
    check_decode(first, scratch_buf=scratch)
    check_decode(second, scratch_buf=scratch)
    check_prefill(prefill, scratch_buf=scratch)
    check_decode(first, scratch_buf=scratch)


@pytest.mark.emulated
def test_scratch_size_and_invalid_arguments(lib):
    n_chunks = -(-1100 // oc.DOWN_ROW_CHUNK)
    assert lib.sparseinfer_cuda_scratch_bytes(1, 300, 1100) >= 4 * (n_chunks * 300 + 3 * 1100) + 1100 + 4 * 10
    assert lib.sparseinfer_cuda_scratch_bytes(1, 300, 1100) == lib.sparseinfer_cuda_scratch_bytes(8, 300, 1100)
    assert lib.sparseinfer_cuda_scratch_bytes(1, 0, 5) == 0
    layer = build_layer(33, 97, 1, 5, "predictor", 0, "relu", 1000)
    bad = [dict(stride=layer.n_words - 1), dict(scratch=None), dict(x=None), dict(out=None), dict(activation=5), dict(activation=-1),
           dict(d=0), dict(k=0), dict(n_tokens=0), dict(alpha_milli=0), dict(w_signs=None), dict(dense=2),
           dict(dense=-1), dict(weight_dtype=5), dict(weight_dtype=-1), dict(down_dtype=nc.WEIGHTS["fp16"]),
           dict(down_dtype=nc.WEIGHTS["q8_0"])]
    for case in bad:
        got = run(layer, **case)
        assert got.rc == INVALID_VALUE, case
        assert (got.out.view(np.uint8) == nc.UNWRITTEN).all() and (got.predicted_zero == nc.UNWRITTEN).all(), case
    assert lib.sparseinfer_cuda_error_string(INVALID_VALUE).decode() == "invalid argument"
    # a prefill reads no sign words
    check_prefill(build_layer(33, 97, 2, 5, "predictor", 0, "relu", 1000), w_signs=None)


@pytest.mark.emulated
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_a_dense_call_runs_one_token_through_the_dense_pipeline(lib, dtype):
    """dense = 1 (a dense node): one token gives mlp_dense's bits, reads no sign words and
    leaves the masks unwritten; the same layer's sparse call skips nonzero rows too and gives
    other bits."""
    layer = build_layer(300, 1100, 1, 31, "gaussian", 0, "relu", 1000, dtype)
    dense = check_prefill(layer, dense=1, w_signs=None)
    sparse, trace = check_decode(layer)
    assert (trace.predicted_zero & ~trace.actual_zero).any()
    assert (dense.out.view(np.uint32) != sparse.out.view(np.uint32)).any()


# --- compile gate ------------------------------------------------------------------------

_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(sm_\d+)'.*?Function properties for \1\s*\n\s*"
                    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads.*?"
                    r"Used (\d+) registers", re.S)


def _tool(name: str) -> str | None:
    import shutil

    found = shutil.which(name)
    if found:
        return found
    for base in _pip_nvidia_dirs():
        for path in sorted(base.glob(f"*/bin/{name}")):
            if os.access(path, os.X_OK):
                return str(path)
    return None


def _compile(nvcc: str) -> tuple[str, Path]:
    """(ptxas -v log, folder with the object and its PTX), cached by sources, command and nvcc."""
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    texts = [nc.LAUNCHER.read_text(), nc.HEADER.read_text(), *(nc.raw_text(n) for n in nc.KERNEL_FILES),
             " ".join(nc.nvcc_command(nvcc, "OUT")), version]
    key = hashlib.sha256("\0".join(texts).encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / "sparseinfer-native-cuda-nvcc" / key
    log_file = folder / "ptxas.log"
    if not log_file.is_file():
        keep = folder / "keep"
        keep.mkdir(parents=True, exist_ok=True)
        cmd = nc.nvcc_command(nvcc, folder / "sparse_mlp_cuda.o") + ["-Xptxas", "-v", "--keep", "--keep-dir",
                                                                      str(keep)]
        r = subprocess.run(cmd, cwd=nc.ROOT, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"nvcc failed:\n{' '.join(cmd)}\n{r.stderr[-4000:]}"
        tmp = folder / f"ptxas.{os.getpid()}.tmp"
        tmp.write_text(r.stdout + r.stderr)
        tmp.replace(log_file)
    return log_file.read_text(), folder


def _launched(name: str) -> str | None:
    """The launcher's kernel this (possibly mangled) name is, or None."""
    return next((k for k in nc.LAUNCHED_KERNELS if name == k or (k.startswith("sparseinfer_") and k in name)), None)


def test_nvcc_compiles_the_launcher_without_spills_fma_or_ftz():
    nvcc = nc.find_nvcc()
    if nvcc is None:
        pytest.skip("compile gate skipped: no nvcc on PATH")
    log, folder = _compile(nvcc)
    entries = {}
    for m in _ENTRY.finditer(log):
        name, arch, _stack, spill_st, spill_ld, regs = m.groups()
        entries[(name, arch)] = (int(regs), int(spill_st), int(spill_ld))
    for arch in ("sm_80", "sm_90"):
        seen = {_launched(name) for (name, a) in entries if a == arch} - {None}
        assert seen == set(nc.LAUNCHED_KERNELS), f"{arch}: ptxas compiled {sorted(seen)}"
        for (name, a), (regs, st_bytes, ld_bytes) in entries.items():
            if a == arch and _launched(name):
                assert 0 < regs <= 255 and st_bytes == 0 and ld_bytes == 0, (
                    f"{name} {arch}: {regs} registers, spills {st_bytes} B stores / {ld_bytes} B loads")
    ptx = sorted((folder / "keep").glob("*.ptx"))
    assert {p.name.split(".")[1] for p in ptx} == {"compute_80", "compute_90"}, ptx
    for p in ptx:
        assert contract_violations(p.read_text()) == (), f"{p.name}: {contract_violations(p.read_text())[:5]}"
    cuobjdump, nvdisasm = _tool("cuobjdump"), _tool("nvdisasm")
    if cuobjdump is None or nvdisasm is None:
        return                                    # the PTX check above is the gate's (compile_check.py)
    env = {**os.environ, "PATH": f"{Path(nvdisasm).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    sass = subprocess.run([cuobjdump, "-sass", str(folder / "sparse_mlp_cuda.o")], capture_output=True, text=True,
                          env=env, check=True).stdout
    function, bad = None, []
    for line in sass.splitlines():
        m = re.search(r"Function : (\w+)", line)
        if m:
            function = m.group(1)
        # F2I.FTZ.U32.TRUNC: the integer division's reciprocal (ptxas's idiom), not float data
        elif "FTZ" in line and _launched(function or "") and "F2I.FTZ.U32.TRUNC" not in line:
            bad.append(f"{function}: {line.strip()}")
        elif re.search(r"\bFFMA\b", line) and _launched(function or ""):
            bad.append(f"{function}: {line.strip()}")
    assert not bad, sorted({b.split(":")[0] for b in bad})
