"""Replacing a split's output files as one unit, so a full disk or a kill never leaves a split
half old and half new (for example a rewritten ``unlearn/`` beside the old ``learn/``).

data_prep writes a split's new files into ``{split}/.staging-build/`` (any failure removes
it: the old files were never touched). Once complete, that folder is renamed to
``{split}/.staging-ready/`` (one atomic rename: the commit point), then each entry moves into
``{split}/``, the entry it replaces going to ``{split}/.staging-retired/`` first. A kill during
those moves leaves ``.staging-ready/`` behind; :func:`finish_swap` (run by the next data_prep,
and by nothing that only reads) completes the moves, and :func:`check_no_pending_swap` lets
readers refuse such a split instead of loading a mixture.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from typing import Iterator

from .errors import IcuError

BUILD = ".staging-build"  # being written; incomplete until renamed to READY
READY = ".staging-ready"  # complete new files, some possibly not yet moved into place
RETIRED = ".staging-retired"  # replaced files, deleted once the swap is done


def pending_swap(split_dir: str) -> bool:
    """True when a complete new build is waiting (a swap was interrupted)."""
    return os.path.isdir(os.path.join(split_dir, READY))


def check_no_pending_swap(split_dir: str) -> None:
    """Refuse a split whose files are partly old and partly new."""
    if pending_swap(split_dir):
        raise IcuError(
            f"{split_dir}: data_prep.py was interrupted while replacing this split's files; "
            f"rerun data_prep.py for it (or move {os.path.join(split_dir, READY)}'s entries into "
            f"{split_dir} by hand)"
        )


def _replace_entry(src: str, dst: str, retired: str) -> None:
    """Move ``src`` to ``dst``; an existing ``dst`` goes to ``retired`` first (a rename)."""
    if os.path.lexists(dst):
        old = os.path.join(retired, os.path.basename(dst))
        if os.path.lexists(old):  # left by an earlier interrupted swap
            _remove(old)
        os.rename(dst, old)
    os.rename(src, dst)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def finish_swap(split_dir: str) -> bool:
    """Complete an interrupted swap (if any) and remove leftovers; True when one was completed.
    Idempotent: a kill inside this function is recovered by calling it again."""
    ready = os.path.join(split_dir, READY)
    retired = os.path.join(split_dir, RETIRED)
    finished = os.path.isdir(ready)
    if finished:
        os.makedirs(retired, exist_ok=True)
        for name in sorted(os.listdir(ready)):
            _replace_entry(os.path.join(ready, name), os.path.join(split_dir, name), retired)
        os.rmdir(ready)
    _remove(retired)
    _remove(os.path.join(split_dir, BUILD))  # an unfinished build: never committed
    return finished


@contextlib.contextmanager
def staged_folder(split_dir: str) -> Iterator[str]:
    """Yield an empty folder to write a split's new files into; on a clean exit its entries
    replace those of the same name in ``split_dir`` (other entries there are kept). On an
    exception the new files are deleted and ``split_dir`` is unchanged."""
    finish_swap(split_dir)
    build = os.path.join(split_dir, BUILD)
    os.makedirs(build)
    try:
        yield build
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    os.rename(build, os.path.join(split_dir, READY))
    finish_swap(split_dir)
