"""The one exception type that means "the user gave us something we cannot use".

Scripts catch it at the top, print its message on one line to stderr and exit with code 2, so
every bad-input path looks the same to a user and to a test.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import sys
import tempfile
from typing import Callable, Iterator, TypeVar

EXIT_USAGE = 2

F = TypeVar("F", bound=Callable[..., object])


class IcuError(Exception):
    """A problem with the user's input: the message names the problem and the fix."""


def exit_on_user_error(main: F) -> F:
    """Wrap a script's ``main`` so an :class:`IcuError` becomes ``error: ...`` and exit 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except IcuError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USAGE)

    return wrapper  # type: ignore[return-value]


# Errors the operating system raises for an unusable output location, and what to do about each.
_OS_FIXES = {
    errno.ENOSPC: "no space left on device; free some space or choose a folder on another disk",
    errno.EDQUOT: "disk quota exceeded; free some space or choose a folder on another disk",
    errno.EROFS: "the file system is read-only; choose a writable folder",
    errno.EACCES: "permission denied; choose a folder you can write to",
    errno.EPERM: "operation not permitted; choose a folder you can write to",
}


def _os_problem(exc: OSError) -> str:
    """What went wrong, with the fix when it is a known output-location problem."""
    return _OS_FIXES.get(exc.errno) or str(exc.strerror or exc)


def os_error_message(exc: OSError, what: str) -> str:
    """One line for an OSError met while writing ``what`` (a path or a description)."""
    return f"could not write {what}: {_os_problem(exc)}"


@contextlib.contextmanager
def disk_errors(what: str) -> Iterator[None]:
    """Turn a full disk, a read-only or a forbidden folder met while writing ``what`` into an
    :class:`IcuError` (exit 2 with one line) instead of a traceback or a misleading library
    message. Other OSErrors pass through unchanged."""
    try:
        yield
    except OSError as exc:
        if exc.errno in _OS_FIXES:
            raise IcuError(os_error_message(exc, what)) from None
        raise
    except Exception as exc:  # torch.save (RuntimeError) and safetensors (SafetensorError) say it in text
        text = str(exc).lower()
        if any(m in text for m in ("no space left", "os error 28", "file write failed", "unexpected pos")):
            raise IcuError(f"could not write {what}: no space left on device (or the write failed); "
                           "free some space or choose a folder on another disk") from None
        raise


def check_writable_dir(path: str, flag: str) -> None:
    """Fail fast, before any long computation, when output folder ``path`` (given with ``flag``)
    is a file, cannot be created, or cannot be written. Creates the folder when it is missing."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise IcuError(f"{flag} {path} is a file, not a folder; choose a folder path")
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".icu-write-check-", dir=path)
        try:
            os.write(fd, b"x" * 4096)  # a full disk refuses even one page
            os.fsync(fd)
        finally:
            os.close(fd)
            os.remove(probe)
    except OSError as exc:
        raise IcuError(f"{flag} {path}: {_os_problem(exc)}") from None
