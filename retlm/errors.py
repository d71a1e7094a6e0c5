"""Error types that say who is at fault, shared by the library and the command line.

- ``OptionError``: an option or argument has a value the operation cannot accept (a usage error: the
  CLI reports it in one line with exit code 2). It is a ``ValueError``, so library callers that catch
  ``ValueError`` keep working.
- ``ResourceError``: the operation would need more disk or memory than is free; raised before any
  work, quoting the figures (exit code 1).

``closest`` and ``did_you_mean`` turn a misspelt key into a suggestion; ``short_repr`` shows a value in
a message, cut short; ``check_int`` and ``check_number`` are the range checks of options.
"""

from __future__ import annotations

import difflib
import math
import reprlib
from collections.abc import Iterable
from typing import Any


class OptionError(ValueError):
    """A bad option value or argument: the caller's mistake, reported before any work starts."""


class _ShortRepr(reprlib.Repr):
    """``reprlib.Repr`` that also bounds integers before converting them (a 10,000-digit integer is
    refused by ``repr`` itself)."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxstring, self.maxother, self.maxlong = 2, 60, 60, 40
        self.maxlist = self.maxtuple = self.maxdict = self.maxset = self.maxfrozenset = 4

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 128:
            return f"<an integer of {x.bit_length()} bits>"
        return super().repr_int(x, level)


_SHORT = _ShortRepr()


def short_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)`` for an error message, at most ``limit`` characters: long strings and big or deep
    structures (a YAML alias bomb included) are cut short at a cost bounded by ``limit``, not by the
    value's size."""
    text = _SHORT.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_int(name: str, value: Any, low: int = 1) -> None:
    """Refuse ``value`` unless it is an integer >= ``low`` (``bool`` is not an integer here)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        kind = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise OptionError(f"{name} must be {kind}, got {short_repr(value)}")


def check_number(name: str, value: Any) -> None:
    """Refuse ``value`` unless it is a finite number > 0 (``bool`` is not a number here)."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value <= 0:
        raise OptionError(f"{name} must be a positive number, got {short_repr(value)}")


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
