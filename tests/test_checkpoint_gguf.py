"""GGUF round trip: a small Llama GGUF written with the ``gguf`` package in the test."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from helpers import finish_gguf, gguf_tensors, load_error_in_capped_child, write_gguf_llama_vocab, write_gguf_shape
from sparseinfer.model_export.loaders import load_checkpoint
from sparseinfer.model_export.loaders.gguf_file import rope_permute
from sparseinfer.model_export.synthetic import make_weights, synthetic_shape
from sparseinfer.reference.errors import SparseInferError
from sparseinfer.reference.llama import LlamaReference

gguf = pytest.importorskip("gguf")
VOCAB = ["<unk>", "<s>", "</s>"] + [f"▁{w}" for w in ("hello", "world", "the")] + list("abcdefghij")


def _write(path, weights, qtype=None, arch="llama", extra=lambda writer: None):
    s = weights.shape
    w = gguf.GGUFWriter(str(path), arch)
    write_gguf_shape(w, s)
    extra(w)
    w.add_layer_norm_rms_eps(s.rms_norm_eps)
    w.add_rope_freq_base(s.rope_theta)
    w.add_string(f"{arch}.hidden_act", "fatrelu")
    w.add_float32(f"{arch}.hidden_act_param", 0.01)
    vocab = VOCAB + [f"<0x{b:02X}>" for b in range(s.vocab_size - len(VOCAB))]
    write_gguf_llama_vocab(w, vocab)
    for hf, name, arr in gguf_tensors(weights):
        if qtype is not None and arr.ndim == 2 and "mlp" in hf:
            w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        elif arr.ndim == 2 and "self_attn" in hf:
            w.add_tensor(name, arr.astype(np.float16))
        else:
            w.add_tensor(name, arr)
    finish_gguf(w)


def test_gguf_round_trip_f32_f16(tmp_path):
    weights = make_weights(synthetic_shape("tiny", layers=2), seed=9)
    _write(tmp_path / "m.gguf", weights)
    ck = load_checkpoint(tmp_path / "m.gguf")
    assert ck.shape.num_kv_heads == 2 and ck.shape.hidden_act.startswith("fatrelu") and ck.eos_token_id == 2
    lw, got = weights.layers[1], ck.weights.layers[1]
    assert np.array_equal(got.gate, lw.gate) and np.array_equal(got.down, lw.down)
    assert np.array_equal(got.q, lw.q.astype(np.float16).astype(np.float32))     # F16, un-permuted
    assert np.array_equal(got.k, lw.k.astype(np.float16).astype(np.float32))
    assert not np.array_equal(lw.q, rope_permute(lw.q, 4))                       # the permutation matters
    a = LlamaReference(weights).prefill([1, 5, 6, 7])
    b = LlamaReference(ck.weights).prefill([1, 5, 6, 7])
    np.testing.assert_allclose(a, b, atol=2e-2 * np.abs(a).max())               # fp16 attention weights
    # SentencePiece BPE with BOS; no merge path reaches "▁hello" in this vocabulary (ids: test_gguf_tokenizer.py)
    ids = ck.tokenizer.encode("hello world").ids
    assert ids[0] == 1 and len(ids) > 3 and ck.tokenizer.decode(ids) == "hello world"


def test_gguf_quantized_mlp_is_dequantized(tmp_path):
    # Q8_0 blocks hold 32 values along a row: d and k multiples of 32 here
    shape = replace(synthetic_shape("tiny", layers=1), hidden_size=256, intermediate_size=544)
    weights = make_weights(shape, seed=1)
    _write(tmp_path / "q.gguf", weights, qtype=gguf.GGMLQuantizationType.Q8_0)
    ck = load_checkpoint(tmp_path / "q.gguf")
    gate, want = ck.weights.layers[0].gate, weights.layers[0].gate
    assert gate.dtype == np.float32 and gate.shape == want.shape
    err = np.abs(gate - want)
    assert 0 < err.max() <= np.abs(want).max() / 127 * 0.51 + 1e-7             # Q8_0: half a step of 1/127


def test_a_gguf_block_count_far_past_its_tensors_is_counted_not_listed(tmp_path):
    """block_count 2**32 - 1 (its largest) over one layer's tensors: the names of the absent layers
    are counted, not built (billions), and the first missing ones named as the file calls them."""
    weights = make_weights(synthetic_shape("tiny", layers=1), seed=1)
    count = 2**32 - 1
    _write(tmp_path / "m.gguf", replace(weights, shape=replace(weights.shape, num_layers=count)))
    got = load_error_in_capped_child(tmp_path / "m.gguf")
    assert got.startswith(f"{tmp_path / 'm.gguf'}: tensor blk.1.attn_norm.weight is missing, "
                          f"and {9 * (count - 1) - 1} more: blk.1.attn_q.weight, blk.1.attn_k.weight, "), got
    assert got.endswith(", ...")


def test_gguf_errors(tmp_path):
    weights = make_weights(synthetic_shape("tiny", layers=1), seed=1)
    _write(tmp_path / "g.gguf", weights, arch="gpt2")
    with pytest.raises(SparseInferError, match="unsupported architecture gpt2"):
        load_checkpoint(tmp_path / "g.gguf")
    with pytest.raises(SparseInferError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "none.gguf")


def test_a_truncated_gguf_says_truncated_wherever_it_is_cut(tmp_path):
    """The gguf reader fails on a short file with unrelated messages (a reshape, a dtype view):
    a cut in the header, in the tensor infos or in the tensor data is one line saying so."""
    weights = make_weights(synthetic_shape("tiny", layers=1), seed=1)
    _write(tmp_path / "whole.gguf", weights)
    data = (tmp_path / "whole.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    for size, part in ((10, "header"), (2000, "header"), (len(data) // 2, "tensor data"),
                       (len(data) - 64, "tensor data")):          # past any padding at the end
        cut.write_bytes(data[:size])
        with pytest.raises(SparseInferError, match=rf"cut.gguf: truncated GGUF file: it has {size} bytes, but its "
                                                   rf"{part} runs to byte \d+ at least$"):
            load_checkpoint(cut)
    cut.write_bytes(b"")
    with pytest.raises(SparseInferError, match="cut.gguf: truncated GGUF file: it is empty$"):
        load_checkpoint(cut)
    assert load_checkpoint(tmp_path / "whole.gguf").shape.num_layers == 1      # the whole file reads


def test_a_gguf_vocab_size_too_small_is_named_not_the_token_ids_beyond_it(tmp_path):
    weights = make_weights(synthetic_shape("tiny", layers=1), seed=1)
    _write(tmp_path / "v.gguf", weights, extra=lambda w: w.add_vocab_size(2))
    with pytest.raises(SparseInferError, match=f"v.gguf: field vocab_size is 2, but tensor model.embed_tokens.weight "
                                               f"holds {weights.shape.vocab_size} rows, one per token$"):
        load_checkpoint(tmp_path / "v.gguf")
