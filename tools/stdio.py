"""The ``sparseinfer`` process's standard streams, as Unix tools treat theirs.

- A result that cannot be written to stdout (closed, a full device) is an error naming
  stdout, not a silent exit 0.
- A pipe on stdout whose reader has gone (``sparseinfer table1 | head -c 10``) ends the
  command quietly with exit 141, as if SIGPIPE had ended it (``ReaderGone``).
- Diagnostics on stderr are best effort: a stderr that cannot be written never turns a
  result into a failure.

A stream closed when the process starts (``>&-``) gets ``/dev/null`` in its descriptor, so
that no file opened later takes descriptor 1 or 2 and receives the output.
"""
from __future__ import annotations

import errno
import io
import os
import sys

from sparseinfer.reference.errors import SparseInferError
from sparseinfer.reference.files import cannot_write

READER_GONE_EXIT = 128 + 13          # the shell's status of a process ended by SIGPIPE


class ReaderGone(BaseException):
    """stdout is a pipe with no reader left. A BaseException, as KeyboardInterrupt is: the
    command stops, whatever it catches along the way."""


class _Stream(io.TextIOWrapper):
    """A standard stream whose failed writes follow the rules above."""

    def write(self, text):
        try:
            return super().write(text)
        except OSError as e:
            return self._failed(e, len(text))

    def flush(self):
        try:
            return super().flush()
        except OSError as e:
            return self._failed(e, None)

    def _failed(self, e: OSError, written):
        if self.label == "stderr":
            return written
        silence_stdout()                       # what is still buffered is dropped at exit, not retried
        if e.errno == errno.EPIPE:
            raise ReaderGone() from None
        if e.errno == errno.EBADF:
            raise SparseInferError("cannot write stdout: it is closed") from None
        raise cannot_write("stdout", e) from None


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _put_devnull(fd: int, flags: int) -> None:
    null = os.open(os.devnull, flags)
    if null != fd:
        os.dup2(null, fd)
        os.close(null)


def install() -> None:
    """Replace sys.stdout and sys.stderr by streams that follow the rules above."""
    for label, fd, closed_flags in (("stdout", 1, os.O_RDONLY), ("stderr", 2, os.O_WRONLY)):
        old = getattr(sys, label)
        if not _is_open(fd):
            _put_devnull(fd, closed_flags)     # read-only for stdout: its writes fail (EBADF)
        elif isinstance(old, io.TextIOWrapper):
            old.flush()
        else:
            continue                           # not the process's own stream: left alone
        stream = _Stream(open(fd, "wb", closefd=False),
                         encoding=getattr(old, "encoding", None) or "utf-8",
                         errors=getattr(old, "errors", None) or "strict",
                         line_buffering=bool(getattr(old, "line_buffering", False)),
                         write_through=bool(getattr(old, "write_through", False)))
        stream.label = label
        setattr(sys, label, stream)


def silence_stdout() -> None:
    """After a failed write: whatever is still buffered or written later goes to /dev/null."""
    _put_devnull(1, os.O_WRONLY)
