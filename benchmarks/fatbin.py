"""Keep one GPU architecture's machine code in a shared library's CUDA fat binaries.

A CUDA library carries its kernels once per architecture in the ELF section
``.nv_fatbin``: a sequence of fat-binary containers (magic 0xBA55ED50, version, header
size, size of what follows), each a sequence of entries (kind 1 = PTX, 2 = ELF machine
code; header size; payload size; the SM version at byte 28 of the entry header).
onnxruntime-gpu's CUDA provider holds sm_75, 80, 86, 89, 90 and 120 code, 208 MiB of its
271. An H100 or H200 (sm_90) can run only the sm_90 machine code, since machine code runs
only on its own major version, and PTX of an architecture up to its own. So
:func:`keep_arch` overwrites every other entry's payload with zeros, leaving every header,
offset and size as it was: the library is byte for byte as long, its loader walks the same
entries, and the zeros compress to nothing (the provider's 220 MiB compressed become 50).

It refuses (and changes nothing) where the section does not parse as expected.
"""
from __future__ import annotations

import struct

from sparseinfer.reference.errors import SparseInferError

FATBIN_MAGIC = 0xBA55ED50
_CONTAINER = struct.Struct("<IHHQ")       # magic, version, header size, size of the entries
_ENTRY = struct.Struct("<HHIQ")           # kind, version, header size, payload size
_ENTRY_ARCH_OFFSET = 28
KIND_PTX, KIND_ELF = 1, 2


def _fatbin_section(so: bytes) -> tuple[int, int] | None:
    """(offset, size) of .nv_fatbin in a 64-bit little-endian ELF, None where there is none."""
    if so[:4] != b"\x7fELF":
        return None
    if so[4] != 2 or so[5] != 1:
        raise SparseInferError("not a 64-bit little-endian ELF file")
    shoff, = struct.unpack_from("<Q", so, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", so, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", so, shoff + i * shentsize) for i in range(shnum)]
    names_at = headers[shstrndx][4]
    for name_off, _type, _flags, _addr, offset, size in headers:
        start = names_at + name_off
        if so[start:so.index(b"\0", start)] == b".nv_fatbin":
            return offset, size
    return None


def _usable(kind: int, arch: int, keep: int) -> bool:
    """Whether an entry can run on an sm_``keep`` device: machine code of the same major
    version up to it, or PTX of any architecture up to it (JIT-compiled)."""
    if kind == KIND_ELF:
        return arch // 10 == keep // 10 and arch <= keep
    return arch <= keep


def keep_arch(so: bytes, keep: int) -> tuple[bytes, dict]:
    """``so`` with the payloads of the fat-binary entries an sm_``keep`` device cannot use
    zeroed; and what was kept and zeroed (bytes per (kind, arch))."""
    section = _fatbin_section(so)
    stats = {"kept": {}, "zeroed": {}}
    if section is None:
        return so, stats
    start, size = section
    end = start + size
    out = bytearray(so)
    pos = start
    while pos < end:
        if end - pos < _CONTAINER.size:
            break
        magic, _version, header_size, fat_size = _CONTAINER.unpack_from(so, pos)
        if magic != FATBIN_MAGIC:           # padding between containers (8-byte steps)
            if any(so[pos:pos + 8]):
                raise SparseInferError(f"unexpected bytes at .nv_fatbin offset {pos - start}; left unchanged")
            pos += 8
            continue
        entry, entries_end = pos + header_size, pos + header_size + fat_size
        if entries_end > end:
            raise SparseInferError(f"a fat binary at .nv_fatbin offset {pos - start} overruns the section")
        while entry < entries_end:
            kind, _v, entry_header, payload = _ENTRY.unpack_from(so, entry)
            arch, = struct.unpack_from("<I", so, entry + _ENTRY_ARCH_OFFSET)
            if kind not in (KIND_PTX, KIND_ELF) or not 10 <= arch <= 200 or entry + entry_header + payload > entries_end:
                raise SparseInferError(f"unreadable fat-binary entry at .nv_fatbin offset {entry - start} "
                                       f"(kind {kind}, sm {arch}); left unchanged")
            key = f"{'ptx' if kind == KIND_PTX else 'sm'}_{arch}"
            which = "kept" if _usable(kind, arch, keep) else "zeroed"
            stats[which][key] = stats[which].get(key, 0) + payload
            if which == "zeroed":
                body = entry + entry_header
                out[body:body + payload] = bytes(payload)
            entry += entry_header + payload
        pos = entries_end
    return bytes(out), stats
