"""Error types that say who is at fault, shared by the library and the command line.

- ``OptionError``: an option or argument has a value the operation cannot accept (a usage error: the
  CLI reports it in one line with exit code 2). It is a ``ValueError``, so library callers that catch
  ``ValueError`` keep working.
- ``ResourceError``: the operation would need more disk or memory than is free; raised before any
  work, quoting the figures (exit code 1).

``closest`` and ``did_you_mean`` turn a misspelt key into a suggestion.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class OptionError(ValueError):
    """A bad option value or argument: the caller's mistake, reported before any work starts."""


class ResourceError(RuntimeError):
    """The work would need more disk space or memory than is available (the message gives both)."""


def closest(word: str, choices: Iterable[str]) -> str | None:
    """The choice most similar to ``word`` (difflib ratio >= 0.6, case-insensitive), or None."""
    choices = list(choices)
    lowered = {c.lower(): c for c in choices}
    found = difflib.get_close_matches(str(word).lower(), list(lowered), n=1, cutoff=0.6)
    return lowered[found[0]] if found else None


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` when a choice is close to ``word``, else ``""``."""
    best = closest(word, choices)
    return f"; did you mean {best!r}?" if best is not None else ""


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``: sizes in messages, binary units."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(value) < 1024 or unit == "PiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
