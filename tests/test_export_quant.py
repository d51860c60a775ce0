"""Quantized exports (``export --quantize q8_0|q4_0|q4_1``, sparse and ``--dense``): which nodes
run each linear layer, decoding against the reference model on the dequantized weights, a
GGUF's blocks byte for byte in the export, the checkpoint read one layer at a time, and the
refusals (combinations, d, NaN weights and scales) before anything is written.

Tolerance for logits (as tests/test_export_onnx.py derives it): every weight the export
computes with is exactly the dequantized one (``quant_linear``: MatMulNBits' ``(code - zero
point) * scale`` has at most 19 significant bits; the op library dequantizes by the reference's
rule), so the export and ``reference.llama`` on the dequantized weights differ only in the
order of float32 sums: within ``n * 2^-24`` relative for the longest dot product (n = the
intermediate size), RMSNorm renormalising between layers: ``GAMMA_K * (1 + max|logit|)``. Sparse
logits get the same bound once both are shown to skip exactly the same rows.
"""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from helpers import (finish_gguf, genai_greedy, gguf_tensors, greedy_steps, one_line_error, run_cli as run,
                     write_gguf_llama_vocab, write_gguf_shape)
from sparseinfer.model_export.decode import OnnxDecoder
from sparseinfer.model_export.export import ExportOptions, export_onnx
from sparseinfer.model_export.export_check import check_export, export_info
from sparseinfer.model_export.generation import generate
from sparseinfer.model_export.gguf_blocks import down_blocks
from sparseinfer.model_export.loaders import open_checkpoint
from sparseinfer.model_export.loaders.gguf_file import rope_unpermute
from sparseinfer.model_export.loaders.weights import OpenCheckpoint
from sparseinfer.model_export.op_library import BLOCK_MATMUL_TYPE, DOMAIN, OP_TYPE
from sparseinfer.model_export.quant_linear import gguf_nibbles
from sparseinfer.model_export.quant_weights import QuantizedModel
from sparseinfer.model_export.session import resolve_mlp_kernels
from sparseinfer.model_export.synthetic import make_weights, synthetic_shape, write_checkpoint
from sparseinfer.reference import block_quant as bq
from sparseinfer.reference.errors import SparseInferError
from sparseinfer.reference.llama import LlamaReference
from sparseinfer.reference.quant_mlp import QuantizedMLPWeights, mlp_sparse_quant

PROMPT = [256, 84, 104, 101, 32, 113, 117, 105, 99, 107]
DECODE_STEPS = 4
FORMATS = list(bq.FORMATS)
MODES = [pytest.param(True, id="sparse"), pytest.param(False, id="dense")]
# d 256 (head_dim 64: no padding), k 576: whole blocks along d and along k
QSHAPE = replace(synthetic_shape("tiny", layers=2), hidden_size=256, intermediate_size=576)
# head_dim 40 (GroupQueryAttention runs at 48: padded heads), k 552: not whole blocks along k
PADDED_SHAPE = replace(synthetic_shape("tiny", layers=2), hidden_size=160, intermediate_size=552)


def _tol(logits, n):
    return n * 2.0 ** -24 * (1 + float(np.abs(logits).max()))


@pytest.fixture(scope="module")
def weights():
    return make_weights(QSHAPE, seed=5)


def _nodes(model, op_type, domain=None):
    return [n for n in model.graph.node if n.op_type == op_type and (domain is None or n.domain == domain)]


def _attrs(node) -> dict:
    values = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    return {k: v.decode() if isinstance(v, bytes) else v for k, v in values.items()}


def _initializers(model) -> dict:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _decode_both(path, reference, debug=False):
    """Prefill + DECODE_STEPS greedy steps in the export (native op library) and the reference."""
    decoder = OnnxDecoder(path, "cpu")
    assert decoder.mlp_kernels == "native" or not decoder.sparse
    return greedy_steps(decoder, reference, PROMPT, DECODE_STEPS)


# --- the graph -------------------------------------------------------------------------------

