"""GGUF tokenizers built from the file's own metadata: small GGUF files written with the
``gguf`` package, whose vocabularies and merges are small enough to derive the ids by hand.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpers import finish_gguf, gguf_tensors, write_gguf_shape
from sparseinfer.model_export.loaders import load_checkpoint
from sparseinfer.model_export.loaders.gguf_file import _tokenizer_fields
from sparseinfer.model_export.synthetic import make_weights, synthetic_shape
from sparseinfer.model_export.tokenizer import (
    _byte_alphabet, _split_pre_tokenizer, BPE_PRE_TOKENIZERS, load_tokenizer_json)
from sparseinfer.reference.errors import SparseInferError

gguf = pytest.importorskip("gguf")
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6

# --- a byte-level BPE vocabulary (tokenizer.ggml.model = gpt2) ----------------------------
# ids 0-2 special, 3-258 the 256 single bytes in GPT-2's alphabet, then merged pieces
GPT2_SPECIAL = [("<|endoftext|>", CONTROL), ("<|im_start|>", CONTROL), ("<tool>", USER_DEFINED)]
GPT2_MERGES = ["h e", "l l", "l o", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d",
               "2 0", "20 2", "202 4", "Ġ 2024"]


def gpt2_vocab(merges=GPT2_MERGES):
    """Tokens and types: specials, the byte alphabet, then each merge's result in merge order."""
    tokens = [t for t, _ in GPT2_SPECIAL] + _byte_alphabet()
    tokens += [m.replace(" ", "") for m in merges]
    types = [k for _, k in GPT2_SPECIAL] + [NORMAL] * (len(tokens) - len(GPT2_SPECIAL))
    return tokens, types


def byte_id(ch: str) -> int:
    """Id of a one-byte character's token in ``gpt2_vocab``."""
    return len(GPT2_SPECIAL) + ch.encode()[0]


# --- a SentencePiece BPE vocabulary (tokenizer.ggml.model = llama) -------------------------
# ids 0-2 special, 3-258 the byte tokens <0x00>..<0xFF>, then pieces with their scores
SPM_PIECES = {"▁": -10.0, "h": -11.0, "e": -12.0, "l": -13.0, "o": -14.0, "w": -15.0, "r": -16.0,
              "d": -17.0, "he": -1.0, "ll": -2.0, "lo": -3.0, "hell": -4.0, "hello": -5.0, "▁hello": -6.0,
              "or": -7.0, "▁w": -8.0, "▁wor": -9.0, "ld": -19.0, "▁world": -20.0}


def spm_vocab(pieces=SPM_PIECES):
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + list(pieces)
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + list(pieces.values())
    types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256 + [NORMAL] * len(pieces)
    return tokens, scores, types


def _metadata(w, kind, tokens, types=None, scores=None, merges=None, pre=None, add_bos=None, add_eos=None,
              bos=None, eos=None, template=None):
    """Write the tokenizer keys that are given (None: the key is absent from the file)."""
    if kind is not None:
        w.add_tokenizer_model(kind)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    for value, add in ((types, w.add_token_types), (scores, w.add_token_scores), (merges, w.add_token_merges),
                       (add_bos, w.add_add_bos_token), (add_eos, w.add_add_eos_token), (bos, w.add_bos_token_id),
                       (eos, w.add_eos_token_id), (template, w.add_chat_template)):
        if value is not None:
            add(value)


def tokenizer_from_gguf(path, **meta):
    """Write a GGUF holding only tokenizer metadata, read it back, build its tokenizer."""
    from sparseinfer.model_export.tokenizer import gguf_tokenizer

    w = gguf.GGUFWriter(str(path), "llama")
    _metadata(w, **meta)
    finish_gguf(w)
    return gguf_tokenizer(_tokenizer_fields(gguf.GGUFReader(str(path))), str(path))


