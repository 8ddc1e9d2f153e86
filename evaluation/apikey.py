"""The judge's API key: read from the environment, kept out of every message we print."""

from __future__ import annotations

import os

from evaluation.errors import InputError

DEFAULT_KEY_ENV = "OPENAI_API_KEY"
# A key shorter than this is a placeholder for a local server ("x", "none", "ollama"), not a
# secret; masking it would garble messages ("x" inside every word), so it is left alone.
MIN_MASKED_KEY_LEN = 8


def get_api_key(env_name: str = DEFAULT_KEY_ENV) -> str:
    """Read the key from the environment; it is never printed or written anywhere."""
    key = os.environ.get(env_name, "")
    if not key.strip():
        raise InputError(
            f"environment variable {env_name} is not set; export your API key there "
            f"(for a local server that needs no key, any dummy value will do)"
        )
    return key.strip()


def redact(text: str, key: str | None) -> str:
    """``text`` with every occurrence of a real key replaced by ``***``.

    Servers sometimes echo the key back in 401 messages; keep it out of our output.
    """
    if key and len(key) >= MIN_MASKED_KEY_LEN:
        text = text.replace(key, "***")
    return text
