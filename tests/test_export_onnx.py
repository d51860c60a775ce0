"""ONNX export on the CPU EP against the NumPy reference model, both graph forms: fused
(onnxruntime's GroupQueryAttention, (Skip)SimplifiedLayerNormalization, a shared in-place KV
buffer; the default) and portable (standard ops, KV cache grown by Concat).

Tolerance for logits: both pipelines compute in float32 with different summation orders
(onnxruntime's MatMul vs batched NumPy / the order contract). The worst-case rounding of
one dot product of n terms is gamma_n * sum|a_i b_i| ~ n * 2^-24 * |terms|; with the longest
dot product of the tiny shape (k = 552) that is ~3.3e-5 relative, and RMSNorm renormalises
between layers, so we allow ``GAMMA_K * (1 + max|logit|)``. Sparse logits get the same
tolerance because the test first proves both pipelines skipped exactly the same rows: the
only remaining difference is rounding order.
"""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from sparseinfer.model_export.decode import OnnxDecoder
from sparseinfer.model_export.export import ExportOptions, export_onnx
from sparseinfer.model_export.generation import generate
from sparseinfer.model_export.op_library import DOMAIN, OP_TYPE
from sparseinfer.model_export.session import make_session
from sparseinfer.model_export.synthetic import make_checkpoint, make_weights, synthetic_shape
from sparseinfer.reference import mlp_sparse, pack_signs, predict_zero_rows
from sparseinfer.reference.activations import (APPROXIMATE_KINDS, LIBRARY_ERROR_UNITS, OWN_ERROR_UNITS, U,
                                               Activation)
from sparseinfer.reference.errors import SparseInferError
from sparseinfer.reference.llama import LlamaReference
from sparseinfer.tools.cli import cli

from helpers import computed_rows_agree, greedy_steps

PROMPT = [256, 84, 104, 101, 32, 113, 117, 105, 99, 107, 32, 98, 114, 111, 119, 110]
GAMMA_K = 552 * 2.0 ** -24
DECODE_STEPS = 5


FORMS = [pytest.param(False, id="fused"), pytest.param(True, id="portable")]


def _tol(logits):
    return GAMMA_K * (1 + float(np.abs(logits).max()))


def _shape(kv_heads=2, tie=False, head_dim=None, layers=2):
    """The tiny test shape (head_dim 50: the fused form pads it to 64), or with 4 heads of
    ``head_dim`` (64: no padding)."""
    shape = synthetic_shape("tiny", layers=layers, kv_heads=kv_heads, tie_embeddings=tie)
    return shape if head_dim is None else replace(shape, hidden_size=head_dim * shape.num_heads)


def _run_both(weights, opts, tmp_path, reference, mlp_kernels="auto", provider="cpu"):
    """Prefill + DECODE_STEPS greedy steps in ONNX and the reference on the same tokens."""
    decoder = OnnxDecoder(export_onnx(weights, tmp_path / "m.onnx", opts), provider, mlp_kernels=mlp_kernels)
    assert decoder.mlp_kernels == ("native" if mlp_kernels == "native" else "function")
    return greedy_steps(decoder, reference, PROMPT, DECODE_STEPS)


@pytest.mark.parametrize("portable", FORMS)
@pytest.mark.parametrize("kv_heads,tie,head_dim,provider", [
    (2, False, None, "cpu"), (4, False, None, "cpu"), (2, True, None, "cpu"), (4, True, None, "cpu"),
    (1, False, 64, "cpu"), (4, True, 64, "cpu"),
    pytest.param(2, False, None, "cuda", marks=pytest.mark.ort_cuda),
    pytest.param(2, True, 64, "cuda", marks=pytest.mark.ort_cuda)])
def test_dense_export_matches_reference(tmp_path, kv_heads, tie, head_dim, provider, portable):
    """GQA (kv heads < heads, 1 = MQA) and MHA, tied and untied, head_dim 50 (padded to 64 in
    the fused form) and 64; prefill + decode steps against the reference."""
    w = make_weights(_shape(kv_heads, tie, head_dim), seed=11)
    steps = _run_both(w, ExportOptions(sparse=False, portable=portable), tmp_path, LlamaReference(w),
                      provider=provider)
    assert len(steps) == 1 + DECODE_STEPS and steps[0][0].shape == (len(PROMPT), w.shape.vocab_size)
    for o, r, _, _ in steps:
        assert np.abs(r).max() > 0.5
        np.testing.assert_allclose(o, r, rtol=0, atol=_tol(r))


