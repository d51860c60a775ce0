"""A disk cache of compiled kernel modules (cubin or PTX bytes), keyed by what made them.

The kernels compile through CuPy's plain NVRTC call (``device._module``: CuPy's own cached
compile would add ``-ftz=true``), which has no disk cache, so every process would pay NVRTC
for every source at first use. Here the bytes are kept under
``$SPARSEINFER_KERNEL_CACHE`` (default ``~/.cache/sparseinfer/kernels``; ``off`` disables
it), one file per key: the SHA-256 of what the caller names (``device._module``: the source
text, the compile options, the device's compute capability, the NVRTC, driver and CuPy
versions), so a change to any of them compiles afresh. Files are written whole (a temporary file, then a rename), and a cache folder that
cannot be written only costs the caching, never the compile.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

from sparseinfer.reference.errors import SparseInferError
from sparseinfer.reference.files import write_whole

CACHE_ENV = "SPARSEINFER_KERNEL_CACHE"


def cache_dir() -> Path | None:
    """The cache folder, or None when ``$SPARSEINFER_KERNEL_CACHE`` is ``off``."""
    value = os.environ.get(CACHE_ENV, "")
    if value == "off":
        return None
    return Path(value) if value else Path.home() / ".cache" / "sparseinfer" / "kernels"


def cache_key(*parts) -> str:
    """A file name for the compiled bytes of ``parts`` (JSON-serialisable values)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def cached_compile(key: str, compile_fn: Callable[[], bytes]) -> tuple[bytes, bool]:
    """(bytes, whether they came from the cache): the cached file of ``key``, else
    ``compile_fn()``, stored for the next process."""
    folder = cache_dir()
    path = folder / f"{key}.bin" if folder is not None else None
    if path is not None and path.is_file():
        data = path.read_bytes()
        if data:
            return data, True
    data = compile_fn()
    if isinstance(data, str):
        data = data.encode()
    if path is not None:
        _store(folder, path, data)
    return data, False


def _store(folder: Path, path: Path, data: bytes) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_whole(path, data)
    except (OSError, SparseInferError):     # a read-only or full cache folder: compiled, just not kept
        pass
