"""Keeping one architecture's CUDA machine code in a library (benchmarks/fatbin.py), on a
small ELF file built here with a .nv_fatbin section of two fat binaries, and carried in
parts (carry_parts --keep-sm)."""
from __future__ import annotations

import json
import shutil
import struct
import subprocess
import zipfile

import numpy as np
import pytest

from sparseinfer.benchmarks.carry_parts import MANIFEST, split_wheel, unpack_parts
from sparseinfer.kernels.compile_check import ptxas_candidates
from sparseinfer.benchmarks.fatbin import (FATBIN_MAGIC, KIND_ELF, KIND_PTX, keep_arch, stub_cubin, zstd_stored,
                                          zstd_zeros)
from sparseinfer.reference.errors import SparseInferError

ENTRY_HEADER = 64
needs_ptxas = pytest.mark.skipif(not ptxas_candidates(), reason="no ptxas to build stub cubins")


def _entry(kind: int, arch: int, payload: bytes, flags: int = 0x11, uncompressed: int = 0) -> bytes:
    """An entry header as nvcc writes it: compressed size at 16, SM at 28, flags at 40,
    uncompressed size at 56; the payload padded to 8 bytes."""
    padded = payload + bytes(-len(payload) % 8)
    head = struct.pack("<HHIQIIII", kind, 0x101, ENTRY_HEADER, len(padded), len(payload), 0, 65544, arch)
    head += struct.pack("<IIQQQ", 0, 0, flags, 0, uncompressed)
    assert len(head) == ENTRY_HEADER
    return head + padded


def _zstd_raw(data: bytes) -> bytes:
    """A zstd frame holding ``data`` in one raw (stored) block, as a compressed entry's payload."""
    return (b"\x28\xb5\x2f\xfd" + bytes([0xA0]) + struct.pack("<I", len(data))
            + (1 | (0 << 1) | (len(data) << 3)).to_bytes(3, "little") + data)


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
                                             ("sm90b", 400), ("sm120", 600), ("ptx120", 200), ("sm89z", 333))}


def _library(p):
    first = _container([_entry(KIND_ELF, 80, p["sm80"]), _entry(KIND_ELF, 90, p["sm90"]),
                        _entry(KIND_ELF, 86, p["sm86"]), _entry(KIND_PTX, 80, p["ptx80"]),
                        _entry(KIND_ELF, 89, _zstd_raw(p["sm89z"]), flags=0x8011, uncompressed=len(p["sm89z"]))])
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
        if key in kept:
            assert out[at:at + len(data)] == data, key
        elif key != "sm89z":
            assert out[at:at + len(data)] == bytes(len(data)), key
    # the zstd-compressed sm_89 entry: now a zstd frame of 333 zero bytes, its compressed size updated
    frame_at = so.index(_zstd_raw(payloads["sm89z"]))
    head = frame_at - ENTRY_HEADER
    frame = zstd_zeros(333)
    assert out[frame_at:frame_at + len(frame)] == frame and not any(out[frame_at + len(frame):frame_at + 360])
    assert struct.unpack_from("<I", out, head + 16)[0] == len(frame) < struct.unpack_from("<I", so, head + 16)[0]
    assert stats == {"kept": {"sm_90": 1104, "ptx_80": 304},
                     "zeroed": {"sm_80": 904, "sm_86": 504, "sm_89": 352, "sm_120": 600, "ptx_120": 200}}
    changed = [i for i in range(len(so)) if so[i] != out[i]]
    dropped = [(so.index(payloads[k]), len(payloads[k])) for k in ("sm80", "sm86", "sm120", "ptx120")]
    dropped += [(frame_at, 360), (head + 16, 4)]
    assert all(any(a <= i < a + n for a, n in dropped) for i in changed)       # other headers untouched
    assert keep_arch(out, 90)[0] == out
    # an sm_86 device keeps sm_80 and sm_86 machine code (same major) and PTX 80
    assert set(keep_arch(so, 86)[1]["kept"]) == {"sm_80", "sm_86", "ptx_80"}


