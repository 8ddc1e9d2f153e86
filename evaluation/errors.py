"""The three ways a judging run ends early, each with its own exit code in the CLIs."""

from __future__ import annotations


class InputError(Exception):
    """A problem with the user's inputs or flags, reported as one line and exit code 2."""


class JudgeError(Exception):
    """The run cannot go on (bad key, unreachable server, refused request): exit code 2."""


class GaveUpError(Exception):
    """Retries were exhausted on a transient error (429/5xx): exit code 1, rerun to resume."""
