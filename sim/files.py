"""Reading the simulator's input documents with one-line errors."""
from __future__ import annotations

from pathlib import Path

from sparseinfer.reference.errors import SparseInferError


def read_document(path, what: str, parse, parse_errors: tuple):
    """``parse(text)`` of the file at ``path``; a missing or unreadable file is one line naming ``what``."""
    p = Path(path)
    if not p.is_file():
        raise SparseInferError(f"no such {what}: {p}")
    try:
        return parse(p.read_text())
    except (OSError, UnicodeDecodeError, *parse_errors) as e:
        raise SparseInferError(f"cannot read {what} {p}: {str(e).splitlines()[0] if str(e) else e!r}") from None
