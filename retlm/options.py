"""Options of the commands: each is one field of a typed dataclass, from which argparse and ``--config``
are derived (``option``, ``add_dataclass_arguments``, ``options_from``); and checks on a command line
before a subcommand runs: ``--config`` values get the same types and choices as the options they set,
and every argument is valid UTF-8.

Both raise ``UsageProblem`` with a one-line message; ``main`` reports it through argparse (exit code 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
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
    return action.option_strings[0] if action.option_strings else action.metavar or action.dest


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
    wanted = [a for a in sub._actions if a.dest not in ("help", "config")]
    actions: dict[str, argparse.Action] = {}
    for action in wanted:  # the first is the flag help shows; a hidden alias shares its dest
        actions.setdefault(action.dest, action)
    spellings = dict(actions)  # a key may also be any of an option's flags: neighbors -> num_neighbors
    for action in wanted:
        for flag in action.option_strings:
            spellings.setdefault(flag.lstrip("-").replace("-", "_"), actions[action.dest])
    defaults: dict[str, Any] = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in spellings:
            known = sorted(actions)
            raise UsageProblem(
                f"--config: unknown option {key!r} for `retlm {command}`{did_you_mean(name, known)} "
                f"(known: {', '.join(known)})"
            )
        action = spellings[name]
        if action.dest in defaults:
            raise UsageProblem(f"--config: {key!r} sets {_flag(action)} a second time")
        defaults[action.dest] = coerce(action, str(key), value)
    return defaults


# ---- options written once: a typed dataclass is the single source of argparse and --config ----
#
# Each field of an options dataclass is one option. Its ``metadata`` (most easily written with
# ``option(...)``) says how the command line spells it; everything else (type, default, whether it is
# required) comes from the field itself:
#   help       the help text (required: `retlm CMD --help` shows every option with help and default)
#   flag       the flag, default ``--field-name``; ``positional=True``: a positional argument instead
#   aliases    other accepted spellings (e.g. ``--neighbours`` for ``--neighbors``), hidden from help
#   choices, metavar, type (argparse ``type`` when the annotation is not enough), group (an argument
#   group title), cli (False: a Python-only keyword)
#   negate     a bool field that defaults to True and is switched off by ``flag`` (``--no-progress``)
#   to_value   converts the parsed value to the field's value (e.g. ``0`` -> None)
# ``--config`` keys are the fields' names (``no_progress`` for a negated one), their flags or any alias,
# with dashes or underscores. ``options_from(args, cls)`` turns the parsed command line back into ``cls``.

OPTION_KEYS = frozenset(
    (
        "help",
        "flag",
        "aliases",
        "choices",
        "metavar",
        "type",
        "group",
        "cli",
        "negate",
        "to_value",
        "positional",
    )
)


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",  # noqa: A002 (argparse's own name)
    *,
    default_factory: Any = dataclasses.MISSING,
    **metadata: Any,
) -> Any:
    """A dataclass field that is also a command-line option (see the block comment above)."""
    unknown = set(metadata) - OPTION_KEYS
    if unknown:
        raise TypeError(f"option(): unknown metadata {sorted(unknown)}; known: {sorted(OPTION_KEYS)}")
    if not help:
        raise TypeError("option(): every option needs help text")
    meta = {"help": help, **metadata}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _base_type(annotation: Any) -> Any:
    """``int | None`` -> ``int``; ``Path`` -> ``Path``; anything else unchanged."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return annotation


def _dest(f: dataclasses.Field) -> str:
    return f"no_{f.name}" if f.metadata.get("negate") else f.name


def cli_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of options dataclass ``cls`` that are command-line options."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True) and "help" in f.metadata]


def add_dataclass_arguments(
    parser: argparse.ArgumentParser, cls: type, *, skip: Sequence[str] = ()
) -> dict[str, argparse.Action]:
    """One argparse option per field of ``cls`` (see ``option``); returns the actions by field name.

    Type, default and ``required`` come from the field; help, flag, aliases, choices and group from
    its metadata. ``skip``: field names the command adds itself (or does not offer)."""
    hints = typing.get_type_hints(cls)
    groups: dict[str, Any] = {}
    actions = {}
    for f in cli_fields(cls):
        if f.name in skip:
            continue
        meta = f.metadata
        target: Any = parser
        if meta.get("group"):
            if meta["group"] not in groups:
                groups[meta["group"]] = parser.add_argument_group(meta["group"])
            target = groups[meta["group"]]
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = (
            None
            if required
            else (f.default if f.default_factory is dataclasses.MISSING else f.default_factory())
        )
        aliases = tuple(meta.get("aliases", ()))
        kwargs: dict[str, Any] = {"help": meta["help"]}
        kind = _base_type(hints[f.name])
        if kind is bool:
            if meta.get("negate"):
                if default is not True:
                    raise TypeError(f"{cls.__name__}.{f.name}: negate needs a default of True")
                kwargs.update(action="store_true", dest=_dest(f))
            else:
                kwargs.update(action="store_true", dest=f.name, default=bool(default))
            flag = meta.get("flag", "--" + _dest(f).replace("_", "-"))
            actions[f.name] = _add_with_hidden_aliases(target, flag, aliases, kwargs)
            continue
        kwargs["type"] = meta.get("type", kind if kind in (int, float, Path) else None)
        for key in ("choices", "metavar"):
            if key in meta:
                kwargs[key] = meta[key]
        flag = meta.get("flag", "--" + f.name.replace("_", "-"))
        if "metavar" not in meta and "choices" not in meta and not meta.get("positional"):
            kwargs["metavar"] = flag.lstrip("-").replace("-", "_").upper()  # --neighbors NEIGHBORS
        if meta.get("positional"):
            actions[f.name] = target.add_argument(f.name, **kwargs)
            continue
        kwargs.update(dest=f.name, default=default)
        if required:
            kwargs["required"] = True
        actions[f.name] = _add_with_hidden_aliases(target, flag, aliases, kwargs)
    return actions


def _add_with_hidden_aliases(
    target: Any, flag: str, aliases: tuple[str, ...], kwargs: dict[str, Any]
) -> argparse.Action:
    """The flag as help shows it, and each older spelling as an argument of its own that help hides
    (same destination; no default of its own, so the flag's default stands)."""
    action = target.add_argument(flag, **kwargs)
    if aliases:
        hidden = {**kwargs, "help": argparse.SUPPRESS, "default": argparse.SUPPRESS, "required": False}
        target.add_argument(*aliases, **hidden)
    return action


def options_from(args: argparse.Namespace, cls: type, **overrides: Any) -> Any:
    """The ``cls`` instance that the parsed command line (``--config`` included) describes.

    Fields the parser does not carry keep their dataclass defaults; ``overrides`` win over both."""
    return cls(**option_values(args, cls), **overrides)


def option_values(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The values, by field name, that the parsed command line gives the fields of ``cls`` (converted
    by each field's ``to_value``), without building ``cls``: a command may complete them first."""
    values: dict[str, Any] = {}
    for f in cli_fields(cls):
        if not hasattr(args, _dest(f)):
            continue
        value = getattr(args, _dest(f))
        if f.metadata.get("negate"):
            value = not value
        convert = f.metadata.get("to_value")
        values[f.name] = convert(value) if convert is not None else value
    return values


def zero_is_none(value: Any) -> Any:
    """``to_value`` of options whose command line says 0 for "none" (``--eval-sequences 0``: all)."""
    return None if value == 0 else value