@pytest.mark.parametrize("sparse", MODES)
@pytest.mark.parametrize("fmt,level", [("q4_0", 0), ("q8_0", 0), ("q4_1", 0), ("q4_0", 4), ("q8_0", 4)])
def test_every_linear_layer_runs_on_blocks(tmp_path, weights, fmt, level, sparse):
    """MatMulNBits where it holds the format and has a fast kernel for it (q4_0; q8_0 at accuracy
    level 4 only), else BlockMatMul; the MLP as SparseMLP on blocks, or dense of MatMulNBits."""
    path = export_onnx(weights, tmp_path / "m.onnx", ExportOptions(sparse=sparse, quantize=fmt, accuracy_level=level))
    model = onnx.load(str(path))
    layers = QSHAPE.num_layers
    assert not _nodes(model, "MatMul") and not _nodes(model, "Gemm")           # no float weight left
    assert not model.functions                                                  # no body: the op library runs it
    nbits, block_mm = _nodes(model, "MatMulNBits"), _nodes(model, BLOCK_MATMUL_TYPE, DOMAIN)
    mlps = _nodes(model, OP_TYPE, DOMAIN)
    attention_and_head = 2 * layers + 1                         # qkv_proj and o_proj per layer, the LM head
    on_nbits = fmt == "q4_0" or (fmt == "q8_0" and level == 4)
    if not on_nbits:                                            # q4_1 has no exact MatMulNBits, q8_0 no fast one
        assert not nbits and len(block_mm) == attention_and_head
        assert {_attrs(n)["weight_format"] for n in block_mm} == {fmt}
    else:
        dense_nbits = 0 if sparse else 3 * layers               # gate, up and down
        assert not block_mm and len(nbits) == attention_and_head + dense_nbits
        assert {_attrs(n)["bits"] for n in nbits} == {4 if fmt == "q4_0" else 8}
        assert {_attrs(n)["accuracy_level"] for n in nbits} == {level}
    if sparse or not on_nbits:
        assert len(mlps) == layers
        for node in mlps:
            a = _attrs(node)
            assert (a["weight_format"], a["down_format"], a.get("dense", 0)) == (fmt, fmt, 0 if sparse else 1)
            inits = _initializers(model)
            gate, up, down_t, signs = (inits[name] for name in node.input[1:5])
            row = bq.block_format(fmt).row_bytes(QSHAPE.d)
            assert gate.dtype == up.dtype == down_t.dtype == np.uint8
            assert gate.shape == up.shape == down_t.shape == (QSHAPE.k, row)
            assert signs.dtype == np.uint64 and signs.shape == (QSHAPE.k, -(-QSHAPE.d // 64))
    else:
        assert not mlps
    meta = {p.key: p.value for p in model.metadata_props}
    assert (meta["sparseinfer.quantize"], meta["sparseinfer.sparse"]) == (fmt, str(sparse))
    assert meta["sparseinfer.accuracy_level"] == str(level)
    info = export_info(path)
    assert (info.quantize, info.sparse) == (fmt, sparse)


def test_a_checkpoint_is_quantized_by_the_reference_quantizer(weights):
    """The export's blocks are reference.block_quant's: W_gate, W_up and W_down^T along d for the
    SparseMLP op; for a dense MatMulNBits MLP, W_down as it is stored (along k)."""
    for fmt in FORMATS:
        lw, w = QuantizedModel.of_weights(weights, fmt, sparse=True).layer(1), weights.layers[1]
        ref = QuantizedMLPWeights.quantize(w.gate, w.up, w.down, fmt)
        assert lw.down_transposed and lw.gate.fmt is lw.down.fmt is bq.block_format(fmt)
        for got, want in ((lw.gate, ref.gate), (lw.up, ref.up), (lw.down, ref.down_t)):
            assert np.array_equal(got.blocks, want)
        assert np.array_equal(lw.q.blocks, bq.quantize(w.q, fmt))
    dense = QuantizedModel.of_weights(weights, "q4_0", sparse=False).layer(0)
    assert not dense.down_transposed and np.array_equal(dense.down.blocks, bq.quantize(weights.layers[0].down, "q4_0"))
    assert QuantizedModel.of_weights(weights, "q8_0", sparse=False).layer(0).down_transposed      # BlockMatMul's
    assert not QuantizedModel.of_weights(weights, "q8_0", sparse=False, accuracy_level=4).layer(0).down_transposed


def test_the_checkpoint_is_read_one_layer_at_a_time(tmp_path, weights):
    """Each layer's tensors are read once, after the layer before it is exported and before its
    own is done: never the whole model at once."""
    events = []
    with open_checkpoint(write_checkpoint(weights, tmp_path / "ck", dtype="bf16")) as ck:
        def get(name):
            events.append(name)
            return ck.get(name)

        source = OpenCheckpoint(ck.shape, ck.tokenizer, ck.source, get)
        export_onnx(source, tmp_path / "m.onnx", ExportOptions(quantize="q8_0"),
                    progress=lambda: events.append("layer done"))
    done = [j for j, e in enumerate(events) if e == "layer done"]
    assert len(done) == QSHAPE.num_layers
    for i in range(QSHAPE.num_layers):
        reads = [j for j, e in enumerate(events) if e.startswith(f"model.layers.{i}.")]
        assert len(reads) == len({events[j] for j in reads}) == 9                # each of its 9 tensors, once
        assert (done[i - 1] if i else -1) < min(reads) and max(reads) < done[i]


def test_check_export_reads_the_format_and_the_dense_mlps_of_the_op(tmp_path, weights):
    path = export_onnx(weights, tmp_path / "m.onnx", ExportOptions(sparse=False, quantize="q4_1"))
    model = onnx.load(str(path))
    assert check_export(model, path).quantize == "q4_1"            # dense, its MLPs SparseMLP with dense=1

    def with_meta(key, value):
        changed = onnx.ModelProto()
        changed.CopyFrom(model)
        meta = {p.key: p.value for p in changed.metadata_props}
        meta[key] = value
        if value is None:
            del meta[key]
        del changed.metadata_props[:]
        onnx.helper.set_model_props(changed, meta)
        return changed

    with pytest.raises(SparseInferError, match="metadata sparseinfer.quantize = 'q5_0' is not one of q8_0, q4_0, q4_1"):
        check_export(with_meta("sparseinfer.quantize", "q5_0"), path)
    with pytest.raises(SparseInferError, match="dense and unquantized, but the graph holds 2 SparseMLP nodes"):
        check_export(with_meta("sparseinfer.quantize", None), path)
    with pytest.raises(SparseInferError, match="calls it sparse, but the graph holds 2 SparseMLP nodes with dense=1"):
        check_export(with_meta("sparseinfer.sparse", "True"), path)


def test_a_quantized_export_never_falls_back_to_function_bodies(monkeypatch):
    """Its block nodes have no body: where the library cannot be had, 'auto' is an error naming
    why, not a silent fallback (which a float sparse export still gets)."""
    from sparseinfer.model_export import op_library

    def no_library():
        raise SparseInferError("g++ not found")

    monkeypatch.setattr(op_library, "cpu_library", no_library)
    assert resolve_mlp_kernels("auto", True, "cpu") == ("function", None)
    with pytest.raises(SparseInferError, match="^m.onnx: needs it, which cannot be had here: g\\+\\+ not found$"):
        resolve_mlp_kernels("auto", True, "cpu", required="m.onnx: needs it")
    with pytest.raises(SparseInferError, match="^m.onnx: needs it; --mlp-kernels function cannot run it"):
        resolve_mlp_kernels("function", True, "cpu", required="m.onnx: needs it")
    assert resolve_mlp_kernels("auto", False, "cpu", required="m.onnx: needs it") == ("function", None)


# --- decoding against the reference -------------------------------------------------------------

@pytest.mark.native
@pytest.mark.parametrize("sparse", MODES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_decode_matches_the_reference_on_the_dequantized_weights(tmp_path, weights, fmt, sparse):
    path = export_onnx(weights, tmp_path / "m.onnx", ExportOptions(sparse=sparse, quantize=fmt, debug=sparse,
                                                                   alpha="1.02@0,1.00"))
    model = QuantizedModel.of_weights(weights, fmt, sparse)
    deq = model.dequantized()
    reference = LlamaReference(deq, sparse=sparse, alpha="1.02@0,1.00")
    assert not np.array_equal(deq.layers[0].gate, weights.layers[0].gate)      # quantization changed them
    for got, want, debug, ref_step in _decode_both(path, reference):
        assert np.abs(want).max() > 0.5
        np.testing.assert_allclose(got, want, rtol=0, atol=_tol(want, QSHAPE.k))
        if ref_step is None or not sparse:
            continue
        for i in range(QSHAPE.num_layers):
            # the op's masks on its own MLP input are the quantized reference's, bit for bit
            lw = model.layer(i)
            x = debug[f"debug.{i}.mlp_input"].reshape(-1)
            blocks = QuantizedMLPWeights(lw.gate.fmt, lw.down.fmt, QSHAPE.d, QSHAPE.k, lw.gate.blocks, lw.up.blocks,
                                         lw.down.blocks)
            _, trace = mlp_sparse_quant(x, blocks, deq.activation, alpha=reference.alpha_milli[i] / 1000)
            assert 0 < trace.predicted_zero.sum() < QSHAPE.k
            assert np.array_equal(debug[f"debug.{i}.predicted_zero"], trace.predicted_zero)
            assert np.array_equal(debug[f"debug.{i}.actual_zero"], trace.actual_zero)
            assert np.array_equal(debug[f"debug.{i}.rows"], np.flatnonzero(trace.computed_up))
            assert np.array_equal(trace.predicted_zero, ref_step.traces[i].predicted_zero)


@pytest.mark.native
@pytest.mark.parametrize("fmt,sparse,tie", [("q4_0", False, False), ("q4_1", True, False), ("q8_0", True, True)])
def test_padded_heads_a_dense_op_mlp_and_a_tied_head(tmp_path, fmt, sparse, tie):
    """head_dim 40 runs at 48 in GroupQueryAttention: Q, K and V get zero rows of blocks and
    o_proj reads the real columns only (a Gather), keeping its own blocks; k = 552 is no whole
    number of blocks along k, so a dense MLP runs in the op (dense=1); a tied LM head is the
    embedding's blocks, the embedding itself stays float32."""
    w = make_weights(replace(PADDED_SHAPE, tie_word_embeddings=tie), seed=2)
    path = export_onnx(w, tmp_path / "m.onnx", ExportOptions(sparse=sparse, quantize=fmt))
    model = onnx.load(str(path))
    gathers = [n for n in _nodes(model, "Gather") if n.name.endswith("o_proj/Gather")]
    assert len(gathers) == PADDED_SHAPE.num_layers
    mlps = _nodes(model, OP_TYPE, DOMAIN)
    assert len(mlps) == PADDED_SHAPE.num_layers and {_attrs(n).get("dense", 0) for n in mlps} == {0 if sparse else 1}
    inits = _initializers(model)
    assert inits["model.embed_tokens.weight"].dtype == np.float32
    deq = QuantizedModel.of_weights(w, fmt, sparse).dequantized()
    if tie:
        assert np.array_equal(deq.lm_head, bq.dequantize(bq.quantize(w.embed, fmt), fmt, PADDED_SHAPE.d))
    for got, want, _, _ in _decode_both(path, LlamaReference(deq, sparse=sparse)):
        np.testing.assert_allclose(got, want, rtol=0, atol=_tol(want, PADDED_SHAPE.k))


# --- a GGUF's blocks -----------------------------------------------------------------------------

def _write_gguf(path, w, main, overrides=None):
    """A Llama GGUF of ``w``: norms F32, the embedding F32, every other matrix in ``main``
    (``overrides``: GGUF name suffix -> type), Q and K rope-permuted as llama.cpp stores them."""
    gguf = pytest.importorskip("gguf")
    s = w.shape
    writer = gguf.GGUFWriter(str(path), "llama")
    write_gguf_shape(writer, s)
    writer.add_layer_norm_rms_eps(s.rms_norm_eps)
    writer.add_rope_freq_base(s.rope_theta)
    writer.add_string("llama.hidden_act", "fatrelu")
    writer.add_float32("llama.hidden_act_param", 0.01)
    vocab = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(s.vocab_size - 3)]
    write_gguf_llama_vocab(writer, vocab)
    stored = {}
    for _, name, arr in gguf_tensors(w):
        qtype = next((t for suffix, t in (overrides or {}).items() if name.endswith(suffix)), main)
        if arr.ndim == 2 and name != "token_embd.weight":
            stored[name] = gguf.quants.quantize(arr, qtype)
            writer.add_tensor(name, stored[name], raw_dtype=qtype)
        else:
            writer.add_tensor(name, arr)
    finish_gguf(writer)
    return stored


def _linear_blocks(model, inits, scope) -> np.ndarray:
    """The GGUF block bytes [rows, blocks * block_bytes] of the linear layer in ``scope``, put
    back together from MatMulNBits' B and scales, or BlockMatMul's own."""
    node = next(n for n in model.graph.node if n.name.startswith(scope + "/") and
                n.op_type in ("MatMulNBits", BLOCK_MATMUL_TYPE))
    if node.op_type == BLOCK_MATMUL_TYPE:
        return inits[node.input[1]]
    b, scales = inits[node.input[1]], inits[node.input[2]]
    codes = gguf_nibbles(b) if _attrs(node)["bits"] == 4 else b ^ np.uint8(0x80)
    header = scales.astype("<f2").view(np.uint8).reshape(*scales.shape, 2)
    return np.concatenate([header, codes], axis=-1).reshape(b.shape[0], -1)


@pytest.mark.native
@pytest.mark.parametrize("main", ["Q4_0", "Q4_1"])
def test_a_gguf_travels_byte_exact_and_decodes_like_its_dequantized_model(tmp_path, main):
    gguf = pytest.importorskip("gguf")
    Q = gguf.GGMLQuantizationType
    w = make_weights(QSHAPE, seed=8)
    # attn_v and the LM head in Q8_0: Q, K and V in two formats run as three linear layers
    stored = _write_gguf(tmp_path / "m.gguf", w, Q[main], {"attn_v.weight": Q.Q8_0, "output.weight": Q.Q8_0})
    fmt = main.lower()
    notes = {}
    for sparse in (True, False):
        out = tmp_path / ("sparse" if sparse else "dense") / "model.onnx"
        with open_checkpoint(tmp_path / "m.gguf") as ck:
            path = export_onnx(ck, out, ExportOptions(sparse=sparse, quantize=fmt),
                               note=lambda line: notes.setdefault(sparse, []).append(line))
            deq = QuantizedModel(ck, fmt, sparse).dequantized()
        model = onnx.load(str(path))
        inits = _initializers(model)
        for i in range(QSHAPE.num_layers):
            sc = f"/model/layers.{i}/attn"
            for name, heads in (("q", QSHAPE.num_heads), ("k", QSHAPE.num_kv_heads), ("v", None)):
                want = stored[f"blk.{i}.attn_{name}.weight"]
                want = want if heads is None else rope_unpermute(want, heads)
                assert np.array_equal(_linear_blocks(model, inits, f"{sc}/{name}_proj"), want), (i, name)
            assert np.array_equal(_linear_blocks(model, inits, f"{sc}/o_proj"), stored[f"blk.{i}.attn_output.weight"])
            mlp = next(n for n in _nodes(model, OP_TYPE, DOMAIN) if n.name.startswith(f"/model/layers.{i}/")) \
                if sparse or main == "Q4_1" else None
            if mlp is not None:       # W_gate and W_up as in the file; ffn_down re-blocked along d in q8_0
                assert np.array_equal(inits[mlp.input[1]], stored[f"blk.{i}.ffn_gate.weight"])
                assert np.array_equal(inits[mlp.input[2]], stored[f"blk.{i}.ffn_up.weight"])
                assert _attrs(mlp)["down_format"] == "q8_0"
                with open_checkpoint(tmp_path / "m.gguf") as ck:
                    reblocked = down_blocks(ck.gguf_tensor(f"model.layers.{i}.mlp.down_proj.weight"), fmt).blocks
                assert np.array_equal(inits[mlp.input[3]], reblocked)
            else:                     # the dense MLP of MatMulNBits: the file's three tensors as they are
                for proj, gg in (("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")):
                    got = _linear_blocks(model, inits, f"/model/layers.{i}/mlp/{proj}")
                    assert np.array_equal(got, stored[f"blk.{i}.{gg}.weight"]), (i, proj)
        assert np.array_equal(_linear_blocks(model, inits, "/lm_head"), stored["output.weight"])
        for got, want, _, _ in _decode_both(path, LlamaReference(deq, sparse=sparse)):
            np.testing.assert_allclose(got, want, rtol=0, atol=_tol(want, QSHAPE.k))
    assert any("blk.*.ffn_down.weight" in line and "re-blocked" in line and "(x2)" in line for line in notes[True])
    assert any("byte for byte" in line for line in notes[True])


# --- the command line: refusals, NaN, bench-decode ----------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, weights):
    return write_checkpoint(weights, tmp_path_factory.mktemp("quant") / "ck")


@pytest.mark.parametrize("flags,why", [
    (["--quantize", "q4_0", "--portable"], "needs the fused form"),
    (["--quantize", "q4_0", "--dtype", "float16"], "computes in float32"),
    (["--quantize", "q4_0", "--target", "cuda"], "a --quantize export carries none"),
    (["--accuracy-level", "4"], "--accuracy-level applies to --quantize exports")])
def test_combinations_that_make_no_sense_are_refused(tmp_path, checkpoint, flags, why):
    r = run("export", checkpoint, "--out", tmp_path / "e" / "model.onnx", *flags)
    one_line_error(r, why)
    assert not (tmp_path / "e").exists()


def test_bench_decode_refuses_function_bodies_for_quantized_exports(tmp_path, checkpoint):
    r = run("bench-decode", "--checkpoint", checkpoint, "--quantize", "q8_0", "--mlp-kernels", "function",
            "--work-dir", tmp_path / "w")
    one_line_error(r, "carry no function body")
    assert not (tmp_path / "w").exists()


def test_d_not_a_multiple_of_32_is_refused(tmp_path):
    ck = write_checkpoint(make_weights(synthetic_shape("tiny", layers=1), seed=0), tmp_path / "ck")   # d = 200
    r = run("export", ck, "--out", tmp_path / "e" / "model.onnx", "--quantize", "q8_0")
    one_line_error(r, "hidden size d = 200 is not a multiple of 32")
    assert not (tmp_path / "e").exists()


def test_a_nan_weight_is_named_with_its_block_and_nothing_is_written(tmp_path, weights):
    bad = make_weights(QSHAPE, seed=5)
    bad.layers[1].up[3, 70] = np.nan
    ck = write_checkpoint(bad, tmp_path / "ck")
    r = run("export", ck, "--out", tmp_path / "e" / "model.onnx", "--quantize", "q4_1")
    one_line_error(r, "tensor model.layers.1.mlp.up_proj.weight", "weight [3, 70] is nan (block 2 of row 3)")
    assert not (tmp_path / "e").exists()


def test_a_nan_scale_in_a_gguf_block_is_named_and_nothing_is_written(tmp_path):
    gguf = pytest.importorskip("gguf")
    w = make_weights(QSHAPE, seed=1)
    stored = _write_gguf(tmp_path / "ok.gguf", w, gguf.GGMLQuantizationType.Q4_0)
    data = bytearray((tmp_path / "ok.gguf").read_bytes())
    gate = stored["blk.1.ffn_gate.weight"]
    at = bytes(data).find(gate.tobytes())                            # the tensor's bytes in the file
    assert at > 0
    row_bytes, block = gate.shape[1], 2
    offset = at + 5 * row_bytes + block * bq.Q4_0.block_bytes        # row 5, block 2: its fp16 scale
    data[offset:offset + 2] = np.array([np.nan], "<f2").tobytes()
    (tmp_path / "nan.gguf").write_bytes(bytes(data))
    r = run("export", tmp_path / "nan.gguf", "--out", tmp_path / "e" / "model.onnx", "--quantize", "q4_0")
    one_line_error(r, "blk.1.ffn_gate.weight", "block 2 of row 5", "scale d = nan")
    assert not (tmp_path / "e").exists()


@pytest.mark.native
def test_export_cli_notes_and_json(tmp_path, checkpoint):
    r = run("export", checkpoint, "--out", tmp_path / "e" / "model.onnx", "--quantize", "q4_0", "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert (info["quantize"], info["sparse"]) == ("q4_0", True)
    assert "note: " in r.stderr and "quantized to q4_0 at export" in r.stderr
    config = json.loads((tmp_path / "e" / "genai_config.json").read_text())
    assert (tmp_path / "e" / config["model"]["decoder"]["session_options"]["custom_ops_library"]).is_file()
    with pytest.raises(SparseInferError, match="need the op library .*--mlp-kernels function cannot run it"):
        OnnxDecoder(tmp_path / "e" / "model.onnx", mlp_kernels="function")


@pytest.mark.native
def test_bench_decode_times_sparse_against_dense_of_the_same_format(tmp_path, checkpoint):
    r = run("bench-decode", "--checkpoint", checkpoint, "--quantize", "q4_0", "--tokens", "3", "--repeats", "1",
            "--threads", "1", "--work-dir", tmp_path / "w", "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["quantize"] == "q4_0" and result["speedup"] > 0
    assert {"dense", "sparse"} <= set(result) and "sparse-function" not in result
    assert (result["dense"]["mlp_kernels"], result["sparse"]["mlp_kernels"]) == ("dense", "native")
    for kind in ("dense", "sparse"):
        assert export_info(tmp_path / "w" / f"{kind}-cpu-q4_0" / "model.onnx").quantize == "q4_0"


@pytest.mark.native
def test_genai_decodes_a_quantized_export_like_our_decoder(tmp_path, checkpoint):
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed")
    out = tmp_path / "e" / "model.onnx"
    assert run("export", checkpoint, "--out", out, "--quantize", "q4_1").exit_code == 0
    model = og.Model(str(out.parent))
    theirs = genai_greedy(og, model, PROMPT, 8)
    assert len(theirs) == 8 and len(set(theirs)) > 1
    assert theirs == generate(OnnxDecoder(out), PROMPT, len(theirs)).tokens