@pytest.mark.parametrize("target,mlp_kernels,provider,portable", [
    ("cpu", "function", "cpu", False), ("cuda", "function", "cpu", False), ("cpu", "function", "cpu", True),
    pytest.param("cpu", "native", "cpu", False, marks=pytest.mark.native),
    pytest.param("cuda", "native", "cpu", False, marks=pytest.mark.native),
    pytest.param("cpu", "native", "cpu", True, marks=pytest.mark.native),
    # on onnxruntime's CUDA provider, KV cache bound on the device (IOBinding); the cpu
    # target's bitwise ops have no CUDA kernels, so onnxruntime runs those nodes on the CPU
    pytest.param("cuda", "function", "cuda", False, marks=pytest.mark.ort_cuda),
    pytest.param("cpu", "function", "cuda", False, marks=pytest.mark.ort_cuda),
    pytest.param("cuda", "function", "cuda", True, marks=pytest.mark.ort_cuda)])
def test_sparse_masks_bit_exact_and_logits_match(tmp_path, target, mlp_kernels, provider, portable):
    w = make_weights(synthetic_shape("tiny", layers=2), seed=4)
    alpha = "1.02@0,1.00"
    reference = LlamaReference(w, sparse=True, alpha=alpha)
    steps = _run_both(w, ExportOptions(sparse=True, alpha=alpha, target=target, debug=True, portable=portable),
                      tmp_path, reference, mlp_kernels, provider)
    for o, r, debug, ref_step in steps[1:]:
        for i, lw in enumerate(w.layers):
            x = debug[f"debug.{i}.mlp_input"].reshape(-1)
            mask = debug[f"debug.{i}.predicted_zero"]
            assert mask.dtype == np.bool_ and 0 < mask.sum() < mask.size       # some skipped, some kept
            # the ONNX predictor on ONNX's own MLP input == reference predict_zero_rows, bit for bit
            want = predict_zero_rows(pack_signs(lw.gate), pack_signs(x), w.shape.d, reference.alpha_milli[i] / 1000)
            assert np.array_equal(mask, want), np.flatnonzero(mask != want)[:5]
            # and the reference pipeline, on its own input, made the same decision
            assert np.array_equal(mask, ref_step.traces[i].predicted_zero)
            _, trace = mlp_sparse(x, lw.gate, lw.up, lw.down, w.activation, alpha=reference.alpha_milli[i] / 1000)
            assert np.array_equal(debug[f"debug.{i}.rows"], np.flatnonzero(trace.computed_up))
            assert np.array_equal(debug[f"debug.{i}.actual_zero"], trace.actual_zero)
        np.testing.assert_allclose(o, r, rtol=0, atol=_tol(r))


def test_graph_names_functions_and_alpha(tmp_path):
    w = make_weights(synthetic_shape("tiny", layers=3), seed=0)
    path = export_onnx(w, tmp_path / "m.onnx", ExportOptions(alpha="1.03@0-1,1.00"))
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input][:3] == ["input_ids", "attention_mask", "position_ids"]
    assert "past_key_values.2.value" in [i.name for i in model.graph.input]
    assert [o.name for o in model.graph.output][:3] == ["logits", "present.0.key", "present.0.value"]
    assert [(f.domain, f.name) for f in model.functions] == [(DOMAIN, OP_TYPE)]
    body = model.functions[0]
    assert body.input == ["x", "w_gate", "w_up", "w_down_t", "w_signs"] and body.output == ["out"]
    assert {"alpha_milli", "activation", "threshold"} <= set(body.attribute)
    branches = [n for n in body.node if n.op_type == "If"]
    assert len(branches) == 1                       # one token sparse, several dense: inside the op
    body_ops = {n.op_type for a in branches[0].attribute for n in a.g.node}
    assert {"BitwiseXor", "BitShift", "NonZero", "Gather", "MatMul"} <= body_ops
    assert all(n.domain in ("", None) for a in branches[0].attribute for n in a.g.node)   # standard ops only
    assert not any(n.op_type == "If" for n in model.graph.node)     # no control flow in the graph itself
    mlps = {n.name: {a.name: a for a in n.attribute} for n in model.graph.node if n.op_type == OP_TYPE}
    assert {name: a["alpha_milli"].i for name, a in mlps.items()} == {
        "/model/layers.0/mlp/SparseMLP": 1030, "/model/layers.1/mlp/SparseMLP": 1030,
        "/model/layers.2/mlp/SparseMLP": 1000}
    assert {a["activation"].s for a in mlps.values()} == {w.activation.kind.encode()}


