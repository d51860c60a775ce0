"""Writing files whole: every file the product writes goes through here.

A file is written under a temporary name in its own folder and renamed onto its final name
only when complete (``write_whole``, ``replacing``), so an interrupted or failed run (Ctrl-C,
a full disk, an exception) leaves the previous file intact and no partial one. Files that
belong together (an ONNX model and its ``.data``, a checkpoint's config and weights) are
written into a staging folder inside the destination folder (``staging_folder``) and moved
into place by ``commit`` with Ctrl-C deferred and the previous files restored if a rename
fails, so a good pair is never mixed with a half-written one.

A process killed outright (SIGKILL, a power cut) cannot clean up: its temporary file or
staging folder stays behind, hidden. Their names carry the writer's host and process id
(``.model.onnx.<host>-<pid>.<random>.partial``), and every write first removes those in its
folder whose writer, on this host, is gone (``remove_stale``); one whose process still runs is
never touched.

An OSError while writing (disk full, a path under a regular file, no permission) becomes a
one-line SparseInferError naming the final path (``cannot_write``). ``json_text`` is the one
JSON serializer of results: non-finite floats become null, listed under ``non_finite_as_null``,
and the text never holds NaN or Infinity.

The foundation layer: standard library only, so every folder above may use it.
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
from pathlib import Path

from .errors import SparseInferError

NON_FINITE_KEY = "non_finite_as_null"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()           # what open() would give a new file (mkstemp gives 0600)


# --- temporary names, and those left by writers that are gone ------------------------------------

_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"
# .<final name>.<host>-<pid>.<8 random characters of tempfile's>.(tmp|partial)
_TEMPORARY = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9-]*)-(?P<pid>[0-9]{1,10})\.[a-z0-9_]{8}\.(?:tmp|partial)$")


def _prefix(name: str) -> str:
    """The prefix of a temporary name for ``name``: hidden, with this process's host and id."""
    return f".{name}.{_HOST}-{os.getpid()}."


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_stale(folder) -> list[str]:
    """Remove the temporary files and staging folders in ``folder`` whose writer, a process of this
    host named in the file name, no longer runs (killed before it could clean up); returns their
    names. Another host's, a running process's and any other file are left alone."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    removed = []
    for entry in entries:
        m = _TEMPORARY.match(entry.name)
        if not m or m["host"] != _HOST or _running(int(m["pid"])):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
        removed.append(entry.name)
    return removed


def os_error_line(e: OSError) -> str:
    """The reason of an OSError in one line: 'No space left on device (ENOSPC)'."""
    reason = (e.strerror or str(e) or type(e).__name__).splitlines()[0]
    name = errno.errorcode.get(e.errno or 0)
    return f"{reason} ({name})" if name else reason


def os_error_message(e: OSError) -> str:
    """An OSError from anywhere as one line: 'path: No space left on device (ENOSPC)'."""
    names = [str(f) for f in (e.filename, e.filename2) if f is not None]
    return f"{' -> '.join(names)}: {os_error_line(e)}" if names else os_error_line(e)


def cannot_write(path, e: OSError) -> SparseInferError:
    """The one-line error for an OSError met while writing ``path``."""
    where = f" [{e.filename}]" if e.filename and Path(str(e.filename)).name != Path(path).name \
        and not Path(str(e.filename)).name.startswith(".") else ""
    return SparseInferError(f"cannot write {path}: {os_error_line(e)}{where}")


def make_folder(folder) -> Path:
    """``folder`` and its parents, or a one-line error (a parent that is a regular file, permission)."""
    p = Path(folder)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise SparseInferError(f"cannot write into {p}: it is a file, not a directory") from None
    except OSError as e:
        raise cannot_write(p, e) from None
    if not p.is_dir():
        raise SparseInferError(f"cannot write into {p}: it is a file, not a directory")
    return p


def check_destination(path, what: str = "file") -> Path:
    """``path``, or a one-line error where it cannot be written: its folder missing or under a
    regular file, or ``path`` a directory (checked before long work that ends in writing it)."""
    p = Path(path)
    if not p.parent.is_dir():
        if p.parent.exists() or any(q.is_file() for q in p.parent.parents):
            raise SparseInferError(f"cannot write the {what} {p}: {p.parent} is not a directory")
        raise SparseInferError(f"no such directory for the {what}: {p.parent}")
    if p.is_dir():
        raise SparseInferError(f"cannot write the {what} {p}: it is a directory")
    return p


@contextlib.contextmanager
def replacing(path):
    """Yields a temporary path beside ``path``; when the block ends without an error the file
    written there is renamed onto ``path``, otherwise it is removed (and an OSError becomes a
    one-line SparseInferError). The folder must exist."""
    p = Path(path)
    check_destination(p)
    remove_stale(p.parent)
    try:
        fd, name = tempfile.mkstemp(dir=p.parent, prefix=_prefix(p.name), suffix=".tmp")
        os.close(fd)
        tmp = Path(name)
        os.chmod(tmp, _FILE_MODE)
    except OSError as e:
        raise cannot_write(p, e) from None
    try:
        yield tmp
        os.replace(tmp, p)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise cannot_write(p, e) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_whole(path, data: bytes | str) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` through a temporary name, then rename."""
    p = Path(path)
    with replacing(p) as tmp:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
    return p


