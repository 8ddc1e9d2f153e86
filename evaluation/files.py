"""Writing an output file whole: a temporary file beside it, then one rename.

Every output of ``evaluation/`` (results.json, the summary CSV) goes through here, so all of
them get the same permissions as the append-only cache: the umask's default for a new file
(``tempfile.mkstemp`` would make them private, 0600, unlike everything else).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from evaluation.errors import InputError


def check_output_file(path: str | Path, flag: str) -> Path:
    """Refuse an output path that is a folder (or sits under a file) before any work is done."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{flag} {path} is a folder; give a file path such as {path / 'results.json'}")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise InputError(f"{flag} {path}: {parent} is a file, not a folder; choose another path")
    return path


def write_text_atomic(path: str | Path, text: str, flag: str = "output") -> None:
    """Write ``text`` to ``path`` so that a crash leaves either the old file or the new one."""
    path = check_output_file(path, flag)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # 0o666 & ~umask, exactly what open(path, "w") gives a new file.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise InputError(f"could not write {path}: {exc.strerror or exc}; "
                         "choose a writable folder with free space") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