def test_batched_prefill_with_padding_runs_dense(tmp_path):
    """Portable form: two left-padded prompts in one batch: each row equals its own unpadded
    run. (GroupQueryAttention takes right padding instead: the next test.)"""
    w = make_weights(synthetic_shape("tiny", layers=1), seed=2)
    path = export_onnx(w, tmp_path / "m.onnx", ExportOptions(portable=True))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    short = PROMPT[:5]
    ids = np.array([PROMPT[:8], [0] * 3 + short], dtype=np.int64)
    mask = np.array([[1] * 8, [0] * 3 + [1] * 5], dtype=np.int64)
    pos = np.array([list(range(8)), [0, 0, 0] + list(range(5))], dtype=np.int64)
    empty = np.zeros((2, 2, 0, w.shape.head_dim), np.float32)
    feed = {"input_ids": ids, "attention_mask": mask, "position_ids": pos,
            "past_key_values.0.key": empty, "past_key_values.0.value": empty}
    logits = sess.run(["logits"], feed)[0]
    ref = LlamaReference(w).prefill(short)
    np.testing.assert_allclose(logits[1, 3:], ref, rtol=0, atol=_tol(ref))


def test_commands_end_to_end(tmp_path):
    runner = CliRunner()
    ck = make_checkpoint("tiny", tmp_path / "ck", layers=2)
    r = runner.invoke(cli, ["export", str(ck), "--out", str(tmp_path / "m" / "model.onnx"), "--debug"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli, ["generate", str(tmp_path / "m" / "model.onnx"), "--prompt", "Hello", "--max-new-tokens",
                            "6", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert len(out["tokens"]) == 6 and 0.5 < out["actual_sparsity"] < 1 and 0 < out["precision"] <= 1
    r = runner.invoke(cli, ["generate", str(tmp_path / "m" / "model.onnx"), "--prompt", "x" * 600])
    assert r.exit_code == 2 and "exceeds the context of 512" in r.output
    r = runner.invoke(cli, ["generate", str(tmp_path / "m" / "model.onnx"), "--prompt", "x", "--provider", "cuda"])
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert r.exit_code == 2 and "CUDA execution provider not available" in r.output
    r = runner.invoke(cli, ["compare", str(ck), "--prompt", "Hello", "--max-new-tokens", "5", "--json"])
    assert r.exit_code == 0, r.output
    cmp = json.loads(r.output)
    assert cmp["tokens_compared"] == 5 and cmp["max_abs_logit_diff"] > 0
    r = runner.invoke(cli, ["export", str(ck), "--out", str(tmp_path / "p" / "model.onnx"), "--dense", "--portable"])
    assert r.exit_code == 0 and "portable" in r.output, r.output
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "p" / "model.onnx")).metadata_props}
    fused = {p.key: p.value for p in onnx.load(str(tmp_path / "m" / "model.onnx")).metadata_props}
    assert (meta["sparseinfer.attention"], fused["sparseinfer.attention"]) == ("portable", "gqa")
    r = runner.invoke(cli, ["export", str(tmp_path / "missing"), "--out", str(tmp_path / "x.onnx")])
    assert r.exit_code == 2 and "no such checkpoint" in r.output
    silu = make_checkpoint("tiny", tmp_path / "silu", layers=1, hidden_act="silu")
    r = runner.invoke(cli, ["export", str(silu), "--out", str(tmp_path / "s.onnx")])
    assert r.exit_code == 2 and "export it with --dense" in r.output


def test_a_cuda_session_that_fell_back_to_the_cpu_is_an_error(tmp_path, monkeypatch):
    """onnxruntime only logs a warning when the CUDA provider's libraries fail to load."""
    class FellBack:
        def __init__(self, path, opts, providers, provider_options):
            assert providers == ["CUDAExecutionProvider"] and provider_options == [{"use_tf32": "0"}]

        def get_providers(self):
            return ["CPUExecutionProvider"]

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "preload_dlls", lambda: None, raising=False)
    monkeypatch.setattr(ort, "InferenceSession", FellBack)
    with pytest.raises(SparseInferError, match="CUDAExecutionProvider failed to load .* fell back to CPUExecutionProvider"):
        make_session(tmp_path / "model.onnx", "cuda")


@pytest.mark.parametrize("sparse,mlp_kernels", [(False, "function"), (True, "function"),
                                                pytest.param(True, "native", marks=pytest.mark.native)])
def test_iobinding_path_gives_the_same_bits_as_plain_runs(tmp_path, sparse, mlp_kernels):
    """Portable form: the KV cache bound as OrtValues between steps (the CUDA path's IOBinding,
    here on the CPU provider) gives the very logits, debug masks and caches of plain
    session.run calls. (The fused form's shared buffer has no plain-run path: its own test.)"""
    w = make_weights(synthetic_shape("tiny", layers=2), seed=5)
    path = export_onnx(w, tmp_path / "m.onnx", ExportOptions(sparse=sparse, debug=sparse, portable=True))
    plain = OnnxDecoder(path, "cpu", mlp_kernels=mlp_kernels)
    bound = OnnxDecoder(path, "cpu", mlp_kernels=mlp_kernels, io_binding=True)
    assert not plain.io_binding and bound.io_binding
    tok = PROMPT
    for step in range(1 + DECODE_STEPS):
        (a, da), (b, db) = plain.step(tok), bound.step(tok)
        assert np.abs(a).max() > 0.5 and np.array_equal(a.view(np.uint32), b.view(np.uint32)), f"step {step}"
        assert da.keys() == db.keys() and all(np.array_equal(da[k], db[k]) for k in da)
        if sparse:
            assert da and any(v.any() for v in da.values())            # masks were compared, some rows skipped
        tok = [int(np.argmax(a[-1]))]
    assert all(isinstance(v, ort.OrtValue) for v in bound.past.values())    # the cache never left onnxruntime
    for name, v in bound.past.items():
        assert np.array_equal(v.numpy(), plain.past[name]) and v.numpy().shape[2] == plain.length


