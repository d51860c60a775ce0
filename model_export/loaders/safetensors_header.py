"""Checks on a safetensors file's header, read before the safetensors library opens the file:
every entry agrees with the data it points at, and the entries tile the data."""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from sparseinfer.reference.errors import SparseInferError

# bytes per element of each safetensors dtype (the format's own list)
SAFETENSORS_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
                        "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
HEADER_BYTES_MAX = 100 << 20              # the format's own bound on a header


@dataclass
class SafetensorsHeader:
    """A checked header: each tensor's shape and data bytes [start, end), and the data's size."""

    path: Path
    shapes: dict[str, tuple[int, ...]]
    spans: dict[str, tuple[int, int]]
    data_bytes: int


def check_safetensors_header(f: Path) -> SafetensorsHeader:
    """Each tensor's header entry agrees with its data: a known dtype, a shape of whole numbers,
    and offsets inside the file spanning exactly shape × itemsize bytes; one line naming the file,
    the tensor and the rule broken. (A header can still call F32 data I32, the same size:
    ``tensors.check_tensor`` refuses weights of an integer type.) That the entries tile the data is
    ``check_data_tiled``'s, after the tensor names are checked: a removed entry leaves a gap
    that the safetensors library blames on the tensor after it."""
    try:
        with open(f, "rb") as fh:
            head = fh.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            text = fh.read(n) if 0 < n <= HEADER_BYTES_MAX else b""
        size = f.stat().st_size
    except OSError as e:
        raise SparseInferError(f"cannot read {f}: {e.strerror or e}") from None
    if not 0 < n <= HEADER_BYTES_MAX or len(text) != n:
        raise SparseInferError(f"{f}: not a safetensors file (its header length {n} does not fit the file's "
                               f"{size} bytes)")
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, ValueError) as e:
        raise SparseInferError(f"{f}: the safetensors header is not JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(header, dict):
        raise SparseInferError(f"{f}: the safetensors header is not a JSON object")
    data_bytes = size - 8 - n
    checked = SafetensorsHeader(f, {}, {}, data_bytes)
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        where = f"{f}: tensor {name}"
        if not isinstance(entry, dict):
            raise SparseInferError(f"{where}: its header entry is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in SAFETENSORS_ITEMSIZE:
            raise SparseInferError(f"{where}: unknown dtype {json.dumps(dtype)} in the header")
        if not isinstance(shape, list) or not all(type(x) is int and x >= 0 for x in shape):
            raise SparseInferError(f"{where}: shape {json.dumps(shape)} in the header is not a list of "
                                   f"whole numbers >= 0")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(x) is int for x in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_bytes):
            raise SparseInferError(f"{where}: data_offsets {json.dumps(offsets)} lie outside the file's "
                                   f"{data_bytes} data bytes")
        expected = math.prod(shape) * SAFETENSORS_ITEMSIZE[dtype]
        if offsets[1] - offsets[0] != expected:
            raise SparseInferError(f"{where}: the header says {dtype} {shape}, {expected} bytes, but its data "
                                   f"spans {offsets[1] - offsets[0]} bytes")
        checked.shapes[name], checked.spans[name] = tuple(shape), tuple(offsets)
    return checked


def check_data_tiled(header: SafetensorsHeader) -> None:
    """The tensors' data follow one another from the first data byte to the last, as the
    format requires: a gap, an overlap or bytes left over is one line naming the bytes and
    the tensors beside them."""
    at, before = 0, None
    for start, end, name in sorted((start, end, name) for name, (start, end) in header.spans.items()):
        if start > at:
            raise SparseInferError(f"{header.path}: data bytes {at}-{start} belong to no tensor in the header "
                                   f"(they lie between {before or 'the header'} and {name})")
        if start < at:
            raise SparseInferError(f"{header.path}: tensors {before} and {name} overlap in the data "
                                   f"(bytes {start}-{at})")
        at, before = end, name
    if at != header.data_bytes:
        raise SparseInferError(f"{header.path}: data bytes {at}-{header.data_bytes} belong to no tensor in the "
                               f"header (they follow {before or 'the header'})")
