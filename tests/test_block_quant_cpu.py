"""model_export/native/block_quant_cpu.h bit for bit against the reference, for every block
format: row dot products (one, two and four rows at once, V = 1), prefill dot products (tiles of
rows x tokens, over chunks of blocks and groups of tokens), the sparse down projection and its
prefill form. The header
is compiled into a small C shim with the op library's flags and defines, as the machine's own
build (-march=native) and as AVX2, SSE4.1 and plain SSE2 builds, which must give the same bits
(so every path is checked on any x86-64 CPU that has it, the SSE ones on all)."""
import ctypes
import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sparseinfer.model_export import op_library
from sparseinfer.reference import block_quant as bq
from sparseinfer.reference import order_contract as oc
from sparseinfer.reference import q8_activation as q8

from helpers import assert_bits_equal

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason=op_library.NO_GXX)

F32 = np.float32
# builds: the machine's own SIMD, then narrower paths forced (without AVX-512 VNNI: int8 dot products
# by vpmaddubsw; AVX2: 8 floats a register; SSE4.1: 4; no SSE4.1: 4, codes widened by a plain loop),
# which must all give the same bits
FLAVOURS = {"native": (), "no-vnni": ("-mno-avx512vnni",), "avx2": ("-mno-avx512f",),
            "sse4.1": ("-mno-avx512f", "-mno-avx2"), "sse2": ("-mno-sse4.1",)}

SHIM = r"""
#include "q8_activation_cpu.h"
using namespace sparseinfer;
#define API extern "C" __attribute__((visibility("default")))

// fmt: the gguf type code of reference/block_quant.py's BlockFormat
template <typename Fn>
static int by_format(int fmt, Fn fn) {
    switch (fmt) {
        case 8: fn(Q8_0{}); return 0;
        case 2: fn(Q4_0{}); return 0;
        case 3: fn(Q4_1{}); return 0;
    }
    return -1;
}

API int bq_vec_floats() { return kVecFloats; }

API int bq_dequantize(int fmt, const uint8_t* blocks, int n_blocks, float* out) {
    return by_format(fmt, [&](auto f) {
        using F = decltype(f);
        for (int b = 0; b < n_blocks; ++b) {
            const BlockLanes w = dequantize<F>(blocks + int64_t(b) * F::kBytes);
            std::memcpy(out + int64_t(b) * kBlock, w.w, sizeof w.w);
        }
    });
}

// z[i] = row i . x, rows `group` at a time (1: dot_q prefetching the next row, 2: dot_q2, 4: dot_q_rows)
API int bq_dot_rows(int fmt, int group, const uint8_t* w, int d, int n, const float* x, float* z) {
    return by_format(fmt, [&](auto f) {
        using F = decltype(f);
        const int64_t stride = row_bytes_q<F>(d);
        int i = 0;
        if (group == 4)
            for (; i + 4 <= n; i += 4) {
                const uint8_t* rows[4] = {w + i * stride, w + (i + 1) * stride, w + (i + 2) * stride,
                                          w + (i + 3) * stride};
                dot_q_rows<F, 4>(rows, x, d, z + i);
            }
        if (group == 2)
            for (; i + 2 <= n; i += 2) dot_q2<F>(w + i * stride, w + (i + 1) * stride, x, d, z + i);
        for (; i < n; ++i) z[i] = dot_q<F>(w + i * stride, x, d, i + 1 < n ? w + (i + 1) * stride : nullptr);
    });
}

// z[t * n + i] = row i . x_t for x [n_tokens, d] (the prefill's tiles), rows [0, split) and
// [split, n) in two calls as the op's tasks make them
API int bq_dot_tokens(int fmt, const uint8_t* w, int d, int n, int split, const float* x, int n_tokens, float* z) {
    return by_format(fmt, [&](auto f) {
        dot_q_tokens<decltype(f)>(w, d, 0, split, x, n_tokens, z, n);
        dot_q_tokens<decltype(f)>(w, d, split, n, x, n_tokens, z + split, n);
    });
}

// the prefill's sizes: rows and tokens a tile, blocks a chunk, tokens a group
API void bq_prefill_sizes(int* out) {
    const int sizes[] = {kTileRows, kTileTokens, kChunkBlocks, kTokenGroup};
    std::memcpy(out, sizes, sizeof sizes);
}

// z[i] = row i . x on int8 activations (x quantized by quantize_x), rows `group` at a time (1: the
// single-row tail of dot_q8_listed, 4: its side-by-side step); codes[d]: the quantized x's codes
API int bq_q8_dot_rows(int fmt, int group, const uint8_t* w, int d, int n, const float* x, float* z, int8_t* codes) {
    return by_format(fmt, [&](auto f) {
        using F = decltype(f);
        QuantizedX qx;
        if (quantize_x(x, d, code_offset<F>(), qx) >= 0) return;     // (z stays NaN)
        std::memcpy(codes, qx.codes.data(), d);
        if (group == 4) dot_q8_listed<F>(w, d, nullptr, n, qx, 0, n, z);
        else
            for (int i = 0; i < n; ++i) {
                const uint8_t* row = w + i * row_bytes_q<F>(d);
                dot_q8_rows<F, 1>(&row, qx, d, z + i);
            }
    });
}

API int bq_down_columns(int fmt, const uint8_t* wt, int d, const int32_t* rows, const float* h3, int n, int j0,
                        int j1, float* out) {
    return by_format(fmt, [&](auto f) { down_columns_q<decltype(f)>(wt, d, rows, h3, n, j0, j1, out); });
}

API int bq_down_columns_tokens(int fmt, const uint8_t* wt, int d, int k, const float* h3, int n_tokens, int j0,
                               int j1, float* out) {
    return by_format(fmt, [&](auto f) { down_columns_tokens_q<decltype(f)>(wt, d, k, h3, n_tokens, j0, j1, out); });
}
"""