@pytest.mark.parametrize("sparse", [False, True])
def test_large_exports_stream_their_weights_into_one_aligned_side_file(tmp_path, monkeypatch, sparse):
    """Above the threshold the initializers are written as they are made: the same tensors
    as an in-model export, page-aligned in model.onnx.data, small ones inline, and
    onnxruntime decodes the two to the same bits."""
    from sparseinfer.model_export import export as export_module

    w = make_weights(synthetic_shape("tiny", layers=2, kv_heads=2), seed=5)
    opts = ExportOptions(sparse=sparse)
    inline = export_onnx(w, tmp_path / "inline" / "m.onnx", opts)
    monkeypatch.setattr(export_module, "EXTERNAL_DATA_BYTES", 4 * w.num_elements() - 1)
    streamed = export_onnx(w, tmp_path / "streamed" / "m.onnx", opts)
    assert not (tmp_path / "inline" / "m.onnx.data").exists()
    data = tmp_path / "streamed" / "m.onnx.data"
    proto = onnx.load(str(streamed), load_external_data=False)
    external = {t.name: {e.key: e.value for e in t.external_data} for t in proto.graph.initializer
                if t.data_location == onnx.TensorProto.EXTERNAL}
    assert "model.embed_tokens.weight" in external and len(external) < len(proto.graph.initializer)
    ends = 0
    for name, info in sorted(external.items(), key=lambda kv: int(kv[1]["offset"])):
        offset, length = int(info["offset"]), int(info["length"])
        assert info["location"] == "m.onnx.data" and offset % 4096 == 0 and offset >= ends and length >= 1024, name
        ends = offset + length
    assert ends == data.stat().st_size
    want = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(inline)).graph.initializer}
    got = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(streamed)).graph.initializer}
    assert want.keys() == got.keys()
    for name in want:
        assert want[name].dtype == got[name].dtype and np.array_equal(want[name], got[name]), name
    a, b = OnnxDecoder(inline, "cpu"), OnnxDecoder(streamed, "cpu")
    for toks in (PROMPT, [7], [42]):
        la, lb = a.step(toks)[0], b.step(toks)[0]
        assert np.array_equal(la, lb)


# --- the fused form: GroupQueryAttention, (Skip)SimplifiedLayerNormalization, shared KV buffer ---

def _layer_ops(model, i):
    return sorted(n.op_type for n in model.graph.node if n.name.startswith(f"/model/layers.{i}/"))


@pytest.mark.parametrize("sparse", [False, True])
def test_fused_graph_form_nodes_and_metadata(tmp_path, sparse):
    w = make_weights(_shape(layers=3), seed=0)
    fused = onnx.load(str(export_onnx(w, tmp_path / "f.onnx", ExportOptions(sparse=sparse, max_length=96))))
    portable = onnx.load(str(export_onnx(w, tmp_path / "p.onnx", ExportOptions(sparse=sparse, portable=True))))
    meta = {p.key: p.value for p in fused.metadata_props}
    assert (meta["sparseinfer.attention"], meta["sparseinfer.kv_cache"], meta["sparseinfer.max_length"]) == \
        ("gqa", "shared", "96")
    assert (meta["sparseinfer.head_dim"], meta["sparseinfer.model_head_dim"]) == ("64", "50")   # padded for GQA
    pmeta = {p.key: p.value for p in portable.metadata_props}
    assert (pmeta["sparseinfer.attention"], pmeta["sparseinfer.kv_cache"]) == ("portable", "concat")
    for i in range(3):
        # one fused QKV MatMul, GQA, o_proj, and two norms with the residual add inside (layer 0's
        # input norm has no residual yet: SimplifiedLayerNormalization); the MLP's nodes as before
        ops = [n.op_type for n in fused.graph.node if n.name.startswith(f"/model/layers.{i}/")
               and "/mlp/" not in n.name]
        first = "SimplifiedLayerNormalization" if i == 0 else "SkipSimplifiedLayerNormalization"
        assert ops == [first, "MatMul", "GroupQueryAttention", "MatMul", "SkipSimplifiedLayerNormalization"], ops
        portable_ops = [n.op_type for n in portable.graph.node if n.name.startswith(f"/model/layers.{i}/")
                        and "/mlp/" not in n.name]
        assert len(portable_ops) > 50 and portable_ops.count("Concat") == 4       # rotary x2, KV cache x2
    gqa = [n for n in fused.graph.node if n.op_type == "GroupQueryAttention"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gqa[0].attribute}
    assert attrs["do_rotary"] == 1 and attrs["rotary_interleaved"] == 0 and attrs["num_heads"] == 4
    assert attrs["kv_num_heads"] == 2 and attrs["scale"] == pytest.approx(1 / np.sqrt(50))
    # GQA writes the graph outputs itself: no copy between it and present.{i}.* (in-place buffer)
    assert [list(n.output[1:]) for n in gqa] == [[f"present.{i}.key", f"present.{i}.value"] for i in range(3)]
    assert list(gqa[0].input[:5]) == [gqa[0].input[0], "", "", "past_key_values.0.key", "past_key_values.0.value"]
    qkv = {t.name: t.dims for t in fused.graph.initializer}["model.layers.0.self_attn.qkv_proj.weight_t"]
    assert list(qkv) == [200, (4 + 2 * 2) * 64]
    kv_in = next(i for i in fused.graph.input if i.name == "past_key_values.0.key").type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in kv_in] == ["batch_size", 2, "max_sequence_length", 64]
    assert {"com.microsoft"} <= {o.domain for o in fused.opset_import}
    assert not any(n.domain == "com.microsoft" or "LayerNormalization" in n.op_type for n in portable.graph.node)


