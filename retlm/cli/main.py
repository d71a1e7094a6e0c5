"""The `retlm` command line: one tool, one subcommand per workflow.

Each subcommand lives in a module of this package that exposes ``register(subparsers)``.
``register`` adds its parser(s) and sets ``func`` (a callable taking the parsed
``argparse.Namespace`` and returning an exit code or None).

Conventions every subcommand gets from here:
- ``--config FILE.yaml``: a yaml mapping whose keys are the subcommand's option names
  (dashes or underscores); values there become defaults that the command line overrides.
- ``--debug``: show the full traceback of a failure.
- Exit codes: 0 success, 2 bad usage (argparse, or ``retlm.errors.OptionError`` from the CLI or the
  library: every option is checked before a command's first step), 1 failure with a one-line reason on
  stderr (a corrupted file, too little disk or memory, a database locked by another writer, ...).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from retlm.errors import OptionError
from retlm.utils import deprecated_aliases

__getattr__ = deprecated_aliases(__name__, {"UsageError": "retlm.errors.OptionError"})
# Modules that contribute subcommands, in the order `retlm --help` lists them.
SUBCOMMAND_MODULES = (
    "retlm.cli.db",  # build-db, search, db-info
    "retlm.cli.train",  # train, eval
    "retlm.cli.retrofit",  # retrofit
    "retlm.cli.generate",  # generate
    "retlm.cli.serve",  # serve
    "retlm.cli.demo",  # demo
)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` once: not for options whose help already says what the default is, nor
    for switches and unset (None) defaults."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or action.default is None or action.nargs == 0:
            return text
        return super()._get_help_string(action)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE.yaml",
        help="yaml file of option defaults for this command (keys are option names)",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on failure")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="retlm",
        description="RETRO and RetNet language models: build a retrieval database from a folder of "
        "text, train, evaluate and generate with retrieval.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:  # that workflow is not installed in this build
                continue
            raise
        before = set(subparsers.choices)
        module.register(subparsers)
        for added in set(subparsers.choices) - before:
            _add_common(subparsers.choices[added])
            subparsers.choices[added].formatter_class = HelpFormatter
    return parser


def _version() -> str:
    from retlm import __version__

    return __version__


def _apply_config(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """Parse once to find --config, load its defaults into the subparser, parse again.

    Config values are converted and checked like command-line values of the same options (type,
    arity, choices; see ``retlm.options``)."""
    from retlm.options import check_utf8, config_defaults, read_config

    try:
        check_utf8(argv)
    except OptionError as err:
        parser.error(str(err))
    args = parser.parse_args(argv)
    if args.config is None:
        return args
    sub = parser._subparsers._group_actions[0].choices[args.command]  # type: ignore[union-attr]
    try:
        defaults = config_defaults(sub, args.command, read_config(args.config))
    except OptionError as err:
        sub.error(str(err))
    sub.set_defaults(**defaults)
    return parser.parse_args(argv)


@contextlib.contextmanager
def _quiet_progress(args: argparse.Namespace) -> Iterator[None]:
    """``--no-progress`` also silences transformers' own bars ("Loading weights", ...) for the command."""
    if not getattr(args, "no_progress", False):
        yield
        return
    from retlm.models.folders import quiet_hf_progress

    with quiet_hf_progress():
        yield


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _apply_config(parser, argv)
    try:
        with _quiet_progress(args):
            code = args.func(args)
    except OptionError as err:
        if args.debug:
            raise
        parser.exit(2, f"retlm {args.command}: error: {one_line(err)}\n")
    except KeyboardInterrupt:
        print(f"retlm {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a failure: one line, unless --debug
        if args.debug:
            raise
        print(f"retlm {args.command}: error: {one_line(err)}", file=sys.stderr)
        return 1
    return int(code or 0)


def one_line(err: BaseException) -> str:
    """An exception as one line: its message with newlines folded, or its type if it has none."""
    text = " ".join(str(err).split())
    if isinstance(err, MemoryError | KeyError) or not text:
        return f"{type(err).__name__}{': ' + text if text else ''}"
    return text


if __name__ == "__main__":
    sys.exit(main())
