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
_ENTRY = struct.Struct("<HHIQ")           # kind, version, header size, payload size (padded)
_ENTRY_COMPRESSED_SIZE_OFFSET = 16        # u32: bytes of the compressed payload
_ENTRY_ARCH_OFFSET = 28
_ENTRY_FLAGS_OFFSET = 40                  # u64
_ENTRY_UNCOMPRESSED_SIZE_OFFSET = 56      # u64
FLAG_COMPRESSED_LZ4, FLAG_COMPRESSED_ZSTD = 0x2000, 0x8000
KIND_PTX, KIND_ELF = 1, 2
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_ZSTD_MAX_BLOCK = 128 * 1024


def zstd_zeros(n: int) -> bytes:
    """A zstd frame that decompresses to ``n`` zero bytes: single segment, content size
    given, RLE blocks of at most 128 KiB (RFC 8878, 3.1.1)."""
    frame = bytearray(ZSTD_MAGIC + bytes([0xA0]) + struct.pack("<I", n))   # 4-byte content size
    left = n
    while True:
        size = min(left, _ZSTD_MAX_BLOCK)
        left -= size
        header = (1 if left == 0 else 0) | (1 << 1) | (size << 3)           # last, RLE, size
        frame += header.to_bytes(3, "little") + b"\0"
        if left == 0:
            return bytes(frame)


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


def zstd_stored(data: bytes) -> bytes:
    """A zstd frame holding ``data`` in stored (raw) blocks of at most 128 KiB."""
    frame = bytearray(ZSTD_MAGIC + bytes([0xA0]) + struct.pack("<I", len(data)))
    chunks = [data[i:i + _ZSTD_MAX_BLOCK] for i in range(0, len(data), _ZSTD_MAX_BLOCK)] or [b""]
    for i, chunk in enumerate(chunks):
        frame += ((1 if i == len(chunks) - 1 else 0) | (len(chunk) << 3)).to_bytes(3, "little") + chunk
    return bytes(frame)


# A kernel-less PTX module: what ptxas turns into the smallest valid cubin for an architecture.
STUB_PTX = ".version 8.7\n.target sm_{arch}\n.address_size 64\n"


def stub_cubin(arch: int) -> bytes:
    """The smallest valid cubin for sm_``arch`` (no kernels), from ptxas (pip nvidia-cuda-nvcc)."""
    from sparseinfer.kernels.compile_check import ToolMissing, ptx_to_cubin

    try:
        return ptx_to_cubin(STUB_PTX.format(arch=arch), arch)[2]
    except ToolMissing as e:
        raise SparseInferError(f"replacing sm_{arch} code needs ptxas for a stub cubin: {e}") from None


def _drop_payload(so: bytes, out: bytearray, entry: int, header: int, payload: int, stub: bytes | None) -> bool:
    """Replace an entry's code, keeping the entry readable. With ``stub`` (a kernel-less cubin
    of the same architecture) the entry holds that cubin, so that tools which parse every
    entry (cuobjdump) still can; else zeros. A zstd-compressed entry gets a valid zstd frame
    of the stub (or of as many zero bytes as the code had), with its compressed and
    uncompressed sizes updated; the rest of the padded payload is zeroed. An entry smaller
    than its replacement is left as it was (False)."""
    body = entry + header
    flags, = struct.unpack_from("<Q", so, entry + _ENTRY_FLAGS_OFFSET)
    if flags & FLAG_COMPRESSED_ZSTD:
        if so[body:body + 4] != ZSTD_MAGIC:
            raise SparseInferError("a zstd-flagged fat-binary entry without a zstd frame; left unchanged")
        n, = struct.unpack_from("<Q", so, entry + _ENTRY_UNCOMPRESSED_SIZE_OFFSET)
        frame = zstd_stored(stub) if stub is not None else zstd_zeros(n)
        if len(frame) > payload:
            return False
        out[body:body + payload] = frame + bytes(payload - len(frame))
        struct.pack_into("<I", out, entry + _ENTRY_COMPRESSED_SIZE_OFFSET, len(frame))
        if stub is not None:
            struct.pack_into("<Q", out, entry + _ENTRY_UNCOMPRESSED_SIZE_OFFSET, len(stub))
    elif flags & FLAG_COMPRESSED_LZ4:
        raise SparseInferError("an LZ4-compressed fat-binary entry: not supported; left unchanged")
    elif stub is not None:
        if len(stub) > payload:
            return False
        out[body:body + payload] = stub + bytes(payload - len(stub))
        struct.pack_into("<I", out, entry + _ENTRY_COMPRESSED_SIZE_OFFSET, len(stub))
    else:
        out[body:body + payload] = bytes(payload)
    return True


def keep_arch(so: bytes, keep: int, stub_for=None) -> tuple[bytes, dict]:
    """``so`` with the code of the fat-binary entries an sm_``keep`` device cannot use
    replaced; and what was kept and replaced (bytes per (kind, arch)). ``stub_for(arch)``:
    the replacement cubin of a dropped machine-code entry (``stub_cubin``), else zeros."""
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
            which = "kept"
            if not _usable(kind, arch, keep):
                stub = stub_for(arch) if stub_for is not None and kind == KIND_ELF else None
                which = "zeroed" if _drop_payload(so, out, entry, entry_header, payload, stub) else "kept"
            stats[which][key] = stats[which].get(key, 0) + payload
            entry += entry_header + payload
        pos = entries_end
    return bytes(out), stats
