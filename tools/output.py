"""Small helpers shared by the commands: aligned text tables, JSON, and the click type of a
finite number in a range."""
from __future__ import annotations

import contextlib
import math

import click

from sparseinfer.reference.files import json_text


_kept: list[list] = []        # where echo_json puts results instead of printing them, innermost last


def echo_json(data) -> None:
    """``data`` as JSON on stdout: never NaN or Infinity (non-finite floats are null, their
    paths listed under ``non_finite_as_null``; reference.files.json_text). Inside
    ``keeping_json`` it is kept instead."""
    if _kept:
        _kept[-1].append(data)
        return
    click.echo(json_text(data))


@contextlib.contextmanager
def keeping_json():
    """Within, echo_json appends its data to the yielded list instead of printing it: how
    ``tour --json`` makes one document of the results of the commands it runs."""
    kept: list = []
    _kept.append(kept)
    try:
        yield kept
    finally:
        _kept.pop()


class FiniteFloat(click.FloatRange):
    """A float in a range that is also finite: click's FloatRange lets NaN through (every
    comparison with NaN is false) and Infinity past an open top. Nothing is clamped."""

    name = "finite float"

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return rv


def echo_err(message: str) -> None:
    """A progress or status line on stderr (stdout stays for the result)."""
    click.echo(message, err=True)


def format_table(headers: list[str], rows: list[list]) -> str:
    """Left-aligned first column, right-aligned others."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]

    def line(values):
        return "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths)))

    out = [line(headers), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    return "\n".join(out)


def sci(v, digits: int = 4) -> str:
    """Scientific notation with ``digits`` significant figures, '0' for zero."""
    return "0" if v == 0 else f"{float(v):.{digits - 1}e}"


def rel_diff(ours, theirs) -> str:
    if theirs == 0:
        return "exact" if ours == 0 else "n/a"
    r = (float(ours) - float(theirs)) / float(theirs)
    return f"{r:+.2%}"