def gpt2_tokenizer(tmp_path, merges=GPT2_MERGES, pre="smollm", **meta):
    tokens, types = gpt2_vocab(merges)
    return tokenizer_from_gguf(tmp_path / "gpt2.gguf", kind="gpt2", tokens=tokens, types=types, merges=merges,
                               pre=pre, **{"bos": 1, "eos": 0, **meta})


def spm_tokenizer(tmp_path, pieces=SPM_PIECES, **meta):
    tokens, scores, types = spm_vocab(pieces)
    return tokenizer_from_gguf(tmp_path / "spm.gguf", kind="llama", tokens=tokens, scores=scores, types=types,
                               **{"bos": 1, "eos": 2, **meta})


MODEL_SHAPE = replace(synthetic_shape("tiny", layers=1), vocab_size=288)


def write_model(path, meta=None):
    """A one-layer Llama GGUF (F32) with the tokenizer metadata ``meta`` (None: none at all)."""
    weights = make_weights(MODEL_SHAPE, seed=3)
    s = weights.shape
    w = gguf.GGUFWriter(str(path), "llama")
    write_gguf_shape(w, s)
    w.add_vocab_size(s.vocab_size)                      # without a token list the config needs it
    if meta is not None:
        _metadata(w, **meta)
    for _, name, arr in gguf_tensors(weights):
        w.add_tensor(name, arr)
    finish_gguf(w)
    return weights


# --- byte-level BPE -----------------------------------------------------------------------

def test_gpt2_hello_world_ids_follow_the_merges(tmp_path):
    tok = gpt2_tokenizer(tmp_path)
    tokens, _ = gpt2_vocab()
    enc = tok.encode("hello world")
    assert enc.ids == [tokens.index("hello"), tokens.index("Ġworld")] == [3 + 256 + 4, 3 + 256 + 9]
    assert enc.tokens == ["hello", "Ġworld"]
    assert tok.decode(enc.ids) == "hello world"                                 # no Ġ left in the text


def test_gpt2_merge_rank_decides(tmp_path):
    # "l o" ranked before "l l": h e l l o -> he l l o -> he l lo, and "he ll" can no longer apply
    swapped = ["h e", "l o", "l l"] + GPT2_MERGES[3:]
    tok = gpt2_tokenizer(tmp_path, merges=swapped)
    tokens, _ = gpt2_vocab(swapped)
    assert tok.encode("hello").ids == [tokens.index("he"), byte_id("l"), tokens.index("lo")]


def test_gpt2_unmerged_bytes_and_newline(tmp_path):
    tok = gpt2_tokenizer(tmp_path)
    # "é" is two bytes with no merge; "\n" is Ċ; "x" has no merge
    ids = tok.encode("é\nx").ids
    assert ids == [3 + 0xC3, 3 + 0xA9, byte_id("\n"), byte_id("x")]
    assert tok.decode(ids) == "é\nx"


def test_gpt2_pre_tokenizer_decides_digits(tmp_path):
    # gpt2 keeps " 2024" one word (merged to one token), smollm cuts every digit off
    gpt2 = gpt2_tokenizer(tmp_path, pre="gpt2")
    smollm = gpt2_tokenizer(tmp_path, pre="smollm")
    tokens, _ = gpt2_vocab()
    assert gpt2.encode(" 2024").ids == [tokens.index("Ġ2024")]
    assert smollm.encode(" 2024").ids == [byte_id(" "), byte_id("2"), byte_id("0"), byte_id("2"), byte_id("4")]