@pytest.mark.parametrize("n", [0, 1, 333, 131072, 131073, 288096])
def test_the_zero_frames_decompress_to_zeros(n):
    """Checked with the zstd tool where it is installed; the frame layout in any case."""
    frame = zstd_zeros(n)
    assert frame[:4] == b"\x28\xb5\x2f\xfd" and struct.unpack_from("<I", frame, 5)[0] == n
    assert len(frame) == 9 + 4 * max(1, -(-n // 131072))
    if shutil.which("zstd"):
        out = subprocess.run(["zstd", "-d", "-c"], input=frame, capture_output=True)
        assert out.returncode == 0 and out.stdout == bytes(n), out.stderr


def test_libraries_without_fat_binaries_pass_unchanged_and_bad_ones_are_refused(payloads):
    plain = _elf(None, b"\x90" * 50)
    assert keep_arch(plain, 90) == (plain, {"kept": {}, "zeroed": {}})
    assert keep_arch(b"not an elf", 90)[0] == b"not an elf"
    broken = bytearray(_library(payloads))
    at = broken.index(payloads["sm86"]) - ENTRY_HEADER + 28
    broken[at:at + 4] = struct.pack("<I", 7)                    # an SM version no GPU has
    with pytest.raises(SparseInferError, match="unreadable fat-binary entry .*sm 7.*left unchanged"):
        keep_arch(bytes(broken), 90)
    lz4 = _elf(_container([_entry(KIND_ELF, 80, payloads["sm80"], flags=0x2011, uncompressed=5000)]), b"")
    with pytest.raises(SparseInferError, match="LZ4-compressed .* not supported; left unchanged"):
        keep_arch(lz4, 90)


@needs_ptxas
def test_keep_sm_in_the_carried_parts(payloads, tmp_path):
    so = _library(payloads)
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/capi/libcuda_ops.so", so)
        zf.writestr("pkg/__init__.py", b"x = 1\n")
    dirs = split_wheel(wheel, tmp_path / "carry" / "w", part_bytes=1 << 20, keep_sm=90)
    manifest = json.loads((dirs[0] / MANIFEST).read_text())
    assert manifest["keep_sm"] == 90 and manifest["pruned"]["pkg/capi/libcuda_ops.so"]["kept"]["sm_90"] == 1104
    out = unpack_parts(tmp_path / "carry" / "w", tmp_path / "site")
    assert (out / "pkg/capi/libcuda_ops.so").read_bytes() == keep_arch(so, 90, stub_cubin)[0]
    assert (out / "pkg/__init__.py").read_bytes() == b"x = 1\n"


def test_dropped_entries_can_hold_a_kernel_less_cubin_instead(payloads):
    """With stub_for, a dropped machine-code entry holds a stub cubin of its architecture
    (inside a zstd frame where the entry is compressed, sizes updated); an entry smaller
    than the stub is left as it was; PTX is zeroed."""
    stubs = {arch: b"\x7fELF" + bytes([arch]) * 200 for arch in (80, 86, 89, 120)}
    so = _library(payloads)
    out, stats = keep_arch(so, 90, stub_for=stubs.__getitem__)
    at = so.index(payloads["sm80"])
    assert out[at:at + 204] == stubs[80] + bytes(0) and not any(out[at + 204:at + 904])
    assert struct.unpack_from("<I", out, at - ENTRY_HEADER + 16)[0] == 204
    frame_at = so.index(_zstd_raw(payloads["sm89z"]))
    assert out[frame_at:frame_at + len(zstd_stored(stubs[89]))] == zstd_stored(stubs[89])
    assert struct.unpack_from("<Q", out, frame_at - ENTRY_HEADER + 56)[0] == 204
    big = {arch: bytes(2000) for arch in stubs}                    # larger than every payload
    out, stats = keep_arch(so, 90, stub_for=big.__getitem__)
    assert out.index(payloads["sm80"]) and "sm_80" in stats["kept"] and "sm_80" not in stats["zeroed"]
    assert stats["zeroed"] == {"ptx_120": 200}


@needs_ptxas
def test_stub_cubins_are_elf_files_of_their_architecture():
    for arch in (80, 120):
        cubin = stub_cubin(arch)
        assert cubin[:4] == b"\x7fELF" and 500 < len(cubin) < 4000
        assert struct.unpack_from("<H", cubin, 18)[0] == 190             # e_machine: EM_CUDA
        assert zstd_stored(cubin)[9 + 3:] == cubin                          # one stored block


def test_stored_frames_decompress_to_their_data():
    data = np.random.default_rng(1).bytes(300_000)                          # three blocks
    frame = zstd_stored(data)
    assert len(frame) == 9 + 3 * 3 + len(data)
    if shutil.which("zstd"):
        out = subprocess.run(["zstd", "-d", "-c"], input=frame, capture_output=True)
        assert out.returncode == 0 and out.stdout == data, out.stderr
