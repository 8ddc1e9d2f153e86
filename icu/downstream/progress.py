"""The progress bar of the suite's long loops."""

from __future__ import annotations

from typing import Optional


def progress_bar(iterable, total: int, desc: Optional[str]):
    """``iterable`` with a tqdm bar labelled ``desc``; no bar when ``desc`` is None."""
    if desc is None:
        return iterable
    from tqdm.auto import tqdm

    # disable=None: a bar on a terminal, nothing in a log file or a test.
    return tqdm(iterable, total=total, desc=desc, unit="batch", disable=None, leave=False)
