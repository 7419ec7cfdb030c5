"""User-facing errors: one line that names the bad value and the allowed ones."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class EvomergeError(ValueError):
    """Bad input from the user (config, files, names). The CLI prints it on one line and exits 2."""


def unknown(kind: str, name: object, allowed: Iterable[str]) -> EvomergeError:
    """An error for a name that is not one of ``allowed``, with a "did you mean" hint."""
    allowed = sorted(allowed)
    close = difflib.get_close_matches(str(name), allowed, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return EvomergeError(f"unknown {kind} {name!r}{hint}; available: {', '.join(allowed)}")