def test_the_rotary_convention_matters(tmp_path):
    """GQA's rotate_half (non-interleaved) form is what matches the reference; the interleaved
    one, same weights, does not: the parity tests would catch a wrong convention."""
    w = make_weights(_shape(), seed=3)
    path = export_onnx(w, tmp_path / "m.onnx", ExportOptions(sparse=False))
    ref = LlamaReference(w).prefill(PROMPT)
    model = onnx.load(str(path))
    for n in model.graph.node:
        if n.op_type == "GroupQueryAttention":
            next(a for a in n.attribute if a.name == "rotary_interleaved").i = 1
    onnx.save(model, str(tmp_path / "interleaved.onnx"))
    good = OnnxDecoder(path).step(PROMPT)[0]
    bad = OnnxDecoder(tmp_path / "interleaved.onnx").step(PROMPT)[0]
    np.testing.assert_allclose(good, ref, rtol=0, atol=_tol(ref))
    assert np.abs(bad - ref).max() > 100 * _tol(ref)


def _unpad(cache, head_dim):
    """[.., 64] padded rotary halves -> [.., head_dim]."""
    half, padded_half = head_dim // 2, cache.shape[-1] // 2
    return np.concatenate([cache[..., :half], cache[..., padded_half:padded_half + half]], axis=-1)


@pytest.mark.parametrize("sparse", [False, True])
def test_shared_kv_buffer_is_written_in_place(tmp_path, sparse):
    """The decoder binds one zeroed [1, kvh, max_len, hd] buffer as both past and present: after
    prefill and decode steps it is the same OrtValue, at the same address, holding the portable
    form's keys and values in its first positions (the padding and the rest zero)."""
    w = make_weights(_shape(), seed=5)
    fused = OnnxDecoder(export_onnx(w, tmp_path / "f.onnx", ExportOptions(sparse=sparse, max_length=64)), "cpu")
    portable = OnnxDecoder(export_onnx(w, tmp_path / "p.onnx", ExportOptions(sparse=sparse, portable=True)), "cpu")
    assert fused.shared_kv and fused.io_binding and not portable.shared_kv and fused.max_positions == 64
    before = {name: (v, v.data_ptr()) for name, v in fused.past.items()}
    assert all(v.shape() == [1, 2, 64, 64] and not v.numpy().any() for v, _ in before.values())
    tok = PROMPT
    for step in range(1 + DECODE_STEPS):
        a, b = fused.step(tok)[0], portable.step(tok)[0]
        np.testing.assert_allclose(a, b, rtol=0, atol=_tol(b))
        tok = [int(np.argmax(b[-1]))]
    n = portable.length
    for name, (value, address) in before.items():
        assert fused.past[name] is value and value.data_ptr() == address
        buf = value.numpy()
        want = portable.past[name]
        assert np.abs(want).max() > 0.1
        np.testing.assert_allclose(_unpad(buf[:, :, :n], 50), want, rtol=0, atol=1e-5)
        assert not buf[:, :, n:].any() and not buf[..., 25:32].any() and not buf[..., 57:].any()
    fused.reset()
    assert all(not v.numpy().any() for v in fused.past.values()) and fused.length == 0


