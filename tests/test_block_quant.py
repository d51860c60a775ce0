"""Q8_0 / Q4_0 / Q4_1 blocks against the ``gguf`` package's quantizer, and the MLP on them."""
import gguf
import numpy as np
import pytest
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize
from hypothesis import given
from hypothesis import strategies as st

from sparseinfer.reference import block_quant as bq
from sparseinfer.reference import order_contract as oc
from sparseinfer.reference import quant_mlp as qm
from sparseinfer.reference.errors import SparseInferError
from sparseinfer.reference.mlp import MODES, mlp_dense, mlp_sparse
from sparseinfer.reference.signs import pack_signs

from helpers import WEIGHT_DTYPES, assert_bits_equal, mlp_weights, raises_one_line

F32 = np.float32
FORMATS = list(bq.FORMATS.values())
BLOCK_KINDS = ("normal", "zero", "negative", "ties", "equal", "opposite_extremes")
fmt_param = pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)


def format_id(v):
    return v.name if isinstance(v, bq.BlockFormat) else None


def gguf_type(fmt):
    return gguf.GGMLQuantizationType(fmt.gguf_type)


def tie_block(rng, fmt, scale):
    """A block whose x / d are exact half-integers (d a power of two): every rounding is a tie
    or exact, so the tie rule of each format decides the codes."""
    halves = rng.integers(-16, 17, bq.BLOCK) / 2
    if fmt is bq.Q8_0:
        b = rng.integers(-254, 255, bq.BLOCK) / 2
        b[rng.integers(bq.BLOCK)] = 127 * rng.choice([-1, 1])
    elif fmt is bq.Q4_0:
        b = np.clip(halves, -7.5, 7.5)
        b[rng.integers(bq.BLOCK)] = 8 * rng.choice([-1, 1])
    else:
        b = rng.integers(-20, 21) + np.abs(halves) * 15 / 8
        b = np.round(b * 2) / 2
        b[0], b[1] = b.min(), b.min() + 15    # max - min = 15: d = 1
        b = np.minimum(b, b[1])
    return b * scale


def random_block(rng, fmt, kind):
    scale = np.exp2(float(rng.integers(-28, 12)))   # fp16 subnormal scales up to large ones
    if kind == "zero":
        return np.zeros(bq.BLOCK)
    if kind == "ties":
        return tie_block(rng, fmt, scale)
    if kind == "equal":
        return np.full(bq.BLOCK, rng.standard_normal() * scale)
    b = rng.standard_normal(bq.BLOCK) * scale
    if kind == "negative":       # the largest magnitude is negative
        b[rng.integers(bq.BLOCK)] = -4 * np.abs(b).max()
    elif kind == "opposite_extremes":     # two elements of equal magnitude and opposite sign
        i, j = rng.choice(bq.BLOCK, 2, replace=False)
        b[i], b[j] = 4 * np.abs(b).max(), -4 * np.abs(b).max()
    return b


@st.composite
def matrices(draw, fmt):
    rows = draw(st.integers(1, 5))
    per_row = draw(st.integers(1, 4))
    kinds = draw(st.lists(st.sampled_from(BLOCK_KINDS), min_size=rows * per_row, max_size=rows * per_row))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    blocks = [random_block(rng, fmt, kind) for kind in kinds]
    return np.concatenate(blocks).astype(F32).reshape(rows, per_row * bq.BLOCK)


def assert_quantize_matches_gguf(w, fmt):
    ours = bq.quantize(w, fmt)
    theirs = gguf_quantize(w.astype(F32), gguf_type(fmt))
    assert ours.dtype == np.uint8 and ours.shape == theirs.shape == (w.shape[0], fmt.row_bytes(w.shape[1]))
    bad = np.argwhere(ours != theirs)
    assert bad.size == 0, f"{fmt.name}: {len(bad)} bytes differ, first at [row, byte] {bad[0].tolist()}"
    return ours


# --- the format table -----------------------------------------------------------------------

@fmt_param
def test_format_table_matches_gguf(fmt):
    t = gguf_type(fmt)
    assert t.name.lower() == fmt.name
    assert gguf.GGML_QUANT_SIZES[t] == (bq.BLOCK, fmt.block_bytes)
    assert fmt.block_bytes == fmt.header_bytes + bq.BLOCK * fmt.code_bits // 8
    assert bq.block_format(fmt.name.upper()) is fmt


