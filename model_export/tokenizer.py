"""Tokenizers through the ``tokenizers`` library: loading ``tokenizer.json``, building the
byte-level tokenizer of synthetic checkpoints, and building a GGUF file's own tokenizer from
its metadata (``gguf_tokenizer``).

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


# --- GGUF vocabularies -------------------------------------------------------------------
# A GGUF file carries its tokenizer as metadata (llama.cpp's llama-vocab is the reference for
# what each key means): ``tokenizer.ggml.model`` names the algorithm, ``tokens`` / ``scores`` /
# ``token_type`` / ``merges`` the vocabulary, ``pre`` the pre-tokenizer of BPE vocabularies.

# tokenizer.ggml.token_type values
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6
# these are matched in the text as whole tokens before any splitting (never split)
UNSPLIT_TOKEN_TYPES = (TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED)

# GPT-2's word splitter: contractions, letters, digits, other symbols (each run with at most
# one leading space), and whitespace that is not followed by a word
_GPT2_WORDS = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# Llama 3's: case-free contractions, letters after at most one non-letter, digits in runs of
# at most three, symbols with their trailing newlines, newline runs, whitespace
_LLAMA3_WORDS = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen 2's: Llama 3's with every digit on its own
_QWEN2_WORDS = _LLAMA3_WORDS.replace(r"\p{N}{1,3}", r"\p{N}")

# tokenizer.ggml.pre -> the regexes that cut text into words, applied one after the other to
# every piece (a match and the text between matches each become a piece); the names and
# regexes are llama.cpp's for the same value
_DEFAULT_SPLITS = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2_WORDS, r"\p{N}+", r"[0-9][0-9][0-9]")
_GPT2_SPLITS = (_GPT2_WORDS,)
_DIGIT_SPLITS = (r"\p{N}", _GPT2_WORDS)
BPE_PRE_TOKENIZERS = {
    "default": _DEFAULT_SPLITS,
    "gpt2": _GPT2_SPLITS, "gpt-2": _GPT2_SPLITS, "mpt": _GPT2_SPLITS, "olmo": _GPT2_SPLITS,
    "smollm": _DIGIT_SPLITS, "starcoder": _DIGIT_SPLITS, "refact": _DIGIT_SPLITS, "command-r": _DIGIT_SPLITS,
    "llama3": (_LLAMA3_WORDS,), "llama-v3": (_LLAMA3_WORDS,), "llama-bpe": (_LLAMA3_WORDS,),
    "dbrx": (_LLAMA3_WORDS,), "smaug-bpe": (_LLAMA3_WORDS,),
    "qwen2": (_QWEN2_WORDS,), "stablelm2": (_QWEN2_WORDS,), "deepseek-r1-qwen": (_QWEN2_WORDS,),
}
# Llama 3 vocabularies take a word that is itself a token whole (merges ignored) and, unless
# the file says otherwise, start every sequence with BOS
LLAMA3_PRE = frozenset({"llama3", "llama-v3", "llama-bpe"})
GGUF_TOKENIZER_MODELS = ("gpt2", "llama")


def _split_pre_tokenizer(regexes):
    """Regex splits applied in turn, then GPT-2's bytes-to-printable-characters mapping."""
    from tokenizers import Regex, pre_tokenizers

    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
    return pre_tokenizers.Sequence(splits + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _parse_merges(merges, source: str) -> list[tuple[str, str]]:
    """``"left right"`` strings -> pairs (cut at the first space after the first character)."""
    pairs = []
    for i, m in enumerate(merges):
        cut = m.find(" ", 1)
        if cut < 0:
            raise SparseInferError(f"{source}: tokenizer.ggml.merges[{i}] = {m!r} is not 'left right'")
        pairs.append((m[:cut], m[cut + 1:]))
    return pairs


def byte_level_bpe(tokens, merges, pre: str, source: str = "vocabulary"):
    """GPT-2-style byte-level BPE over a GGUF vocabulary (``tokenizer.ggml.model = gpt2``).

    Text is cut into words by the regexes of ``pre`` (see ``BPE_PRE_TOKENIZERS``), each word's
    UTF-8 bytes are spelled with GPT-2's printable byte alphabet (``Ġ`` for a space) and merged
    by rank in the order of ``merges``; decoding maps the alphabet back to bytes.
    """
    from tokenizers import Tokenizer, decoders, models

    if pre not in BPE_PRE_TOKENIZERS:
        raise SparseInferError(f"{source}: tokenizer.ggml.pre = {pre!r} is not supported for tokenizer.ggml.model "
                               f"gpt2; supported: {', '.join(sorted(BPE_PRE_TOKENIZERS))}")
    vocab = {t: i for i, t in enumerate(tokens)}
    try:
        model = models.BPE(vocab=vocab, merges=_parse_merges(merges, source), ignore_merges=pre in LLAMA3_PRE)
    except Exception as e:  # the library raises a bare Exception for a merge outside the vocabulary
        raise SparseInferError(f"{source}: tokenizer.ggml.merges: {str(e).splitlines()[0]}") from None
    tok = Tokenizer(model)
    tok.pre_tokenizer = _split_pre_tokenizer(BPE_PRE_TOKENIZERS[pre])
    tok.decoder = decoders.ByteLevel()
    return tok


def sentencepiece_merges(tokens, scores, types=None) -> list[tuple[str, str]]:
    """The merges a SentencePiece BPE vocabulary implies, best first.

    SentencePiece BPE repeatedly joins the adjacent pair whose union is the best-scoring piece
    of the vocabulary, so every way of cutting a normal piece into two pieces of the
    vocabulary is a merge ranked by the piece's score (higher first; ties by piece id, then by
    where the cut falls).
    """
    ids = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for i, piece in enumerate(tokens):
        if types is not None and types[i] != TOKEN_NORMAL:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                ranked.append((-float(scores[i]), i, cut, left, right))
    ranked.sort(key=lambda r: r[:3])
    return [(left, right) for *_, left, right in ranked]


def sentencepiece_bpe(tokens, scores, types=None, add_space_prefix: bool = True):
    """SentencePiece BPE over a GGUF vocabulary (``tokenizer.ggml.model = llama``).

    Spaces become ``▁`` (and one ``▁`` is put in front of the text, and after every special
    token, when ``add_space_prefix``); pieces are merged by score (``sentencepiece_merges``);
    a character that no piece covers falls back to its UTF-8 bytes as ``<0xXX>`` tokens.
    Decoding turns bytes back into characters, ``▁`` into spaces, and drops the prefix.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers

    scores = list(scores) if scores is not None else [0.0] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    unk = next((tokens[i] for i, t in enumerate(types or ()) if t == TOKEN_UNKNOWN), None)
    if unk is None and "<unk>" in vocab:
        unk = "<unk>"
    model = models.BPE(vocab=vocab, merges=sentencepiece_merges(tokens, scores, types), unk_token=unk,
                       fuse_unk=True, byte_fallback=True)
    tok = Tokenizer(model)
    escape = normalizers.Replace(" ", "▁")
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), escape]) if add_space_prefix else escape
    steps = [decoders.ByteFallback(), decoders.Fuse(), decoders.Replace("▁", " ")]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if add_space_prefix else []))
    return tok


def _add_unsplit_tokens(tok, tokens, types, special_ids) -> None:
    """Unknown, control and user-defined tokens, and the ids in ``special_ids`` (the file's BOS /
    EOS / unknown ids, whatever their type), become added tokens: matched whole in the raw text
    before anything else, so never split; all but user-defined ones are special (dropped by
    ``decode(skip_special_tokens=True)``)."""
    from tokenizers import AddedToken

    kinds = {i: t for i, t in enumerate(types or ()) if t in UNSPLIT_TOKEN_TYPES}
    kinds.update({i: TOKEN_CONTROL for i in special_ids if i is not None and 0 <= i < len(tokens)})
    tok.add_tokens([AddedToken(tokens[i], special=t != TOKEN_USER_DEFINED, normalized=False)
                    for i, t in sorted(kinds.items()) if tokens[i]])


def _template(tokens, add_bos: bool, add_eos: bool, bos_id, eos_id, source: str):
    """A post-processor that puts BOS / EOS around every encoding exactly as the flags say
    (``encode(text)`` adds them, ``encode(text, add_special_tokens=False)`` does not)."""
    from tokenizers import processors

    ends = []
    for flag, tid, key in ((add_bos, bos_id, "bos"), (add_eos, eos_id, "eos")):
        if flag and (tid is None or not 0 <= tid < len(tokens)):
            raise SparseInferError(f"{source}: tokenizer.ggml.add_{key}_token is true but "
                                   f"tokenizer.ggml.{key}_token_id = {tid!r} is not a token id")
        ends.append([tokens[tid]] if flag else [])
    head, tail = ends
    specials = sorted({(tokens[t], t) for t, f in ((bos_id, add_bos), (eos_id, add_eos)) if f}, key=lambda s: s[1])
    return processors.TemplateProcessing(single=head + ["$A"] + tail, pair=head + ["$A"] + tail + head + ["$B"] + tail,
                                         special_tokens=specials)


def gguf_tokenizer(fields: dict, source: str = "GGUF file"):
    """A ``tokenizers.Tokenizer`` built from a GGUF file's ``tokenizer.*`` metadata, or None
    when the file has no vocabulary.

    ``fields`` maps each ``tokenizer.*`` key to its value (arrays as lists). The algorithm comes
    from ``tokenizer.ggml.model`` (``gpt2``: byte-level BPE with ``merges`` and the
    pre-tokenizer ``pre``, ``default`` when absent as in llama.cpp; ``llama``: SentencePiece
    BPE with ``scores``); any other value, or an unknown ``pre``, is an error naming it. BOS /
    EOS are added by the tokenizer's post-processor as ``add_bos_token`` / ``add_eos_token``
    say (llama.cpp's defaults when absent: BOS for ``llama`` and Llama 3 vocabularies). The
    chat template, if any, is kept as the attribute ``chat_template`` (None otherwise).
    """
    tokens = fields.get("tokenizer.ggml.tokens")
    if not tokens:
        return None
    kind = fields.get("tokenizer.ggml.model")
    if kind is None:
        raise SparseInferError(f"{source}: tokenizer.ggml.tokens is present but tokenizer.ggml.model is missing")
    types = fields.get("tokenizer.ggml.token_type")
    if types is not None and len(types) != len(tokens):
        raise SparseInferError(f"{source}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    if kind == "gpt2":
        pre = fields.get("tokenizer.ggml.pre", "default")
        merges = fields.get("tokenizer.ggml.merges")
        if merges is None:
            raise SparseInferError(f"{source}: tokenizer.ggml.model = 'gpt2' but tokenizer.ggml.merges is missing")
        tok = byte_level_bpe(tokens, merges, pre, source)
        default_bos = pre in LLAMA3_PRE
    elif kind == "llama":
        tok = sentencepiece_bpe(tokens, fields.get("tokenizer.ggml.scores"), types,
                                bool(fields.get("tokenizer.ggml.add_space_prefix", True)))
        default_bos = True
    else:
        raise SparseInferError(f"{source}: tokenizer.ggml.model = {kind!r} is not supported; "
                               f"supported: {', '.join(GGUF_TOKENIZER_MODELS)}")
    bos, eos = fields.get("tokenizer.ggml.bos_token_id"), fields.get("tokenizer.ggml.eos_token_id")
    _add_unsplit_tokens(tok, tokens, types, (bos, eos, fields.get("tokenizer.ggml.unknown_token_id")))
    add_bos = bool(fields.get("tokenizer.ggml.add_bos_token", default_bos))
    add_eos = bool(fields.get("tokenizer.ggml.add_eos_token", False))
    tok.post_processor = _template(tokens, add_bos, add_eos, bos, eos, source)
    tok.chat_template = fields.get("tokenizer.chat_template")
    return tok
