"""What the scripts write where: stdout holds only their own output, and progress bars are drawn
only on a terminal.

A tqdm bar redraws itself with carriage returns; written to a file or a pipe (a log, compare.py's
``train.out``) it becomes one enormous line, so when stderr is not a terminal every bar in the
process is switched off, the libraries' included (transformers' "Writing model shards", its GGUF
de-quantizing bar, sentence-transformers' embedding bar, datasets'), and the scripts' log lines
say how far they got. DeepSpeed logs to stdout through its own handler (for example its
"Setting accelerator to CPU" warning, which ``save_pretrained`` triggers through accelerate);
its records are sent to stderr instead.
"""

from __future__ import annotations

import functools
import logging
import sys
from typing import IO, Optional

_DS_FORMAT = logging.Formatter("[%(asctime)s] [%(levelname)s] [%(filename)s:%(lineno)d:%(funcName)s] %(message)s")


def is_terminal(stream: Optional[IO] = None) -> bool:
    """Whether ``stream`` (default: stderr, where bars go) is an interactive terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def bar_disabled(progress: bool = True, stream: Optional[IO] = None) -> bool:
    """tqdm's ``disable``: no bar when the caller wants none or ``stream`` is not a terminal."""
    return not progress or not is_terminal(stream)


def setup_console() -> None:
    """Set a script's process up: DeepSpeed's log records to stderr, and no progress bars unless
    stderr is a terminal. Idempotent; every script calls it at start (``cli.setup_logging`` does)."""
    _deepspeed_logs_to_stderr()
    if not is_terminal(sys.stderr):
        _tqdm_terminal_only()


class _ToStderr(logging.Filter):
    """On the "DeepSpeed" logger: writes each record to stderr and stops it from reaching
    DeepSpeed's own stdout handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        handler = logging.StreamHandler(sys.stderr)  # the current stderr, whatever replaced it
        handler.setFormatter(_DS_FORMAT)
        handler.handle(record)
        return False


def _deepspeed_logs_to_stderr() -> None:
    # A filter on the logger object survives DeepSpeed's own set-up (it only adds a handler), so
    # this works before and after deepspeed is imported, without importing it.
    ds = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _ToStderr) for f in ds.filters):
        ds.addFilter(_ToStderr())


def _tqdm_terminal_only() -> None:
    """Every tqdm bar made from now on in this process draws only when its stream is a terminal.
    tqdm's own ``disable=None`` means that, but callers (libraries, icu.loop) pass ``disable=False``."""
    from tqdm import std

    if getattr(std.tqdm, "_icu_terminal_only", False):
        return
    original = std.tqdm.__init__

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        stream = kwargs.get("file") or (args[4] if len(args) > 4 else None)
        if not is_terminal(stream):
            if len(args) > 10:  # disable given positionally (the 11th parameter)
                args = (*args[:10], True, *args[11:])
            else:
                kwargs["disable"] = True
        original(self, *args, **kwargs)

    std.tqdm.__init__ = __init__
    std.tqdm._icu_terminal_only = True