@fmt_param
def test_matmulnbits_zero_point_reproduces_the_values(fmt):
    """MatMulNBits computes (u - zero_point) * scale from unsigned codes u; where the table
    names a zero point, that is exactly our dequantized value."""
    w = np.random.default_rng(3).standard_normal((4, 64)).astype(F32)
    blocks = bq.quantize(w, fmt).reshape(-1, fmt.block_bytes)
    deq = bq.dequantize(blocks.reshape(4, -1), fmt, 64).reshape(-1, bq.BLOCK)
    if fmt.matmulnbits_zero_point is None:
        assert fmt.has_min    # only q4_1 (an fp16 min, not an integer zero point) is left out
        return
    scale = blocks[:, :2].copy().view("<f2").astype(F32)
    raw = blocks[:, fmt.header_bytes:]
    u = (raw.view(np.int8).astype(np.int16) + 128 if fmt.code_bits == 8
         else np.concatenate([raw & 15, raw >> 4], axis=1).astype(np.int16))
    assert_bits_equal((u - fmt.matmulnbits_zero_point).astype(F32) * scale, deq, f"{fmt.name} as MatMulNBits")


# --- quantization and dequantization against gguf -------------------------------------------

@fmt_param
@given(data=st.data())
def test_quantize_is_byte_identical_to_gguf(fmt, data):
    assert_quantize_matches_gguf(data.draw(matrices(fmt)), fmt)


@pytest.mark.parametrize("dtype", WEIGHT_DTYPES[1:], ids=lambda t: np.dtype(t).name)
@fmt_param
def test_quantize_widens_fp16_and_bf16_exactly(fmt, dtype):
    w = np.random.default_rng(5).standard_normal((3, 96)).astype(dtype)
    assert_quantize_matches_gguf(w, fmt)
    assert np.array_equal(bq.quantize(w, fmt), bq.quantize(w.astype(F32), fmt))