def copy_whole(source, path) -> Path:
    """Copy the file ``source`` to ``path``, written whole."""
    with replacing(path) as tmp:
        shutil.copyfile(source, tmp)
    return Path(path)


# --- JSON -----------------------------------------------------------------------------------

def finite_json(data, where: str = "$") -> tuple[object, list[str]]:
    """``data`` with every non-finite float (NaN, ±Infinity, NumPy's included) replaced by None,
    and the JSON paths ('$.rows[2].speedup') of those replaced."""
    found: list[str] = []

    def walk(v, at):
        if isinstance(v, dict):
            return {k: walk(x, f"{at}.{k}") for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [walk(x, f"{at}[{i}]") for i, x in enumerate(v)]
        if isinstance(v, float) or type(v).__name__ in ("float16", "float32", "float64", "longdouble"):
            if not math.isfinite(float(v)):
                found.append(at)
                return None
            return float(v)
        return v

    return walk(data, where), found


def json_text(data, indent: int | None = 2) -> str:
    """``data`` as JSON text that never holds NaN or Infinity: non-finite floats become null and,
    where ``data`` is an object, their paths are listed under ``non_finite_as_null``."""
    clean, found = finite_json(data)
    if found and isinstance(clean, dict):
        clean[NON_FINITE_KEY] = found
    return json.dumps(clean, indent=indent, allow_nan=False, default=_json_default)


def _json_default(v):
    if hasattr(v, "tolist"):                      # NumPy scalars and arrays
        return finite_json(v.tolist())[0]
    if isinstance(v, Path):
        return str(v)
    raise TypeError(f"{type(v).__name__} is not JSON serializable")


def write_json(path, data, indent: int | None = 2) -> Path:
    """``json_text(data)`` and a newline, written whole."""
    return write_whole(path, json_text(data, indent) + "\n")


# --- files that belong together ---------------------------------------------------------------

@contextlib.contextmanager
def staging_folder(folder, label: str):
    """A new hidden folder inside ``folder`` (same file system, so ``commit``'s renames are
    atomic), removed with whatever is left in it when the block ends, error or not."""
    dest = make_folder(folder)
    remove_stale(dest)
    try:
        stage = Path(tempfile.mkdtemp(dir=dest, prefix=_prefix(label), suffix=".partial"))
    except OSError as e:
        raise cannot_write(dest / label, e) from None
    try:
        yield stage
    except OSError as e:
        raise cannot_write(dest / label, e) from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)


@contextlib.contextmanager
def deferred_interrupts():
    """Ctrl-C (SIGINT) held back while the block runs and raised as KeyboardInterrupt after it
    (main thread only; elsewhere the block runs as is)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def commit(stage, folder, names: list[str]) -> None:
    """Move ``stage/name`` onto ``folder/name`` for each name in order, as one step as far as a
    file system allows: Ctrl-C is deferred until all are in place, and if a rename fails the
    files already moved are put back to their previous versions. A name missing from ``stage``
    is removed from ``folder`` (a side file the previous version had and the new one has not).
    Put last the file whose presence marks the set complete (the model, the config)."""
    stage, folder = Path(stage), Path(folder)
    backups = stage / ".previous"
    with deferred_interrupts():
        backups.mkdir()
        saved: dict[str, Path] = {}
        for name in names:                       # hard links to the previous files, for the rollback
            final = folder / name
            if final.is_file():
                try:
                    os.link(final, backups / name)
                    saved[name] = backups / name
                except OSError:
                    pass
        done: list[str] = []
        try:
            for name in names:
                new, final = stage / name, folder / name
                if new.exists():
                    os.chmod(new, _FILE_MODE)        # as open() would make it (mkstemp, mkdtemp: owner only)
                    os.replace(new, final)
                    done.append(name)
            for name in names:
                if name not in done:
                    (folder / name).unlink(missing_ok=True)
        except OSError as e:
            for name in done:                    # put the previous versions back
                with contextlib.suppress(OSError):
                    if name in saved:
                        os.replace(saved[name], folder / name)
                    else:
                        (folder / name).unlink(missing_ok=True)
            raise cannot_write(folder / names[-1], e) from None