def test_shared_buffer_limits_and_errors(tmp_path):
    w = make_weights(_shape(layers=1), seed=1)
    path = export_onnx(w, tmp_path / "m.onnx", ExportOptions(sparse=False, max_length=24))
    with pytest.raises(SparseInferError, match="exceed the context of 24"):
        OnnxDecoder(path).step(list(range(25)))
    assert OnnxDecoder(path, max_length=20).max_positions == 20
    with pytest.raises(SparseInferError, match="max_length 30 is outside 1-24"):
        OnnxDecoder(path, max_length=30)
    with pytest.raises(SparseInferError, match="needs io_binding"):
        OnnxDecoder(path, io_binding=False)
    with pytest.raises(SparseInferError, match="max_length 513 is outside 1-512"):
        export_onnx(w, tmp_path / "x.onnx", ExportOptions(max_length=513))


def test_fused_batched_prefill_is_right_padded(tmp_path):
    """GroupQueryAttention's padding: rows padded on the right (seqlens_k = mask sum - 1); each
    row's real positions equal its own unpadded run. Shared batch-2 buffers, bound in place."""
    w = make_weights(_shape(layers=2), seed=2)
    path = export_onnx(w, tmp_path / "m.onnx", ExportOptions(sparse=False))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    short = PROMPT[:5]
    ids = np.array([PROMPT[:8], short + [0] * 3], dtype=np.int64)
    mask = np.array([[1] * 8, [1] * 5 + [0] * 3], dtype=np.int64)
    binding = sess.io_binding()
    binding.bind_cpu_input("input_ids", ids)
    binding.bind_cpu_input("attention_mask", mask)
    binding.bind_cpu_input("position_ids", np.array([list(range(8))] * 2, dtype=np.int64))
    binding.bind_output("logits", "cpu")
    buffers = [ort.OrtValue.ortvalue_from_numpy(np.zeros((2, 2, 16, 64), np.float32)) for _ in range(4)]
    for (i, kv), buf in zip([(i, kv) for i in range(2) for kv in ("key", "value")], buffers):
        binding.bind_ortvalue_input(f"past_key_values.{i}.{kv}", buf)
        binding.bind_ortvalue_output(f"present.{i}.{kv}", buf)
    sess.run_with_iobinding(binding)
    logits = binding.get_outputs()[0].numpy()
    for row, prompt in ((0, PROMPT[:8]), (1, short)):
        ref = LlamaReference(w).prefill(prompt)
        np.testing.assert_allclose(logits[row, :len(prompt)], ref, rtol=0, atol=_tol(ref))
    assert buffers[0].numpy()[:, :, :5].all(axis=(0, 1))[:, :25].all()       # keys written in place, both rows


# --- tied embeddings stored once -----------------------------------------------------------

@pytest.mark.parametrize("portable", FORMS)
def test_tied_embeddings_are_stored_once(tmp_path, portable):
    """A tied model's initializers are one [vocab, d] fp32 matrix smaller than the same
    model untied (the LM head reads the embedding initializer); its logits still match."""
    tied = make_weights(_shape(tie=True), seed=8)
    untied = replace(tied, lm_head=tied.embed.copy(), shape=replace(tied.shape, tie_word_embeddings=False))
    opts = ExportOptions(sparse=False, portable=portable)

    def init_bytes(w, name):
        model = onnx.load(str(export_onnx(w, tmp_path / name / "m.onnx", opts)))
        return sum(onnx.numpy_helper.to_array(t).nbytes for t in model.graph.initializer), model

    (tb, tmodel), (ub, _) = init_bytes(tied, "tied"), init_bytes(untied, "untied")
    v, d = tied.shape.vocab_size, tied.shape.d
    assert 0 <= v * d * 4 - (ub - tb) <= 64          # one embedding, less the Gemm's two int64 shape constants
    big = [t.name for t in tmodel.graph.initializer if sorted(t.dims) == sorted([v, d])]
    assert big == ["model.embed_tokens.weight"]
    assert {p.key: p.value for p in tmodel.metadata_props}["sparseinfer.tied_embeddings"] == "True"
    a = OnnxDecoder(tmp_path / "tied" / "m.onnx").step(PROMPT)[0]
    b = OnnxDecoder(tmp_path / "untied" / "m.onnx").step(PROMPT)[0]
    ref = LlamaReference(tied).prefill(PROMPT)
    np.testing.assert_allclose(a, ref, rtol=0, atol=_tol(ref))
    np.testing.assert_allclose(a, b, rtol=0, atol=_tol(ref))


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_static_decode_gives_the_bits_of_the_dynamic_path(tmp_path, sparse):
    """Decode steps on buffers bound once (fixed shapes, attention_mask of the buffer's full
    length, updated in place: what a CUDA graph replays) give the very logits of the usual path."""
    w = make_weights(synthetic_shape("tiny", layers=2), seed=4)
    path = export_onnx(w, tmp_path / "m.onnx", ExportOptions(sparse=sparse, max_length=64))
    usual, static = OnnxDecoder(path), OnnxDecoder(path, static_decode=True)
    a = generate(usual, PROMPT[:6], 10, keep_logits=True)
    b = generate(static, PROMPT[:6], 10, keep_logits=True)
    assert static._static is not None and a.tokens == b.tokens and len(set(a.tokens)) > 2
    assert all(np.array_equal(x.view(np.uint32), y.view(np.uint32)) for x, y in zip(a.logits, b.logits))
    again = generate(static, PROMPT[:4], 6, keep_logits=True)              # reset rebinds fresh buffers
    assert again.tokens == generate(usual, PROMPT[:4], 6).tokens