# pieces cut by each pre-tokenizer (llama.cpp's regexes for that name), derived by hand
PRE_TEXT = "I'm 12345 ok!!\n\n  x"
PRE_PIECES = {
    "gpt2": ["I", "'m", "Ġ12345", "Ġok", "!!", "ĊĊĠ", "Ġx"],
    "smollm": ["I", "'m", "Ġ", "1", "2", "3", "4", "5", "Ġok", "!!", "ĊĊĠ", "Ġx"],
    "llama3": ["I", "'m", "Ġ", "123", "45", "Ġok", "!!ĊĊ", "Ġ", "Ġx"],
    "llama-bpe": ["I", "'m", "Ġ", "123", "45", "Ġok", "!!ĊĊ", "Ġ", "Ġx"],
    "qwen2": ["I", "'m", "Ġ", "1", "2", "3", "4", "5", "Ġok", "!!ĊĊ", "Ġ", "Ġx"],
    "default": ["I", "'", "m", "Ġ", "123", "45", "Ġok", "!!", "ĊĊĠ", "Ġx"],
}
CONTRACTION_PIECES = {"gpt2": ["DON", "'", "T"], "llama3": ["DON", "'T"], "qwen2": ["DON", "'T"]}


@pytest.mark.parametrize("pre", sorted(PRE_PIECES))
def test_pre_tokenizer_pieces(pre):
    pieces = [p for p, _ in _split_pre_tokenizer(BPE_PRE_TOKENIZERS[pre]).pre_tokenize_str(PRE_TEXT)]
    assert pieces == PRE_PIECES[pre]


@pytest.mark.parametrize("pre", sorted(CONTRACTION_PIECES))
def test_pre_tokenizer_contractions(pre):
    pieces = [p for p, _ in _split_pre_tokenizer(BPE_PRE_TOKENIZERS[pre]).pre_tokenize_str("DON'T")]
    assert pieces == CONTRACTION_PIECES[pre]


def test_llama3_takes_whole_words_from_the_vocabulary(tmp_path):
    # "Ġworld" is a token; without the merges that build it, llama3 still takes it whole
    tokens, types = gpt2_vocab()
    tok = tokenizer_from_gguf(tmp_path / "l3.gguf", kind="gpt2", pre="llama-bpe", tokens=tokens, types=types,
                              merges=["h e", "l l"], bos=1, add_bos=False)
    gpt2 = tokenizer_from_gguf(tmp_path / "g.gguf", kind="gpt2", pre="gpt2", tokens=tokens, types=types,
                               merges=["h e", "l l"])
    assert tok.encode(" world").ids == [tokens.index("Ġworld")]
    assert gpt2.encode(" world").ids == [byte_id(c) for c in " world"]


def test_special_tokens_are_never_split(tmp_path):
    tok = gpt2_tokenizer(tmp_path)
    tokens, _ = gpt2_vocab()
    ids = tok.encode("<|im_start|>hello<tool><|endoftext|>").ids
    assert ids == [1, tokens.index("hello"), 2, 0]
    assert tok.decode(ids) == "hello<tool>"                                     # control dropped, user-defined kept
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>hello<tool><|endoftext|>"


@pytest.mark.parametrize("add_bos, add_eos", [(True, False), (False, False), (None, None), (True, True)])
def test_gpt2_add_bos_eos_follow_the_file(tmp_path, add_bos, add_eos):
    tok = gpt2_tokenizer(tmp_path, add_bos=add_bos, add_eos=add_eos)
    body = tok.encode("hello", add_special_tokens=False).ids
    assert body == [3 + 256 + 4]
    want = [1] * bool(add_bos) + body + [0] * bool(add_eos)                     # absent: gpt2 adds neither
    assert tok.encode("hello").ids == want


def test_gpt2_llama3_adds_bos_when_the_file_is_silent(tmp_path):
    tok = gpt2_tokenizer(tmp_path, pre="llama3")
    assert tok.encode("hello").ids[0] == 1


def test_one_element_merge_list(tmp_path):
    tok = gpt2_tokenizer(tmp_path, merges=["h e"])
    assert tok.encode("he").ids == [3 + 256]


# --- SentencePiece BPE --------------------------------------------------------------------

def spm_ids(*pieces):
    tokens, _, _ = spm_vocab()
    return [tokens.index(p) for p in pieces]


