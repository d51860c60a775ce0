"""Keeping one architecture's CUDA machine code in a library (benchmarks/fatbin.py), on a
small ELF file built here with a .nv_fatbin section of two fat binaries, and carried in
parts (carry_parts --keep-sm)."""
from __future__ import annotations

import json
import struct
import zipfile

import numpy as np
import pytest

from sparseinfer.benchmarks.carry_parts import MANIFEST, split_wheel, unpack_parts
from sparseinfer.benchmarks.fatbin import FATBIN_MAGIC, KIND_ELF, KIND_PTX, keep_arch
from sparseinfer.reference.errors import SparseInferError

ENTRY_HEADER = 64


def _entry(kind: int, arch: int, payload: bytes) -> bytes:
    head = struct.pack("<HHIQ", kind, 0x101, ENTRY_HEADER, len(payload))
    head += struct.pack("<III", 0, len(payload), 0) + struct.pack("<I", arch)
    return head + bytes(ENTRY_HEADER - len(head)) + payload


def _container(entries: list[bytes]) -> bytes:
    body = b"".join(entries)
    return struct.pack("<IHHQ", FATBIN_MAGIC, 1, 16, len(body)) + body


def _elf(fatbin: bytes | None, text: bytes) -> bytes:
    """A 64-bit little-endian ELF: header, .text, optionally .nv_fatbin, the names, section headers."""
    names = b"\0.text\0.nv_fatbin\0.shstrtab\0"
    sections = [(0, 0, 0, 0), (1, 1, 64, len(text))]             # (name offset, type, offset, size)
    body = text
    if fatbin is not None:
        sections.append((7, 1, 64 + len(body), len(fatbin)))
        body += fatbin
    sections.append((18, 3, 64 + len(body), len(names)))
    body += names
    shoff = 64 + len(body)
    header = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9) + struct.pack("<HHIQQQIHHHHHH", 3, 62, 1, 0, 0, shoff, 0, 64,
                                                                         0, 0, 64, len(sections), len(sections) - 1)
    table = b"".join(struct.pack("<IIQQQQIIQQ", n, t, 0, 0, off, size, 0, 0, 1, 0) for n, t, off, size in sections)
    return header + body + table


@pytest.fixture
def payloads():
    rng = np.random.default_rng(3)
    return {key: rng.bytes(n) for key, n in (("sm80", 900), ("sm90", 700), ("sm86", 500), ("ptx80", 300),
                                             ("sm90b", 400), ("sm120", 600), ("ptx120", 200))}


def _library(p):
    first = _container([_entry(KIND_ELF, 80, p["sm80"]), _entry(KIND_ELF, 90, p["sm90"]),
                        _entry(KIND_ELF, 86, p["sm86"]), _entry(KIND_PTX, 80, p["ptx80"])])
    second = _container([_entry(KIND_ELF, 90, p["sm90b"]), _entry(KIND_ELF, 120, p["sm120"]),
                         _entry(KIND_PTX, 120, p["ptx120"])])
    return _elf(first + bytes(8) + second, b"\x90" * 100)         # 8 bytes of padding between containers


def test_only_what_an_sm90_device_runs_is_kept(payloads):
    so = _library(payloads)
    out, stats = keep_arch(so, 90)
    assert len(out) == len(so)
    kept = {"sm90", "sm90b", "ptx80"}            # sm_90 machine code, and PTX it can compile
    for key, data in payloads.items():
        at = so.index(data)
        assert out[at:at + len(data)] == (data if key in kept else bytes(len(data))), key
    assert stats == {"kept": {"sm_90": 1100, "ptx_80": 300},
                     "zeroed": {"sm_80": 900, "sm_86": 500, "sm_120": 600, "ptx_120": 200}}
    changed = [i for i in range(len(so)) if so[i] != out[i]]
    zeroed = [(so.index(payloads[k]), len(payloads[k])) for k in ("sm80", "sm86", "sm120", "ptx120")]
    assert all(any(a <= i < a + n for a, n in zeroed) for i in changed)       # headers untouched
    assert keep_arch(out, 90)[0] == out
    # an sm_86 device keeps sm_80 and sm_86 machine code (same major) and PTX 80
    assert set(keep_arch(so, 86)[1]["kept"]) == {"sm_80", "sm_86", "ptx_80"}


def test_libraries_without_fat_binaries_pass_unchanged_and_bad_ones_are_refused(payloads):
    plain = _elf(None, b"\x90" * 50)
    assert keep_arch(plain, 90) == (plain, {"kept": {}, "zeroed": {}})
    assert keep_arch(b"not an elf", 90)[0] == b"not an elf"
    broken = bytearray(_library(payloads))
    at = broken.index(payloads["sm86"]) - ENTRY_HEADER + 28
    broken[at:at + 4] = struct.pack("<I", 7)                    # an SM version no GPU has
    with pytest.raises(SparseInferError, match="unreadable fat-binary entry .*sm 7.*left unchanged"):
        keep_arch(bytes(broken), 90)


def test_keep_sm_in_the_carried_parts(payloads, tmp_path):
    so = _library(payloads)
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/capi/libcuda_ops.so", so)
        zf.writestr("pkg/__init__.py", b"x = 1\n")
    dirs = split_wheel(wheel, tmp_path / "carry" / "w", part_bytes=1 << 20, keep_sm=90)
    manifest = json.loads((dirs[0] / MANIFEST).read_text())
    assert manifest["keep_sm"] == 90 and manifest["pruned"]["pkg/capi/libcuda_ops.so"]["kept"]["sm_90"] == 1100
    out = unpack_parts(tmp_path / "carry" / "w", tmp_path / "site")
    assert (out / "pkg/capi/libcuda_ops.so").read_bytes() == keep_arch(so, 90)[0]
    assert (out / "pkg/__init__.py").read_bytes() == b"x = 1\n"