def _run(cmd) -> str:
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if done.returncode:
        first = next((ln for ln in done.stderr.splitlines() if "error" in ln), done.stderr.strip()[:300])
        raise AssertionError(f"{' '.join(map(str, cmd[:3]))} ... failed: {first}")
    return done.stdout


def build_shim(extra_flags) -> ctypes.CDLL:
    """The shim as a shared library, compiled once per preprocessed source (every header it
    includes), flags and target (cached in tmp)."""
    flags = [*op_library.CXX_FLAGS, *op_library.DEFINES, f"-I{op_library.NATIVE_DIR}", *extra_flags]
    cache = Path(tempfile.gettempdir()) / "sparseinfer-block-quant-cpu"
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".cpp", dir=cache, delete=False) as f:
        f.write(SHIM)
    cpp = Path(f.name)
    target = _run(["g++", *flags, "-dM", "-E", "-x", "c++", "/dev/null"])     # what -march=native enabled
    text = _run(["g++", *flags, "-E", "-P", cpp])
    key = hashlib.sha256("\0".join([text, *flags, target, _run(["g++", "--version"])]).encode()).hexdigest()[:16]
    lib = cache / f"shim-{key}.so"
    try:
        if not lib.is_file():
            tmp = cpp.with_suffix(".so.tmp")
            _run(["g++", *flags, "-shared", cpp, "-o", tmp])
            tmp.replace(lib)                   # atomic: a concurrent run never loads half a file
    finally:
        cpp.unlink()
    return ctypes.CDLL(str(lib))


@pytest.fixture(scope="module", params=list(FLAVOURS))
def shim(request):
    return build_shim(FLAVOURS[request.param])


def ptr(a: np.ndarray):
    assert a.flags.c_contiguous
    return ctypes.c_void_p(a.ctypes.data)


def call(lib, name: str, fmt, *args):
    conv = [ptr(a) if isinstance(a, np.ndarray) else ctypes.c_int(int(a)) for a in args]
    assert getattr(lib, name)(ctypes.c_int(fmt.gguf_type), *conv) == 0


# --- data: arbitrary codes, finite fp16 scales and mins over a wide range -------------------