def test_spm_best_scoring_merges_first(tmp_path):
    tok = spm_tokenizer(tmp_path, add_bos=False)
    enc = tok.encode("hello world")
    assert enc.tokens == ["▁hello", "▁world"]
    assert enc.ids == spm_ids("▁hello", "▁world") == [259 + 13, 259 + 18]
    assert tok.decode(enc.ids) == "hello world"


def test_spm_scores_change_the_result(tmp_path):
    # "lo" now scores better than "ll": ▁ he l lo, and "hell" can no longer form
    tok = spm_tokenizer(tmp_path, pieces={**SPM_PIECES, "lo": -1.5}, add_bos=False)
    assert tok.encode("hello").tokens == ["▁", "he", "l", "lo"]
    assert tok.encode("hello").ids == spm_ids("▁", "he", "l", "lo")


def test_spm_byte_fallback(tmp_path):
    tok = spm_tokenizer(tmp_path, add_bos=False)
    ids = tok.encode("hé").ids                                                 # ▁ h, then é as bytes C3 A9
    assert ids == spm_ids("▁", "h") + [3 + 0xC3, 3 + 0xA9]
    assert tok.decode(ids) == "hé"


@pytest.mark.parametrize("add_bos, want_bos", [(None, True), (True, True), (False, False)])
def test_spm_add_bos(tmp_path, add_bos, want_bos):
    tok = spm_tokenizer(tmp_path, add_bos=add_bos)                             # absent: llama adds BOS
    assert tok.encode("hello").ids == [1] * want_bos + spm_ids("▁hello")
    assert tok.decode(tok.encode("hello").ids) == "hello"


def test_bos_eos_ids_are_special_even_without_token_types(tmp_path):
    tokens, scores, _ = spm_vocab()
    tok = tokenizer_from_gguf(tmp_path / "untyped.gguf", kind="llama", tokens=tokens, scores=scores, bos=1, eos=2)
    ids = tok.encode("hello</s>").ids
    assert ids == [1] + spm_ids("▁hello") + [2]                                # "</s>" not split into bytes
    assert tok.decode(ids) == "hello"


def _spm_reference(text, pieces):
    """llama.cpp's SentencePiece BPE, literally: join the adjacent pair whose union is the
    best-scoring piece (leftmost on ties) until none is left; unknown characters as bytes."""
    if not text:
        return []
    syms = list("▁" + text.replace(" ", "▁"))
    while True:
        cands = [(pieces[a + b], -i) for i, (a, b) in enumerate(zip(syms, syms[1:])) if a + b in pieces]
        if not cands:
            break
        i = -max(cands)[1]
        syms[i:i + 2] = [syms[i] + syms[i + 1]]
    tokens, _, _ = spm_vocab(pieces)
    return [i for s in syms for i in ([tokens.index(s)] if s in pieces else [3 + b for b in s.encode()])]


@given(st.text(alphabet="helowrd éx", max_size=24))
def test_spm_matches_llama_cpp_order(text):
    from sparseinfer.model_export.tokenizer import sentencepiece_bpe

    tokens, scores, types = spm_vocab()
    tok = sentencepiece_bpe(tokens, scores, types)
    assert tok.encode(text).ids == _spm_reference(text, SPM_PIECES)
    assert tok.decode(tok.encode(text).ids) == text


# --- round trips, saving, errors, the checkpoint ------------------------------------------

ROUND_TRIP = ["hello world", "  two  spaces\n\nnew lines\t", "Café déjà vu 2024 ✓", "x"]


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_decode_round_trip_has_no_markers(tmp_path, kind):
    tok = gpt2_tokenizer(tmp_path) if kind == "gpt2" else spm_tokenizer(tmp_path)
    for text in ROUND_TRIP:
        ids = tok.encode(text).ids
        out = tok.decode(ids)
        assert out == text, (kind, text, ids, out)
        assert not set("ĠĊ▁") & set(out)
    assert any(len(tok.encode(t).ids) < len(t.encode()) for t in ROUND_TRIP)   # merges did happen


