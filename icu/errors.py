"""The one exception type that means "the user gave us something we cannot use".

Scripts catch it at the top, print its message on one line to stderr and exit with code 2, so
every bad-input path looks the same to a user and to a test.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

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
