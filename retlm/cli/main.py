"""The `retlm` command line: one tool, one subcommand per workflow.

Each subcommand lives in a module of this package that exposes ``register(subparsers)``.
``register`` adds its parser(s) and sets ``func`` (a callable taking the parsed
``argparse.Namespace`` and returning an exit code or None).

Conventions every subcommand gets from here:
- ``--config FILE.yaml``: a yaml mapping whose keys are the subcommand's option names
  (dashes or underscores); values there become defaults that the command line overrides.
- ``--debug``: show the full traceback of a failure.
- Exit codes: 0 success, 2 bad usage (argparse), 1 failure with a one-line reason on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

# Modules that contribute subcommands, in the order `retlm --help` lists them.
SUBCOMMAND_MODULES = (
    "retlm.cli.db",  # build-db, search, db-info
    "retlm.cli.train",  # train, eval
    "retlm.cli.retrofit",  # retrofit
    "retlm.cli.generate",  # generate
    "retlm.cli.demo",  # demo
)


class UsageError(Exception):
    """A user mistake in how a command was called: reported as usage, exit code 2."""


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None, metavar="FILE.yaml",
                        help="yaml file of option defaults for this command (keys are option names)")
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
    return parser


def _version() -> str:
    from retlm import __version__

    return __version__


def _apply_config(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """Parse once to find --config, load its defaults into the subparser, parse again."""
    args = parser.parse_args(argv)
    if args.config is None:
        return args
    if not args.config.is_file():
        parser.error(f"--config: no such file: {args.config}")
    try:
        values = yaml.safe_load(args.config.read_text()) or {}
    except yaml.YAMLError as err:
        parser.error(f"--config: {args.config} is not valid yaml: {err}")
    if not isinstance(values, dict):
        parser.error(f"--config: {args.config} must hold a mapping of option names to values")
    sub = parser._subparsers._group_actions[0].choices[args.command]  # type: ignore[union-attr]
    known = {a.dest for a in sub._actions}
    defaults = {}
    for key, value in values.items():
        dest = str(key).replace("-", "_")
        if dest not in known:
            parser.error(f"--config: unknown option {key!r} for `retlm {args.command}`; "
                         f"known: {', '.join(sorted(k for k in known if k != 'help'))}")
        defaults[dest] = value
    sub.set_defaults(**defaults)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _apply_config(parser, argv)
    try:
        code = args.func(args)
    except UsageError as err:
        if args.debug:
            raise
        parser.exit(2, f"retlm {args.command}: error: {err}\n")
    except KeyboardInterrupt:
        print(f"retlm {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a failure: one line, unless --debug
        if args.debug:
            raise
        print(f"retlm {args.command}: error: {err}", file=sys.stderr)
        return 1
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
