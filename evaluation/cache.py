"""The JSONL answer cache: one line per judged (target, policy), appended as answers arrive.

A key is ``(target id, policy, fingerprint)``; the fingerprint hashes exactly what was asked
(prompt, model, parameters), so a changed question is asked again instead of reusing an
answer to a different one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, Any

from evaluation.errors import JudgeError

CACHE_NAME = "judgments.jsonl"

Key = tuple[str, str, str]


def default_cache_path(results_path: str | Path) -> Path:
    return Path(results_path).parent / CACHE_NAME


def read_cache(path: str | Path) -> tuple[dict[Key, dict[str, Any]], int]:
    """Load ``{(id, policy, fingerprint): record}`` and the number of unreadable lines.

    Unreadable lines (typically a line torn by a killed run) are skipped, not fatal; for a
    repeated key the last record wins.
    """
    records: dict[Key, dict[str, Any]] = {}
    bad = 0
    path = Path(path)
    if not path.exists():
        return records, 0
    with path.open("rb") as fh:
        for raw in fh:
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
                key = (str(rec["id"]), str(rec["policy"]), str(rec["fingerprint"]))
            except (ValueError, KeyError, TypeError):
                bad += 1
                continue
            if isinstance(rec, dict):
                records[key] = rec
    return records, bad


class CacheWriter:
    """Append-only JSONL writer; each line is flushed and fsynced before we count it as done.

    A cache file this writer created is removed again on close if no answer was written, so a
    run that sent nothing (or got nothing back) leaves no empty ``judgments.jsonl`` behind.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._created = not self.path.exists()
        self._written = 0
        self._fh: IO[bytes] = self.path.open("a+b")
        self._lock_exclusive()
        # A killed run may have left a torn last line without a newline; the first record we
        # write then starts on a fresh line so it is not glued onto the fragment (which stays,
        # and is skipped when reading). Nothing is written before there is an answer, so a
        # run that fails early leaves the file byte-for-byte as it was.
        self._fh.seek(0, os.SEEK_END)
        self._needs_newline = False
        if self._fh.tell() > 0:
            self._fh.seek(-1, os.SEEK_END)
            self._needs_newline = self._fh.read(1) != b"\n"

    def _lock_exclusive(self) -> None:
        # Two runs appending to the same cache would judge the same pairs twice.
        try:
            import fcntl
        except ImportError:  # not on POSIX: go without the guard
            return
        try:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._fh.close()
            self._created = False  # the other run's file: never ours to remove
            raise JudgeError(f"cache {self.path} is in use by another running judge") from None

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        if self._needs_newline:
            line = "\n" + line
            self._needs_newline = False
        self._fh.seek(0, os.SEEK_END)
        self._fh.write(line.encode("utf-8"))
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._written += 1

    def close(self) -> None:
        if self._fh.closed:
            return
        if self._created and self._written == 0:
            self.path.unlink(missing_ok=True)  # still under our lock: nobody else is using it
        self._fh.close()

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