def random_blocks(rng, fmt, rows: int, d: int) -> np.ndarray:
    """uint8 [rows, d / 32 * block_bytes]: random codes, scales and mins from fp16 subnormals up."""
    n = rows * d // bq.BLOCK
    blocks = rng.integers(0, 256, (n, fmt.block_bytes), dtype=np.uint8)
    header = rng.standard_normal((n, fmt.header_bytes // 2)) * np.exp2(rng.integers(-26, 4, (n, 1)))
    blocks[:, :fmt.header_bytes] = header.astype("<f2").view(np.uint8)
    return blocks.reshape(rows, -1)


def widely_scaled(rng, shape) -> np.ndarray:
    return (rng.standard_normal(shape) * np.exp2(rng.integers(-8, 8, shape))).astype(F32)


def sparse_h3(rng, shape, density: float) -> np.ndarray:
    h3 = widely_scaled(rng, shape)
    h3[rng.random(shape) >= density] = 0
    return h3


def reference_rows(w, fmt, x) -> np.ndarray:
    return oc.warp_dot_rows(bq.dequantize(w, fmt, x.shape[-1]), x, v_width=oc.BLOCK_VECTOR_WIDTH)


formats = st.sampled_from(list(bq.FORMATS.values()))
seeds = st.integers(0, 2**32 - 1)


# --- the tests --------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", bq.FORMATS.values(), ids=lambda f: f.name)
def test_dequantize_is_the_reference(shim, fmt):
    rng = np.random.default_rng(1)
    w = random_blocks(rng, fmt, 4, 256)
    out = np.full((4, 256), np.nan, F32)
    call(shim, "bq_dequantize", fmt, w, w.size // fmt.block_bytes, out)
    assert_bits_equal(out, bq.dequantize(w, fmt, 256), f"{fmt.name} dequantize")


@given(fmt=formats, blocks=st.integers(1, 12), n=st.integers(1, 9), group=st.sampled_from([1, 2, 4]), seed=seeds)
def test_dot_rows_are_the_reference(shim, fmt, blocks, n, group, seed):
    rng = np.random.default_rng(seed)
    d = 32 * blocks
    w, x = random_blocks(rng, fmt, n, d), widely_scaled(rng, d)
    z = np.full(n, np.nan, F32)
    call(shim, "bq_dot_rows", fmt, group, w, d, n, x, z)
    assert_bits_equal(z, reference_rows(w, fmt, x), f"{fmt.name} dot_q, {group} rows at once", f"d={d} seed={seed}")


def assert_dot_tokens(shim, fmt, rng, d: int, n: int, split: int, n_tokens: int, what: str):
    w, x = random_blocks(rng, fmt, n, d), widely_scaled(rng, (n_tokens, d))
    z = np.full((n_tokens, n), np.nan, F32)
    call(shim, "bq_dot_tokens", fmt, w, d, n, split, x, n_tokens, z)
    want = np.stack([reference_rows(w, fmt, x[t]) for t in range(n_tokens)])
    assert_bits_equal(z, want, f"{fmt.name} dot_q_tokens", f"d={d} rows={n} split={split} tokens={n_tokens} {what}")


def prefill_sizes(shim) -> tuple[int, int, int, int]:
    """(rows a tile, tokens a tile, blocks a chunk, tokens a group) of the build."""
    out = np.zeros(4, np.int32)
    shim.bq_prefill_sizes(ptr(out))
    return tuple(int(v) for v in out)


@given(fmt=formats, blocks=st.integers(1, 8), n=st.integers(1, 11), n_tokens=st.integers(1, 35), data=st.data(),
       seed=seeds)
def test_dot_tokens_are_the_reference(shim, fmt, blocks, n, n_tokens, data, seed):
    split = data.draw(st.integers(0, n))
    assert_dot_tokens(shim, fmt, np.random.default_rng(seed), 32 * blocks, n, split, n_tokens, f"seed={seed}")


@pytest.mark.parametrize("fmt", bq.FORMATS.values(), ids=lambda f: f.name)
def test_dot_tokens_across_chunks_and_groups_are_the_reference(shim, fmt):
    """Sums carried over chunks of blocks (the last one short), tokens past a group (with a tail
    shorter than a tile), rows past a tile (a short last one), in every build."""
    tile_rows, tile_tokens, chunk, group = prefill_sizes(shim)
    assert tile_rows > 1 and tile_tokens >= 1 and chunk > 1 and group > tile_tokens
    d, n, n_tokens = 32 * (2 * chunk + 3), 2 * tile_rows + 3, group + tile_tokens + 1
    assert_dot_tokens(shim, fmt, np.random.default_rng(7), d, n, tile_rows + 1, n_tokens, "")


@st.composite
def down_case(draw, fmt, max_blocks: int, k: int):
    """(rng, d, j0, j1, W_down^T blocks [k, d]): a width, a whole-block column range and the rows."""
    seed, blocks = draw(seeds), draw(st.integers(1, max_blocks))
    rng = np.random.default_rng(seed)
    b0 = draw(st.integers(0, blocks - 1))
    d = 32 * blocks
    return rng, d, 32 * b0, 32 * draw(st.integers(b0 + 1, blocks)), random_blocks(rng, fmt, k, d)


def assert_down_columns(out, want, j0, j1, what: str):
    """Columns [j0, j1) of out (..., d) are want's bit for bit, and nothing else was written."""
    assert_bits_equal(out[..., j0:j1], want[..., j0:j1], what, f"cols=[{j0}, {j1})")
    assert np.isnan(np.delete(out, np.s_[j0:j1], axis=-1)).all(), "columns outside [j0, j1) were written"


@given(fmt=formats, k=st.integers(1, 1300), density=st.floats(0.0, 1.0), data=st.data())
def test_down_columns_are_the_reference(shim, fmt, k, density, data):
    rng, d, j0, j1, wt = data.draw(down_case(fmt, 6, k))
    h3 = sparse_h3(rng, k, density)
    rows = np.flatnonzero(h3).astype(np.int32)
    out = np.full(d, np.nan, F32)
    call(shim, "bq_down_columns", fmt, wt, d, rows, np.ascontiguousarray(h3[rows]), rows.size, j0, j1, out)
    want = oc.down_projection(h3, bq.dequantize(wt, fmt, d))
    assert_down_columns(out, want, j0, j1, f"{fmt.name} down_columns_q, k={k}")


@given(fmt=formats, k=st.integers(1, 1100), n_tokens=st.integers(1, 20), data=st.data())
def test_down_columns_tokens_are_the_reference(shim, fmt, k, n_tokens, data):
    rng, d, j0, j1, wt = data.draw(down_case(fmt, 4, k))
    densities = data.draw(st.lists(st.sampled_from([0.0, 0.002, 0.1, 0.6, 1.0]), min_size=n_tokens,
                                   max_size=n_tokens))
    h3 = np.stack([sparse_h3(rng, k, p) for p in densities])
    out = np.full((n_tokens, d), np.nan, F32)
    call(shim, "bq_down_columns_tokens", fmt, wt, d, k, h3, n_tokens, j0, j1, out)
    deq = bq.dequantize(wt, fmt, d)
    want = np.stack([oc.down_projection(h3[t], deq) for t in range(n_tokens)])
    assert_down_columns(out, want, j0, j1, f"{fmt.name} down_columns_tokens_q, k={k} tokens={n_tokens}")


def test_the_narrow_builds_take_the_narrow_paths():
    """The SSE builds really use 4 floats a register, and no build is wider than the machine's
    own, so their agreement with the reference above checks paths other than the native one
    (on any x86-64 CPU at least the SSE ones)."""
    widths = {name: build_shim(flags).bq_vec_floats() for name, flags in FLAVOURS.items()}
    assert widths["sse4.1"] == widths["sse2"] == 4
    assert widths["native"] in (4, 8, 16) and widths["avx2"] in (4, 8) and widths["avx2"] <= widths["native"]


@given(fmt=formats, blocks=st.integers(1, 12), n=st.integers(1, 9), group=st.sampled_from([1, 4]), seed=seeds)
def test_int8_activation_dot_rows_are_the_reference(shim, fmt, blocks, n, group, seed):
    """x quantized per block as reference/q8_activation.py does (codes compared exactly), then
    each row's dot product in its 16-lane order, bit for bit (odd and even block counts)."""
    rng = np.random.default_rng(seed)
    d = 32 * blocks
    w, x = random_blocks(rng, fmt, n, d), widely_scaled(rng, d)
    x[rng.random(d) < 0.1] = 0                        # some zero blocks' worth, some exact zeros
    z, codes = np.full(n, np.nan, F32), np.zeros(d, np.int8)
    call(shim, "bq_q8_dot_rows", fmt, group, w, d, n, x, z, codes)
    want_codes, scales = q8.quantize_activation(x)
    assert np.array_equal(codes, want_codes)
    assert_bits_equal(z, q8.q8_row_dots(w, fmt, d, want_codes, scales), f"{fmt.name} int8 dot, {group} rows at once",
                      f"d={d} seed={seed}")