def test_static_decode_and_cuda_graph_refuse_what_they_cannot_run(tmp_path):
    w = make_weights(synthetic_shape("tiny", layers=1), seed=4)
    portable = export_onnx(w, tmp_path / "p" / "m.onnx", ExportOptions(sparse=False, portable=True))
    debug = export_onnx(w, tmp_path / "d" / "m.onnx", ExportOptions(sparse=True, debug=True))
    for path in (portable, debug):
        with pytest.raises(SparseInferError, match="static decoding .* needs a fused export"):
            OnnxDecoder(path, static_decode=True)
    with pytest.raises(SparseInferError, match="cuda_graph needs the cuda provider"):
        OnnxDecoder(debug, cuda_graph=True)


@pytest.mark.ort_cuda
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_cuda_graph_decode_matches_the_eager_cuda_decode(tmp_path, sparse):
    w = make_weights(synthetic_shape("tiny", layers=2), seed=4)
    path = export_onnx(w, tmp_path / "m.onnx", ExportOptions(sparse=sparse, max_length=64))
    eager = generate(OnnxDecoder(path, "cuda"), PROMPT[:6], 10, keep_logits=True)
    graph = generate(OnnxDecoder(path, "cuda", cuda_graph=True), PROMPT[:6], 10, keep_logits=True)
    assert eager.tokens == graph.tokens
    for x, y in zip(eager.logits, graph.logits):
        np.testing.assert_allclose(y, x, rtol=0, atol=_tol(x))


@pytest.mark.parametrize("mlp_kernels", ["native", "function"])
def test_float16_export_keeps_the_masks_bit_exact_on_its_own_inputs(tmp_path, mlp_kernels):
    """--dtype float16: fp16 weights and activations; the SparseMLP op widens its fp16 weights
    exactly and accumulates in float32 in the contract's order, so on each decode step's own
    (fp16) MLP input its masks are the reference's with the same fp16 weights."""
    w = make_weights(synthetic_shape("tiny", layers=2), seed=4)
    path = export_onnx(w, tmp_path / "m.onnx", ExportOptions(sparse=True, debug=True, max_length=64, dtype="float16"))
    model = onnx.load(str(path), load_external_data=False)
    gate = next(t for t in model.graph.initializer if t.name == "model.layers.0.mlp.gate_proj.weight")
    assert gate.data_type == onnx.TensorProto.FLOAT16
    decoder = OnnxDecoder(path, mlp_kernels=mlp_kernels)
    assert decoder.kv_dtype == np.float16 and decoder.mlp_kernels == mlp_kernels
    half = [(lw.gate.astype(np.float16), lw.up.astype(np.float16), lw.down.astype(np.float16)) for lw in w.layers]
    logits, _ = decoder.step(PROMPT[:6])
    assert logits.dtype == np.float32
    for tok in (101, 32, 113):
        _, debug = decoder.step([tok])
        for i, (g16, u16, d16) in enumerate(half):
            x = debug[f"debug.{i}.mlp_input"].reshape(-1)
            assert x.dtype == np.float16
            _, trace = mlp_sparse(x.astype(np.float32), g16, u16, d16, w.activation, alpha=1.0)
            assert np.array_equal(debug[f"debug.{i}.predicted_zero"], trace.predicted_zero)
            assert np.array_equal(debug[f"debug.{i}.rows"], np.flatnonzero(trace.computed_up))
            assert np.array_equal(debug[f"debug.{i}.actual_zero"], trace.actual_zero)
            assert 0 < trace.predicted_zero.sum() < trace.k