def test_saved_tokenizer_json_keeps_everything(tmp_path):
    for tok in (gpt2_tokenizer(tmp_path, pre="llama3", add_bos=False), spm_tokenizer(tmp_path)):
        tok.save(str(tmp_path / "tokenizer.json"))
        back = load_tokenizer_json(tmp_path / "tokenizer.json")
        for text in ROUND_TRIP + ["<|im_start|>hello"]:
            assert back.encode(text).ids == tok.encode(text).ids


@pytest.mark.parametrize("meta, field, value", [
    ({"kind": "bert"}, "tokenizer.ggml.model", "'bert'"),
    ({"kind": "rwkv"}, "tokenizer.ggml.model", "'rwkv'"),
    ({"kind": "gpt2", "pre": "chameleon", "merges": ["h e"]}, "tokenizer.ggml.pre", "'chameleon'"),
    ({"kind": None}, "tokenizer.ggml.model", "missing"),
    ({"kind": "gpt2", "pre": "gpt2"}, "tokenizer.ggml.merges", "missing"),
    ({"kind": "gpt2", "pre": "gpt2", "merges": ["h e", "x y"]}, "tokenizer.ggml.merges", "xy"),
    ({"kind": "gpt2", "pre": "gpt2", "merges": ["h e", "xy"]}, "tokenizer.ggml.merges[1]", "'xy'"),
])
def test_unknown_tokenizer_is_a_one_line_error(tmp_path, meta, field, value):
    tokens, types = gpt2_vocab()
    with pytest.raises(SparseInferError) as e:
        tokenizer_from_gguf(tmp_path / "odd.gguf", tokens=tokens, types=types, **meta)
    msg = str(e.value)
    assert "\n" not in msg and "odd.gguf" in msg and field in msg and value in msg


def test_add_bos_without_a_bos_id_is_an_error(tmp_path):
    tokens, scores, types = spm_vocab()
    with pytest.raises(SparseInferError, match="add_bos_token is true but tokenizer.ggml.bos_token_id"):
        tokenizer_from_gguf(tmp_path / "nobos.gguf", kind="llama", tokens=tokens, scores=scores, types=types)


def test_checkpoint_gpt2_tokenizer_and_prompt_ids(tmp_path):
    from sparseinfer.model_export.export_folder import prompt_ids as _prompt_ids

    tokens, types = gpt2_vocab()
    tokens += [f"<pad{i}>" for i in range(MODEL_SHAPE.vocab_size - len(tokens))]
    types += [NORMAL] * (len(tokens) - len(types))
    meta = dict(kind="gpt2", pre="smollm", tokens=tokens, types=types, merges=GPT2_MERGES, bos=1, eos=0,
                add_bos=False, template="{{ messages }}")
    write_model(tmp_path / "m.gguf", meta)
    ck = load_checkpoint(tmp_path / "m.gguf")
    assert ck.bos_token_id == 1 and ck.eos_token_id == 0
    assert ck.tokenizer.chat_template == "{{ messages }}"
    # the file says add_bos_token = false: no BOS although the model names one
    assert _prompt_ids(ck.tokenizer, ck.bos_token_id, "hello world") == [3 + 256 + 4, 3 + 256 + 9]


def test_checkpoint_without_tokenizer_metadata(tmp_path):
    write_model(tmp_path / "bare.gguf")
    ck = load_checkpoint(tmp_path / "bare.gguf")
    assert ck.tokenizer is None and np.isfinite(ck.weights.layers[0].gate).all()


def test_checkpoint_unknown_tokenizer_fails_naming_the_file(tmp_path):
    tokens, types = gpt2_vocab()
    write_model(tmp_path / "bert.gguf", dict(kind="bert", tokens=tokens, types=types))
    with pytest.raises(SparseInferError, match=r"bert\.gguf: tokenizer\.ggml\.model = 'bert' is not supported"):
        load_checkpoint(tmp_path / "bert.gguf")
