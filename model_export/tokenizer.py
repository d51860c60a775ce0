"""Tokenizers through the ``tokenizers`` library: loading ``tokenizer.json`` and building
the byte-level tokenizer of synthetic checkpoints.

The byte-level tokenizer maps byte b to id b (GPT-2's printable byte alphabet as the
token strings, no merges), then the special tokens ``<s>`` and ``</s>``; any text
round-trips through it exactly.
"""
from __future__ import annotations

from pathlib import Path

from sparseinfer.reference.errors import SparseInferError

BYTE_SPECIAL_TOKENS = ("<s>", "</s>")


def _byte_alphabet() -> list[str]:
    """GPT-2's byte -> printable character table, indexed by byte value."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def byte_level_tokenizer():
    """A ``tokenizers.Tokenizer``: ids 0-255 are bytes, 256 ``<s>``, 257 ``</s>``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(_byte_alphabet())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t in BYTE_SPECIAL_TOKENS])
    return tok


def load_tokenizer_json(path):
    from tokenizers import Tokenizer

    p = Path(path)
    if not p.is_file():
        raise SparseInferError(f"no such tokenizer file: {p}")
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:  # the library raises its own exception types
        raise SparseInferError(f"cannot read tokenizer {p}: {str(e).splitlines()[0]}") from None


def vocabulary_tokenizer(tokens: list[str], scores=None):
    """A SentencePiece-style Unigram tokenizer over an explicit vocabulary (e.g. a GGUF's).

    ``▁`` stands for a space, as in Llama's vocabulary; ``scores`` are the pieces' log
    probabilities (0 for all when absent).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    scores = list(scores) if scores is not None else [0.0] * len(tokens)
    unk = next((i for i, t in enumerate(tokens) if t in ("<unk>", "[UNK]")), 0)
    tok = Tokenizer(models.Unigram([(t, float(s)) for t, s in zip(tokens, scores)], unk_id=unk))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    return tok