@fmt_param
@given(data=st.data())
def test_dequantize_is_bit_identical_to_gguf(fmt, data):
    """On our own blocks and on arbitrary bytes with finite fp16 headers (any file's blocks)."""
    w = data.draw(matrices(fmt))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    arbitrary = rng.integers(0, 256, (3, fmt.row_bytes(64)), dtype=np.uint8).reshape(-1, fmt.block_bytes)
    header = rng.standard_normal((arbitrary.shape[0], fmt.header_bytes // 2)) * np.exp2(rng.integers(-24, 12, (1,)))
    arbitrary[:, :fmt.header_bytes] = header.astype("<f2").view(np.uint8)
    for blocks, cols in ((bq.quantize(w, fmt), w.shape[1]), (arbitrary.reshape(3, -1), 64)):
        ours = bq.dequantize(blocks, fmt, cols)
        assert ours.dtype == F32
        assert_bits_equal(ours, gguf_dequantize(blocks, gguf_type(fmt)), f"{fmt.name} dequantize")


@fmt_param
@given(data=st.data())
def test_roundtrip_error_within_the_derived_bound(fmt, data):
    w = data.draw(matrices(fmt))
    err = np.abs(w.astype(np.float64) - bq.dequantize(bq.quantize(w, fmt), fmt, w.shape[1]))
    bound = bq.roundtrip_error_bound(w, fmt)
    over = np.argwhere(err > bound)
    assert over.size == 0, f"{fmt.name}: error {err[tuple(over[0])]} > bound {bound[tuple(over[0])]} at {over[0]}"


@fmt_param
def test_bound_is_tight_and_half_a_step_is_not_enough(fmt):
    """The bound is nearly reached; |w - deq| <= |D|/2 alone fails (fp16 rounding of the scale
    and min after the codes are chosen, and q4_0's clipped code +7)."""
    rng = np.random.default_rng(11)
    w = (rng.standard_normal((64, 256)) * np.exp2(rng.integers(-20, 4, (64, 1)))).astype(F32)
    blocks = bq.quantize(w, fmt)
    err = np.abs(w.astype(np.float64) - bq.dequantize(blocks, fmt, 256))
    assert (err / bq.roundtrip_error_bound(w, fmt)).max() > 0.9
    stored_d = blocks.reshape(-1, fmt.block_bytes)[:, :2].copy().view("<f2").astype(np.float64)
    assert (err.reshape(-1, bq.BLOCK) > np.abs(stored_d) / 2).any()


# --- the rounding rules, by hand -------------------------------------------------------------

def one_block(values):
    b = np.zeros(bq.BLOCK, F32)
    b[:len(values)] = values
    return b[None, :]


@pytest.mark.parametrize("fmt, values, expected", [
    # ties away from zero (np.round would give 2, -2, 0, 0)
    (bq.Q8_0, [127, 2.5, -2.5, 0.5, -0.5, -127], [127, 3, -3, 1, -1, -127]),
    # d = -8 / -8 = 1; trunc(x + 8.5): ties go up; +8 and +7.5 clip to code 15 (value 7)
    (bq.Q4_0, [-8, 2.5, -2.5, 0.5, -0.5, 8, 7.5], [-8, 3, -2, 1, 0, 7, 7]),
    # min 0, max 15: d = 1; trunc(x + 0.5)
    (bq.Q4_1, [0, 15, 2.5, 0.5, 14.5], [0, 15, 3, 1, 15]),
], ids=format_id)
def test_tie_and_clip_rules(fmt, values, expected):
    w = one_block(values)
    got = bq.dequantize(assert_quantize_matches_gguf(w, fmt), fmt, bq.BLOCK)[0, :len(values)]
    assert got.tolist() == expected


def test_q4_nibble_layout_and_header_bytes():
    """Byte j of the nibbles holds weight j low and weight j + 16 high; d is little-endian fp16."""
    codes = np.array([0] + [(j * 7 + 3) % 16 for j in range(1, bq.BLOCK)], dtype=np.uint8)
    w = (codes.astype(F32) - 8)[None, :]     # weight 0 = -8 has the largest magnitude: d = 1
    blocks = assert_quantize_matches_gguf(w, bq.Q4_0)[0]
    assert blocks[:2].tolist() == [0x00, 0x3C]
    assert blocks[2:].tolist() == [int(codes[j] | codes[j + 16] << 4) for j in range(16)]
    zero = bq.quantize(np.zeros((1, bq.BLOCK), F32), bq.Q4_0)[0]
    assert zero[2:].tolist() == [0x88] * 16    # 1/d taken as 0: every code is 8


# --- bad input --------------------------------------------------------------------------------

def _one_line_error(fn, *match):
    raises_one_line(fn, *match, error=SparseInferError)


@pytest.mark.parametrize("fmt, field, value", [
    (fmt, field, value) for fmt in FORMATS
    for field, value in (("scale d", np.nan), ("scale d", np.inf), ("min m", -np.inf)) if fmt.has_min or field != "min m"
], ids=format_id)
def test_non_finite_scale_or_min_names_tensor_and_block(fmt, field, value):
    blocks = bq.quantize(np.ones((3, 128), F32), fmt)
    offset = 2 * fmt.block_bytes + (2 if field == "min m" else 0)     # row 1, block 2
    blocks[1, offset:offset + 2] = np.array([value], "<f2").view(np.uint8)
    for fn in (lambda: bq.check_blocks(blocks, fmt, "blk.3.ffn_up.weight"),
               lambda: bq.dequantize(blocks, fmt, 128, "blk.3.ffn_up.weight")):
        _one_line_error(fn, "blk.3.ffn_up.weight", "block 2 of row 1", "block 6 overall", field)


def test_non_finite_weights_and_scale_overflow_are_refused():
    w = np.ones((2, 64), F32)
    w[1, 40] = np.nan
    _one_line_error(lambda: bq.quantize(w, "q4_0", "w_gate"), "w_gate", "[1, 40]", "block 1 of row 1")
    big = np.full((1, 32), 1e7, F32)      # 1e7 / 127 is past fp16's 65504
    _one_line_error(lambda: bq.quantize(big, "q8_0", "w_up"), "w_up", "block 0 of row 0", "overflow")


@fmt_param
def test_columns_not_a_multiple_of_32_are_refused(fmt):
    _one_line_error(lambda: bq.quantize(np.ones((2, 48), F32), fmt, "w_down_t"), "w_down_t", "48 columns",
                    "multiple of 32")
    blocks = bq.quantize(np.ones((2, 64), F32), fmt)
    _one_line_error(lambda: bq.dequantize(blocks, fmt, 48, "w_up"), "w_up", "multiple of 32")
    _one_line_error(lambda: bq.dequantize(blocks, fmt, 96, "w_up"), "w_up", "96 columns")
    _one_line_error(lambda: bq.dequantize(blocks[:, 1:], fmt, 64, "w_up"), "w_up", f"n * {fmt.block_bytes}")


def test_unknown_format_names_the_supported_ones():
    _one_line_error(lambda: bq.block_format("q4_k"), "q4_k", "q8_0, q4_0, q4_1")


# --- the MLP on quantized weights -------------------------------------------------------------

@fmt_param
@given(d_blocks=st.integers(1, 6), k=st.integers(48, 160), sparsity=st.floats(0.3, 0.8),
       alpha=st.sampled_from([0.9, 1.0, 1.1]), mode=st.sampled_from(MODES), seed=st.integers(0, 2**32 - 1))
def test_quantized_mlp_is_the_float_mlp_on_dequantized_weights(fmt, d_blocks, k, sparsity, alpha, mode, seed):
    x, w_gate, w_up, w_down = mlp_weights(np.random.default_rng(seed), 32 * d_blocks, k, sparsity=sparsity)
    weights = qm.QuantizedMLPWeights.quantize(w_gate, w_up, w_down, fmt)
    g, u, dt = weights.dequantized()
    out, trace = qm.mlp_sparse_quant(x, weights, "relu", alpha=alpha, mode=mode)
    want, want_trace = mlp_sparse(x, g, u, dt.T, "relu", alpha=alpha, mode=mode, w_signs=pack_signs(g),
                                  v_width=oc.BLOCK_VECTOR_WIDTH)
    assert_bits_equal(out, want, f"{fmt.name} sparse", f"mode={mode}")
    assert np.array_equal(trace.predicted_zero, want_trace.predicted_zero)
    dense = qm.mlp_dense_quant(x, weights, "relu")
    assert_bits_equal(dense, mlp_dense(x, g, u, dt.T, "relu", v_width=oc.BLOCK_VECTOR_WIDTH), f"{fmt.name} dense")
    assert 0 < trace.rows["gate"] < k, "some rows skipped, some kept"
    assert not np.array_equal(dense, mlp_dense(x, w_gate, w_up, w_down, "relu")), "quantization changed nothing"
    row_bytes = fmt.row_bytes(32 * d_blocks)
    assert trace.weight_dtype == fmt.name
    assert trace.weight_bytes_read["up"] == trace.rows["up"] * row_bytes


@fmt_param
def test_quantized_mlp_row_dot_products_take_one_weight_a_lane(fmt):
    """The gate and up dot products run with V = 1 (one block per iteration of the lanes), not
    the fp32 width 4: on this data the two orders give other bits, and the op's are V = 1's."""
    x, w_gate, w_up, w_down = mlp_weights(np.random.default_rng(17), 512, 256)
    weights = qm.QuantizedMLPWeights.quantize(w_gate, w_up, w_down, fmt)
    g, u, dt = weights.dequantized()
    dense = qm.mlp_dense_quant(x, weights, "relu")
    assert_bits_equal(dense, mlp_dense(x, g, u, dt.T, "relu", v_width=1), f"{fmt.name} dense, V = 1")
    assert not np.array_equal(dense, mlp_dense(x, g, u, dt.T, "relu")), "V = 1 and V = 4 agree on this data"
    sparse, _ = qm.mlp_sparse_quant(x, weights, "relu", mode="oracle")
    assert not np.array_equal(sparse, mlp_sparse(x, g, u, dt.T, "relu", mode="oracle")[0])


def test_quantized_weights_refuse_bad_blocks():
    x, w_gate, w_up, w_down = mlp_weights(np.random.default_rng(2), 64, 40)
    w = qm.QuantizedMLPWeights.quantize(w_gate, w_up, w_down, "q4_1")
    bad_up = w.up.copy()
    bad_up[7, 22:24] = np.array([np.nan], "<f2").view(np.uint8)      # row 7, block 1's scale
    _one_line_error(lambda: qm.QuantizedMLPWeights(w.fmt, w.down_fmt, 64, 40, w.gate, bad_up, w.down_t),
                    "w_up", "block 1 of row 7")
    _one_line_error(lambda: qm.QuantizedMLPWeights(w.fmt, w.down_fmt, 64, 41, w.gate, w.up, w.down_t),
                    "w_gate", "k = 41")


# --- a GGUF ffn_down, re-blocked along d ------------------------------------------------------

@fmt_param
def test_reblock_down_options(fmt):
    rng = np.random.default_rng(4)
    d, k = 96, 160
    file_down = bq.quantize((rng.standard_normal((d, k)) / np.sqrt(k)).astype(F32), fmt)   # blocks along k
    reference = bq.dequantize(file_down, fmt, k).T
    for option in qm.DOWN_OPTIONS:
        blocks, target = qm.reblock_down(file_down, fmt, k, option)
        assert target is (fmt if option == "same" else bq.Q8_0)
        assert blocks.shape == (k, target.row_bytes(d))
        err = np.abs(reference.astype(np.float64) - bq.dequantize(blocks, target, d))
        assert (err <= bq.roundtrip_error_bound(reference, target)).all()
    errors = qm.reblock_down_errors(file_down, fmt, k)
    assert set(errors) == set(qm.DOWN_OPTIONS)
    for e in errors.values():
        assert 0 < e["max_abs"] and 0 < e["rel_frobenius"] < 0.2
    if fmt is bq.Q8_0:
        assert errors["same"] == errors["q8_0"]
    else:   # keeping down^T in Q8_0 is several times closer to the file than 4 bits again
        assert errors["q8_0"]["rel_frobenius"] * 4 < errors["same"]["rel_frobenius"]
    _one_line_error(lambda: qm.reblock_down(file_down, fmt, k, "q4_k"), "q4_k", "same, q8_0")
