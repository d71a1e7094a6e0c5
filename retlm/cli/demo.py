"""`retlm demo`: build a database, train, evaluate and generate, end to end, on a CPU."""

from __future__ import annotations

import argparse

from retlm.options import add_dataclass_arguments, options_from

DESCRIPTION = (
    "The whole retlm workflow in one command, on the bundled corpus (the English documentation shipped "
    "with Python: pydoc topics and standard-library docstrings) or on --corpus DIR: (1) build the "
    "retrieval database (GPT-2 byte-level BPE tokens by default), (2) train a small RETRO with a RetNet "
    "decoder on ~90% of the documents within --minutes, (3) evaluate held-out perplexity and bits per byte "
    "with and without retrieval, (4) generate from the first chunk of --num-prompts held-out documents (or "
    "--prompt), retrieving at chunk boundaries, and show each neighbor read with its source document, "
    "(5) write loss.png and report.json into --work-dir. A second run reuses what the first finished; a "
    "killed run resumes."
)


def register(subparsers: argparse._SubParsersAction) -> None:
    from retlm.demo import DemoOptions

    parser = subparsers.add_parser(
        "demo",
        help="end-to-end demo: database, SmolLM2 reading retrieved passages, a RETRO trained from scratch",
        description=DESCRIPTION,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_dataclass_arguments(parser, DemoOptions)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from retlm.demo import DemoOptions, run_demo

    run_demo(options_from(args, DemoOptions))  # DemoOptions.validate() checks every option first
    return 0