def test_float16_export_decodes_like_the_float32_one(tmp_path):
    w = make_weights(synthetic_shape("tiny", layers=2), seed=4)
    f32 = export_onnx(w, tmp_path / "a" / "m.onnx", ExportOptions(sparse=False, max_length=64))
    f16 = export_onnx(w, tmp_path / "b" / "m.onnx", ExportOptions(sparse=False, max_length=64, dtype="float16"))
    a = generate(OnnxDecoder(f32), PROMPT[:8], 10, keep_logits=True)
    b = generate(OnnxDecoder(f16), PROMPT[:8], 10, keep_logits=True)
    assert a.tokens == b.tokens and len(set(a.tokens)) > 2
    # fp16 activations: a few units in the last place of fp16 (2^-11) relative to the logits' scale
    scale = float(np.abs(a.logits[0]).max())
    assert float(np.abs(a.logits[0] - b.logits[0]).max()) < 2 ** -6 * scale
    assert (tmp_path / "b" / "m.onnx").stat().st_size < 0.6 * (tmp_path / "a" / "m.onnx").stat().st_size


def test_float16_export_refuses_overflow_and_the_portable_form(tmp_path):
    w = make_weights(synthetic_shape("tiny", layers=2), seed=4)
    w.layers[1].up[3, 7] = 1e5
    with pytest.raises(SparseInferError, match=r"model\.layers\.1\.mlp\.up_proj\.weight: 1 value\(s\) overflow float16"):
        export_onnx(w, tmp_path / "m.onnx", ExportOptions(dtype="float16"))
    with pytest.raises(SparseInferError, match="float16 needs the fused form"):
        export_onnx(w, tmp_path / "m.onnx", ExportOptions(dtype="float16", portable=True))
    with pytest.raises(SparseInferError, match="unknown dtype 'bfloat16'"):
        export_onnx(w, tmp_path / "m.onnx", ExportOptions(dtype="bfloat16"))


@pytest.mark.parametrize("act", APPROXIMATE_KINDS)
def test_silu_and_gelu_models_export_sparse_only_when_approximate(tmp_path, act):
    """A SiLU or GELU model's sparse export needs approximate=True; then the SparseMLP op
    (native or body) skips the rows the sign predictor calls negative, with the reference's
    masks (the body's computed rows: up to h1 within the activation's error bound of 0)."""
    w = make_weights(synthetic_shape("tiny", layers=2, hidden_act=act), seed=4)
    with pytest.raises(SparseInferError, match="has no exact zeros; export it with --dense, or sparse with --approximate"):
        export_onnx(w, tmp_path / "no" / "m.onnx", ExportOptions(sparse=True))
    path = export_onnx(w, tmp_path / "m.onnx", ExportOptions(sparse=True, approximate=True, debug=True, alpha="0.98"))
    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    assert meta["sparseinfer.approximate"] == "True" and meta["sparseinfer.activation"] == act
    node = next(n for n in onnx.load(str(path), load_external_data=False).graph.node if n.op_type == OP_TYPE)
    assert next(a.s for a in node.attribute if a.name == "activation") == act.encode()
    for kernels in ("native", "function"):
        decoder = OnnxDecoder(path, mlp_kernels=kernels)
        decoder.step(PROMPT[:5])
        for tok in (101, 32):
            _, debug = decoder.step([tok])
            for i, lw in enumerate(w.layers):
                x = debug[f"debug.{i}.mlp_input"].reshape(-1)
                _, trace = mlp_sparse(x, lw.gate, lw.up, lw.down, act, alpha=0.98, approximate=True)
                assert np.array_equal(debug[f"debug.{i}.predicted_zero"], trace.predicted_zero), kernels
                assert np.array_equal(debug[f"debug.{i}.actual_zero"], trace.actual_zero), kernels
                computed = np.zeros(w.shape.k, bool)
                computed[debug[f"debug.{i}.rows"]] = True
                assert np.array_equal(computed, trace.computed_up) if kernels == "native" else \
                    computed_rows_agree(computed, trace, x, lw.gate, Activation.parse(act)), kernels
                assert 0.2 < trace.predicted_zero.mean() < 0.8


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh"])
def test_gelu_dense_export_matches_reference(tmp_path, act):
    """A dense GELU export (Erf, or Sigmoid for the tanh form, in the graph) against the
    reference model: the summation-order allowance GAMMA_K plus the activation's
    (LIBRARY_ERROR_UNITS + OWN_ERROR_UNITS) u per unit of |z| (Activation.error_bound)."""
    w = make_weights(synthetic_shape("tiny", layers=2, hidden_act=act), seed=11)
    steps = _run_both(w, ExportOptions(sparse=False), tmp_path, LlamaReference(w))
    units = GAMMA_K / U + LIBRARY_ERROR_UNITS + OWN_ERROR_UNITS
    for o, r, _, _ in steps:
        assert np.abs(r).max() > 0.5
        np.testing.assert_allclose(o, r, rtol=0, atol=units * U * (1 + float(np.abs(r).max())))
    other = make_weights(synthetic_shape("tiny", layers=2, hidden_act="silu"), seed=11)
    assert np.abs(LlamaReference(other).prefill(PROMPT) - steps[0][1]).max() > 1e-3      # the activation matters
