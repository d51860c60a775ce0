"""Writing files whole: every file the product writes goes through here.

A file is written under a temporary name in its own folder and renamed onto its final name
only when complete (``write_whole``, ``replacing``), so an interrupted or failed run (Ctrl-C,
a full disk, an exception) leaves the previous file intact and no partial one. Files that
belong together (an export's model, its ``.data`` and the files beside them; a checkpoint's
config, weights and tokenizer) are
written into a staging folder inside the destination folder (``staging_folder``) and moved
into place by ``commit`` with Ctrl-C deferred and the previous files restored if a rename
fails, so a good pair is never mixed with a half-written one.

A process killed outright (SIGKILL, a power cut) cannot clean up: its temporary file or
staging folder stays behind, hidden. Their names carry the writer's host and process id
(``.model.onnx.<host>-<pid>.<random>.partial``), and every write first removes those in its
folder whose writer, on this host, is gone (``remove_stale``); one whose process still runs is
never touched.

An OSError while writing (disk full, a path under a regular file, no permission), or a
library's I/O error that carries one (safetensors' and tokenizers' '... (os error 28)'),
becomes a one-line SparseInferError naming the final path (``cannot_write``). A path that
exists and is not a regular file (a device, a FIFO, a socket, or a link to one) is never
replaced: renaming a file onto ``/dev/full`` would replace the device (``check_replaceable``).
Folders a failed write created are removed again (``staging_folder``).

SIGTERM ends a command as Ctrl-C does, so that every writer cleans up on the way out
(``terminate_as_interrupt``); both are held back while ``commit`` moves files into place.

``json_text`` is the one JSON serializer of results: non-finite floats become null, listed
under ``non_finite_as_null``, and the text never holds NaN or Infinity.

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
import stat
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


_RUST_OS_ERROR = re.compile(r"\(os error (?P<errno>[0-9]{1,4})\)")


def os_error_of(e: BaseException) -> OSError | None:
    """``e`` as an OSError: itself, or the OSError a library's I/O error carries in its text
    (safetensors and tokenizers raise plain exceptions ending '... (os error 28)'); else None."""
    if isinstance(e, OSError):
        return e
    if not isinstance(e, Exception) or isinstance(e, SparseInferError):
        return None
    m = _RUST_OS_ERROR.search(str(e))
    if m is None:
        return None
    code = int(m["errno"])
    return OSError(code, os.strerror(code))


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


_FILE_KINDS = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"),
               (stat.S_ISSOCK, "a socket"))


def check_replaceable(path, what: str = "file") -> Path:
    """``path``, or a one-line error where writing it would replace something that is not a
    regular file: a directory, a device, a FIFO, a socket, or a symbolic link to one. (A file
    renamed onto ``/dev/full`` would replace the device.) A missing path, a regular file and a
    link to a regular file or to nothing may be replaced."""
    p = Path(path)
    try:
        mode = os.stat(p).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return p
    except OSError as e:
        raise cannot_write(p, e) from None
    if stat.S_ISREG(mode):
        return p
    kind = "a directory" if stat.S_ISDIR(mode) else next((k for test, k in _FILE_KINDS if test(mode)),
                                                         "not a regular file")
    link = " (through a symbolic link)" if p.is_symlink() else ""
    raise SparseInferError(f"cannot write the {what} {p}: it is {kind}{link}, not a regular file")


def check_destination(path, what: str = "file") -> Path:
    """``path``, or a one-line error where it cannot be written: its folder missing or under a
    regular file, or ``path`` something other than a regular file (``check_replaceable``;
    checked before long work that ends in writing it)."""
    p = Path(path)
    if not p.parent.is_dir():
        if p.parent.exists() or any(q.is_file() for q in p.parent.parents):
            raise SparseInferError(f"cannot write the {what} {p}: {p.parent} is not a directory")
        raise SparseInferError(f"no such directory for the {what}: {p.parent}")
    return check_replaceable(p, what)


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
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        os_error = os_error_of(e)
        if os_error is None:
            raise
        raise cannot_write(p, os_error) from None


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
def new_folder(folder):
    """``folder``, made with its missing parents for the block (``make_folder``); if the block
    fails, those of them this call made are removed again where they are still empty, so a
    failed run leaves no empty folder behind."""
    p = Path(folder)
    missing = [q for q in (p, *p.parents) if not os.path.lexists(q)]      # the deepest first
    try:
        yield make_folder(p)
    except BaseException:
        for q in missing:
            with contextlib.suppress(OSError):
                q.rmdir()
        raise


@contextlib.contextmanager
def staging_folder(folder, label: str, target=None):
    """A new hidden folder inside ``folder`` (same file system, so ``commit``'s renames are
    atomic), removed with whatever is left in it when the block ends, error or not; ``folder``
    is made if missing, and removed again if the block fails (``new_folder``). An I/O error in
    the block becomes one line naming ``target`` (default ``folder/label``)."""
    with new_folder(folder) as dest:
        target = dest / label if target is None else Path(target)
        remove_stale(dest)
        try:
            stage = Path(tempfile.mkdtemp(dir=dest, prefix=_prefix(label), suffix=".partial"))
        except OSError as e:
            raise cannot_write(target, e) from None
        try:
            yield stage
        except Exception as e:
            os_error = os_error_of(e)
            if os_error is None:
                raise
            raise cannot_write(target, os_error) from None
        finally:
            shutil.rmtree(stage, ignore_errors=True)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where it lands (``terminate_as_interrupt``): a KeyboardInterrupt, so that
    it unwinds as Ctrl-C does and every writer removes its partial files on the way out."""


def _raise_terminated(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def terminate_as_interrupt():
    """SIGTERM raises ``Terminated`` while the block runs, where it would end the process at
    once (its default action; main thread only). Another handler, or SIGTERM ignored, stays."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def deferred_interrupts():
    """Ctrl-C (SIGINT) and SIGTERM held back while the block runs and raised after it, each to
    the handler it had before (KeyboardInterrupt, ``Terminated``, or the process's end); a
    signal that was ignored stays ignored. Main thread only; elsewhere the block runs as is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {}
    for signum in DEFERRED_SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            previous[signum] = signal.signal(signum, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    for signum in dict.fromkeys(caught):
        signal.raise_signal(signum)


def commit(stage, folder, names: list[str]) -> None:
    """Move ``stage/name`` onto ``folder/name`` for each name in order, as one step as far as a
    file system allows: Ctrl-C is deferred until all are in place, and if a rename fails the
    files already moved are put back to their previous versions; a name that would replace
    something other than a regular file (``check_replaceable``) moves none. A name missing from ``stage``
    is removed from ``folder`` (a side file the previous version had and the new one has not).
    Put last the file whose presence marks the set complete (the model, the config)."""
    stage, folder = Path(stage), Path(folder)
    for name in names:                           # nothing moved unless every name may be replaced
        check_replaceable(folder / name)
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
