"""Per-layer α schedules, e.g. ``"1.03@0-19,1.00"``.

Grammar: comma-separated entries. ``VALUE@RANGES`` sets α on the listed layers, where
RANGES is one or more ``A`` or ``A-B`` (inclusive) joined by ``+`` (``1.02@0-9+30``).
A bare ``VALUE`` is the default for every other layer (at most one; 1.00 when absent,
the paper's neutral eq. 2). α is held in thousandths: a value with more than three
decimals is an error rather than silently rounded. Overlapping ranges are an error.

α lies in 0.001 .. 1,000,000 (``MAX_ALPHA_MILLI`` thousandths), so that eq. 2 on integer
counts, ``1000 * N_neg > alpha_milli * (d - N_neg)``, fits 64-bit arithmetic for any row
length below 2^31 in the reference, the ONNX bodies and the kernels (whose ``alpha_milli`` is
a 32-bit int); a value outside it is an error, never clipped.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation

from .errors import SparseInferError

DEFAULT_ALPHA_MILLI = 1000  # α = 1.00, paper eq. 2 without scaling
DEFAULT_ALPHA = f"{DEFAULT_ALPHA_MILLI / 1000:.2f}"   # the same α as a schedule's text: "1.00"
MAX_ALPHA_MILLI = 10**9     # α = 1,000,000: alpha_milli * d < 2^63 for d < 2^31, and an int32 in the kernels


def decimal_to_milli(text: str, context: str) -> int:
    """Exact thousandths of a decimal text (``"1.03"`` -> 1030); errors name ``context``.

    A value with more than three decimals is an error rather than silently rounded, and so is
    one beyond ±``MAX_ALPHA_MILLI`` thousandths (the sign is the caller's to check).
    """
    text = str(text).strip()
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise SparseInferError(f"{context}: {text!r} is not a number") from None
    if not value.is_finite():
        raise SparseInferError(f"{context}: {text!r} is not a finite number")
    if value.copy_abs() > Decimal(MAX_ALPHA_MILLI // 1000):       # exact, whatever the exponent
        raise SparseInferError(f"{context}: {text} is outside the supported range of alpha, "
                               f"0.001 to {MAX_ALPHA_MILLI // 1000:,}")
    sign, digits, exponent = value.as_tuple()       # value = ±digits · 10^exponent, held exactly
    if not any(digits):
        return 0
    while digits[-1] == 0:
        digits, exponent = digits[:-1], exponent + 1
    if exponent < -3:
        raise SparseInferError(f"{context}: {text} has more than 3 decimals (alpha is held in thousandths)")
    return (-1) ** sign * int("".join(map(str, digits))) * 10 ** (exponent + 3)


def parse_layer_range(text: str, context: str) -> tuple[int, int]:
    """``A`` or ``A-B`` (inclusive) with 0 <= A <= B; errors name ``context``."""
    part = str(text).strip()
    lo, sep, hi = part.partition("-")
    try:
        a = int(lo)
        b = int(hi) if sep else a
    except ValueError:
        raise SparseInferError(f"{context}: bad layer range {part!r} (use A or A-B, e.g. 0-19)") from None
    if a < 0 or b < a:
        raise SparseInferError(f"{context}: bad layer range {part!r} (need 0 <= A <= B)")
    return a, b


def _parse_milli(text: str, spec: str) -> int:
    milli = decimal_to_milli(text, f"alpha schedule {spec!r}")
    if milli <= 0:
        raise SparseInferError(f"alpha schedule {spec!r}: alpha must be > 0, got {text.strip()}")
    return milli


def _parse_ranges(text: str, spec: str) -> list[tuple[int, int]]:
    return [parse_layer_range(part, f"alpha schedule {spec!r}") for part in text.split("+")]


@dataclass(frozen=True)
class AlphaSchedule:
    """α per layer: explicit (first, last, alpha_milli) ranges plus a default."""

    ranges: tuple[tuple[int, int, int], ...] = ()
    default_milli: int = DEFAULT_ALPHA_MILLI
    _spec: str = field(default="", compare=False)

    @classmethod
    def parse(cls, spec) -> "AlphaSchedule":
        if isinstance(spec, AlphaSchedule):
            return spec
        if isinstance(spec, (int, float)):
            spec = repr(float(spec))
        spec = str(spec).strip()
        if not spec:
            raise SparseInferError("alpha schedule is empty; give e.g. '1.00' or '1.03@0-19,1.00'")
        ranges: list[tuple[int, int, int]] = []
        default = None
        for entry in spec.split(","):
            value, at, where = entry.partition("@")
            milli = _parse_milli(value, spec)
            if not at:
                if default is not None:
                    raise SparseInferError(f"alpha schedule {spec!r}: more than one default (entry without @)")
                default = milli
                continue
            for a, b in _parse_ranges(where, spec):
                for a2, b2, _ in ranges:
                    if a <= b2 and a2 <= b:
                        raise SparseInferError(f"alpha schedule {spec!r}: layers {a}-{b} overlap {a2}-{b2}")
                ranges.append((a, b, milli))
        return cls(tuple(sorted(ranges)), DEFAULT_ALPHA_MILLI if default is None else default, spec)

    def milli(self, layer: int) -> int:
        """α of ``layer`` in thousandths."""
        for a, b, m in self.ranges:
            if a <= layer <= b:
                return m
        return self.default_milli

    def alpha(self, layer: int) -> float:
        return self.milli(layer) / 1000.0

    def per_layer_milli(self, num_layers: int) -> list[int]:
        """α in thousandths for layers 0..num_layers-1; errors if a range names a missing layer."""
        self.check_layers(num_layers)
        return [self.milli(i) for i in range(num_layers)]

    def check_layers(self, num_layers: int) -> None:
        for a, b, _ in self.ranges:
            if b >= num_layers:
                raise SparseInferError(
                    f"alpha schedule {str(self)!r} names layer {b}, but the model has {num_layers} layers (0-{num_layers - 1})")

    def __str__(self) -> str:
        parts = [f"{m / 1000:.3f}".rstrip("0").rstrip(".") + f"@{a}" + (f"-{b}" if b != a else "")
                 for a, b, m in self.ranges]
        parts.append(f"{self.default_milli / 1000:.2f}" if self.default_milli % 10 == 0
                     else f"{self.default_milli / 1000:.3f}")
        return ",".join(parts)
