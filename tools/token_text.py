"""Decoded tokens as the commands print them (``tour``, ``generate``, ``compare``; never --json).

A model's tokens can decode to control characters (a terminal acts on ESC, carriage return,
backspace) or to U+FFFD, what a tokenizer gives for bytes that are not UTF-8.
``display_text`` escapes both; ``TextStream`` decodes a growing sequence for streaming,
holding back a token that holds only part of a UTF-8 character until the next one
completes it (decoded alone, each part would show as U+FFFD).
"""
from __future__ import annotations

import unicodedata

REPLACEMENT = "\ufffd"
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(ch: str) -> str:
    if ch in _NAMED:
        return _NAMED[ch]
    return f"\\x{ord(ch):02x}" if ord(ch) <= 0xFF else f"\\u{ord(ch):04x}"


def display_text(text: str, keep_lines: bool = False) -> str:
    """``text`` safe to print: control characters (C0, DEL, C1) as ``\\xNN`` (``\\n``, ``\\r``,
    ``\\t`` by name) and U+FFFD as ``\\ufffd``; with ``keep_lines``, newlines and tabs stay as
    they are (streamed text keeps its lines)."""
    kept = "\n\t" if keep_lines else ""
    return "".join(_escape(ch) if ch == REPLACEMENT or (ch not in kept and unicodedata.category(ch) == "Cc")
                   else ch for ch in text)


class TextStream:
    """The text each new token adds to ``context`` ids (the prompt's), for streaming:
    ``push`` returns it, up to any trailing U+FFFD (part of a character still to come);
    ``end`` returns what is left."""

    def __init__(self, tokenizer, context=()):
        self.tokenizer, self.ids = tokenizer, list(context)
        self.shown = len(tokenizer.decode(self.ids))

    def _new(self, complete: bool) -> str:
        text = self.tokenizer.decode(self.ids)
        upto = len(text) if complete else len(text.rstrip(REPLACEMENT))
        new = text[self.shown:upto]
        self.shown = max(self.shown, upto)
        return new

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        return self._new(complete=False)

    def end(self) -> str:
        return self._new(complete=True)
