"""Options of the commands: each is one field of a typed dataclass, from which argparse and ``--config``
are derived (``option``, ``add_dataclass_arguments``, ``options_from``); and checks on a command line
before a subcommand runs: ``--config`` values get the same types and choices as the options they set,
and every argument is valid UTF-8.

Both raise ``retlm.errors.OptionError`` with a one-line message; ``main`` reports it through argparse
(exit code 2). Messages show values through ``short_repr`` (cut short), and a ``--config`` file is refused
above ``MAX_CONFIG_BYTES`` before it is parsed, by a YAML loader without anchors and aliases.
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

from retlm.errors import OptionError, did_you_mean, short_repr
from retlm.utils import deprecated_aliases

__getattr__ = deprecated_aliases(__name__, {"UsageProblem": "retlm.errors.OptionError"})

MAX_CONFIG_BYTES = 1 << 20  # a --config file is a page of options, not data


class _ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` without anchors and aliases: an alias is a reference, and a few nested ones
    (the "billion laughs") make a structure whose size is exponential in the file's."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.YAMLError(f"aliases (*name) are not accepted, line {mark.line + 1}")
        return super().compose_node(parent, index)


def check_utf8(argv: Sequence[str]) -> None:
    """Refuse arguments that are not valid UTF-8 (the OS hands them over with surrogate escapes)."""
    for i, arg in enumerate(argv, 1):
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            shown = arg.encode("utf-8", "surrogateescape")[:40]
            raise OptionError(f"argument {i} is not valid UTF-8 text: {shown!r}") from None


def load_yaml(path: Path, what: str) -> Any:
    """The yaml document in ``path``, read at a cost its size predicts: a file over ``MAX_CONFIG_BYTES``
    is refused before it is read, and anchors/aliases are refused (``_ConfigLoader``). ``what`` names
    the file in the one-line ``OptionError``s (``"--config"``, ``"model config"``)."""
    path = Path(path)
    if not path.is_file():
        raise OptionError(f"{what}: no such file: {path}")
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise OptionError(f"{what}: {path} holds {size} bytes; at most {MAX_CONFIG_BYTES} are read")
        with path.open("rb") as file:  # the file may grow between stat and read
            text = file.read(MAX_CONFIG_BYTES + 1)[:MAX_CONFIG_BYTES].decode("utf-8")
    except UnicodeDecodeError:
        raise OptionError(f"{what}: {path} is not a UTF-8 text file (binary?)") from None
    except OSError as err:
        raise OptionError(f"{what}: cannot read {path}: {err.strerror or err}") from None
    if "\x00" in text:
        raise OptionError(f"{what}: {path} is not a text file (it holds NUL bytes)")
    try:
        return yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 (a SafeLoader without aliases)
    except (yaml.YAMLError, ValueError) as err:  # ValueError: an integer of over 4300 digits
        reason = " ".join(str(err).split())
        reason = reason if len(reason) <= 200 else reason[:197] + "..."
        raise OptionError(f"{what}: {path} is not valid yaml: {reason}") from None


def read_config(path: Path) -> dict[str, Any]:
    """The mapping of a ``--config`` yaml file (one-line errors for a missing, big, binary or bad file)."""
    values = load_yaml(path, "--config")
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise OptionError(f"--config: {path} must hold a mapping of option names to values")
    return values


def _flag(action: argparse.Action) -> str:
    return action.option_strings[0] if action.option_strings else action.metavar or action.dest


def _scalar(action: argparse.Action, key: str, value: Any) -> Any:
    """One config value converted as argparse converts a command-line string for ``action``."""
    name = f"--config: {short_repr(key)} ({_flag(action)})"
    if isinstance(value, list | dict | tuple | set):
        raise OptionError(f"{name} takes a single value, got {short_repr(value)}")
    kind = action.type
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise OptionError(f"{name} must be an integer, got {short_repr(value)}")
        try:
            value = int(value)
        except ValueError:
            raise OptionError(f"{name} must be an integer, got {short_repr(value)}") from None
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise OptionError(f"{name} must be a number, got {short_repr(value)}")
        try:
            value = float(value)
        except ValueError:
            raise OptionError(f"{name} must be a number, got {short_repr(value)}") from None
    else:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise OptionError(f"{name} must be a string, got {short_repr(value)}")
        value = str(value)
        if kind is not None:
            try:
                value = kind(value)
            except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
                raise OptionError(f"{name}: {err}") from None
    if action.choices is not None and value not in action.choices:
        choices = [str(c) for c in action.choices]
        hint = did_you_mean(str(value)[:100], choices)
        raise OptionError(f"{name} must be one of {', '.join(choices)}, got {short_repr(value)}{hint}")
    return value


def coerce(action: argparse.Action, key: str, value: Any) -> Any:
    """A ``--config`` value for ``action``, with the type, arity and choices of the option it sets."""
    if action.nargs == 0:  # store_true / store_false
        if not isinstance(value, bool):
            name = f"--config: {short_repr(key)} ({_flag(action)})"
            raise OptionError(f"{name} is a switch (true or false), got {short_repr(value)}")
        return value
    if value is None:
        if action.required or action.default is not None:
            raise OptionError(f"--config: {short_repr(key)} ({_flag(action)}) needs a value, got null")
        return None
    if action.nargs in ("+", "*"):
        items = value if isinstance(value, list) else [value]
        if not items and action.nargs == "+":
            raise OptionError(f"--config: {short_repr(key)} ({_flag(action)}) needs at least one value")
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
            hint = did_you_mean(name[:100], known)
            raise OptionError(
                f"--config: unknown option {short_repr(key)} for `retlm {command}`{hint} "
                f"(known: {', '.join(known)})"
            )
        action = spellings[name]
        if action.dest in defaults:
            raise OptionError(f"--config: {short_repr(key)} sets {_flag(action)} a second time")
        defaults[action.dest] = coerce(action, str(key), value)
    return defaults


# ---- options written once: a typed dataclass is the single source of argparse and --config ----
#
# Each field of an options dataclass is one option. Its ``metadata`` (most easily written with
# ``option(...)``) says how the command line spells it; everything else (type, default, whether it is
# required) comes from the field itself:
#   help       the help text (required: `retlm CMD --help` shows every option with help and default)
#   flag       the flag, default ``--field-name``; ``positional=True``: a positional argument instead
#   aliases    other accepted spellings of the flag (a former name), hidden from help
#   choices, metavar, nargs, type (argparse ``type`` when the annotation is not enough), group (an
#   argument group title), cli (False: a Python-only keyword)
#   negate     a bool field that defaults to True and is switched off by ``flag`` (``--no-progress``)
#   to_value   converts the parsed value to the field's value (e.g. ``0`` -> None)
# ``--config`` keys are the fields' names (``no_progress`` for a negated one), their flags or any alias,
# with dashes or underscores. ``options_from(args, cls)`` turns the parsed command line back into ``cls``.
# ``option_from(cls, name, ...)``: another command's option of the same meaning (its own default, maybe).

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
        "nargs",
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


def option_from(
    cls: type,
    name: str,
    default: Any = dataclasses.MISSING,
    help: str | None = None,  # noqa: A002 (argparse's own name)
    **metadata: Any,
) -> Any:
    """Option ``name`` of options dataclass ``cls`` offered by another command: a field with the same
    metadata (help, flag, aliases, choices, ...) and default, but for what is given here (``default``,
    ``help``, any other metadata key). The other command's option then has one home, ``cls``'s field."""
    source = {f.name: f for f in dataclasses.fields(cls)}[name]
    meta = {**source.metadata, **metadata}
    meta["help"] = help if help is not None else meta["help"]
    if default is dataclasses.MISSING and source.default_factory is not dataclasses.MISSING:
        return option(default_factory=source.default_factory, **meta)
    return option(source.default if default is dataclasses.MISSING else default, **meta)


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
    its metadata. The options outside a group come first, then each group's, in field order.
    ``skip``: field names the command adds itself (or does not offer)."""
    hints = typing.get_type_hints(cls)
    groups: dict[str, Any] = {}
    actions = {}
    # the options outside a group first (a base class's grouped fields come first in its fields)
    for f in sorted(cli_fields(cls), key=lambda f: bool(f.metadata.get("group"))):
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
        for key in ("choices", "metavar", "nargs"):
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


def flag_of(cls: type, name: str) -> str:
    """How the command line spells field ``name`` of options dataclass ``cls`` (``num_neighbors`` ->
    ``--neighbors``; a positional: its metavar), for messages."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    if f.metadata.get("positional"):
        return f.metadata.get("metavar", name.upper())
    return f.metadata.get("flag", "--" + _dest(f).replace("_", "-"))


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
