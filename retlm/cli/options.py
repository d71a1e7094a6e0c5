"""Checks on a command line before a subcommand runs: ``--config`` values get the same types and choices
as the options they set, and every argument is valid UTF-8.

Both raise ``UsageProblem`` with a one-line message; ``main`` reports it through argparse (exit code 2).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from retlm.errors import did_you_mean


class UsageProblem(ValueError):
    """A bad ``--config`` file or a bad argument, found before the command runs."""


def check_utf8(argv: Sequence[str]) -> None:
    """Refuse arguments that are not valid UTF-8 (the OS hands them over with surrogate escapes)."""
    for i, arg in enumerate(argv, 1):
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            shown = arg.encode("utf-8", "surrogateescape")[:40]
            raise UsageProblem(f"argument {i} is not valid UTF-8 text: {shown!r}") from None


def read_config(path: Path) -> dict[str, Any]:
    """The mapping of a ``--config`` yaml file (one-line errors for a missing, binary or bad file)."""
    if not path.is_file():
        raise UsageProblem(f"--config: no such file: {path}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise UsageProblem(f"--config: {path} is not a UTF-8 text file (binary?)") from None
    except OSError as err:
        raise UsageProblem(f"--config: cannot read {path}: {err.strerror or err}") from None
    if "\x00" in text:
        raise UsageProblem(f"--config: {path} is not a text file (it holds NUL bytes)")
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as err:
        reason = " ".join(str(err).split())
        raise UsageProblem(f"--config: {path} is not valid yaml: {reason}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UsageProblem(f"--config: {path} must hold a mapping of option names to values")
    return values


def _flag(action: argparse.Action) -> str:
    return action.option_strings[-1] if action.option_strings else action.metavar or action.dest


def _scalar(action: argparse.Action, key: str, value: Any) -> Any:
    """One config value converted as argparse converts a command-line string for ``action``."""
    name = f"--config: {key!r} ({_flag(action)})"
    if isinstance(value, list | dict | tuple | set):
        raise UsageProblem(f"{name} takes a single value, got {value!r}")
    kind = action.type
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise UsageProblem(f"{name} must be an integer, got {value!r}")
        try:
            value = int(value)
        except ValueError:
            raise UsageProblem(f"{name} must be an integer, got {value!r}") from None
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise UsageProblem(f"{name} must be a number, got {value!r}")
        try:
            value = float(value)
        except ValueError:
            raise UsageProblem(f"{name} must be a number, got {value!r}") from None
    else:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise UsageProblem(f"{name} must be a string, got {value!r}")
        value = str(value)
        if kind is not None:
            try:
                value = kind(value)
            except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
                raise UsageProblem(f"{name}: {err}") from None
    if action.choices is not None and value not in action.choices:
        choices = [str(c) for c in action.choices]
        raise UsageProblem(
            f"{name} must be one of {', '.join(choices)}, got {value!r}{did_you_mean(str(value), choices)}"
        )
    return value


def coerce(action: argparse.Action, key: str, value: Any) -> Any:
    """A ``--config`` value for ``action``, with the type, arity and choices of the option it sets."""
    if action.nargs == 0:  # store_true / store_false
        if not isinstance(value, bool):
            raise UsageProblem(
                f"--config: {key!r} ({_flag(action)}) is a switch (true or false), got {value!r}"
            )
        return value
    if value is None:
        if action.required or action.default is not None:
            raise UsageProblem(f"--config: {key!r} ({_flag(action)}) needs a value, got null")
        return None
    if action.nargs in ("+", "*"):
        items = value if isinstance(value, list) else [value]
        if not items and action.nargs == "+":
            raise UsageProblem(f"--config: {key!r} ({_flag(action)}) needs at least one value")
        return [_scalar(action, key, item) for item in items]
    return _scalar(action, key, value)


def config_defaults(sub: argparse.ArgumentParser, command: str, values: dict[str, Any]) -> dict[str, Any]:
    """``--config`` values, by option ``dest``, checked against the subcommand's options."""
    actions = {a.dest: a for a in sub._actions if a.dest not in ("help", "config")}
    defaults = {}
    for key, value in values.items():
        dest = str(key).replace("-", "_")
        if dest not in actions:
            known = sorted(actions)
            raise UsageProblem(
                f"--config: unknown option {key!r} for `retlm {command}`{did_you_mean(dest, known)} "
                f"(known: {', '.join(known)})"
            )
        defaults[dest] = coerce(actions[dest], str(key), value)
    return defaults
