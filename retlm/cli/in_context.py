"""`retlm eval MODEL --db DB --in-context` and `retlm generate MODEL PROMPT --db DB --in-context`:
In-Context RALM for any causal LM (the library side: :mod:`retlm.generation.in_context` and
:mod:`retlm.training.in_context`).

The options live in ``EvalOptions`` (``retlm.cli.train``) and ``GenerateOptions``
(``retlm.cli.generate``), which derive their shared in-context ones from ``InContextOptions``; this module
loads the LM and prints. Heavy imports happen inside functions.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from retlm.errors import OptionError, check_int
from retlm.options import flag_of, option

IN_CONTEXT = "in-context retrieval (--in-context: MODEL is any causal LM)"
DEFAULT_STRIDE = 32
DEFAULT_QUERY_TOKENS = 32
DEFAULT_NEIGHBORS = 2
DEFAULT_HELDOUT_FRACTION = 0.1


def load_causal_lm(name: str | Path, *, dtype: Any = None, device: Any = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a causal LM named as :func:`retlm.pretrained_path` takes it
    (``smollm2-135m``, a folder, a run directory, a .gguf file, a Hub name); an unknown one is a usage
    error."""
    from retlm.models.pretrained import load_causal_lm as load

    try:
        return load(str(name), dtype=dtype, device=device)
    except FileNotFoundError as err:
        raise OptionError(f"MODEL: {err}") from None


@dataclass(kw_only=True)
class InContextOptions:
    """The in-context retrieval options that `retlm eval` and `retlm generate` share (each command's
    options class derives from this one and may add its own to ``IN_CONTEXT_ONLY``)."""

    IN_CONTEXT_ONLY: ClassVar[tuple[str, ...]] = ("stride", "query_tokens")

    in_context: bool = option(
        False,
        group=IN_CONTEXT,
        help="In-Context RALM: MODEL is any causal LM; the neighbors' text goes in front of its context",
    )
    stride: int | None = option(
        None, group=IN_CONTEXT, help=f"retrieve every this many tokens (default {DEFAULT_STRIDE})"
    )
    query_tokens: int | None = option(
        None,
        group=IN_CONTEXT,
        help=f"the last this many tokens are the query (default {DEFAULT_QUERY_TOKENS})",
    )

    def validate_in_context(self) -> None:
        """Refuse the ``IN_CONTEXT_ONLY`` options without --in-context, and bad values with it."""
        given = [n for n in self.IN_CONTEXT_ONLY if getattr(self, n) is not None]
        if not self.in_context:
            if given:
                raise OptionError(f"{flag_of(type(self), given[0])} applies to --in-context retrieval only")
            return
        for name in ("stride", "query_tokens", "num_neighbors", "context", "max_tokens"):
            value = getattr(self, name, None)
            if value is not None:
                check_int(flag_of(type(self), name), value)
        fraction = getattr(self, "heldout_fraction", None)
        if fraction is not None and not 0.0 <= fraction < 1.0:
            raise OptionError(f"--heldout-fraction must be in [0, 1), got {fraction}")


def _open(db_path: Path, neighbors: int) -> Any:
    from retlm.retrieval import RetrievalDatabase

    if not Path(db_path).exists():
        raise OptionError(f"--db: no retrieval database at {db_path}")
    db = RetrievalDatabase.open(db_path)
    db.check_k(neighbors, "--neighbors")  # before the model is loaded
    return db


def run_eval(opts: Any) -> int:
    """`retlm eval MODEL --db DB --in-context`: the report, as a table or json, and --output (the
    options are checked: ``EvalOptions.validate``)."""
    from retlm.training.in_context import evaluate_in_context
    from retlm.training.in_context_report import format_in_context_table
    from retlm.training.precision import autocast_for, resolve_device, resolve_precision

    device = resolve_device(opts.device)
    precision = resolve_precision(opts.precision, device)
    neighbors = opts.num_neighbors or DEFAULT_NEIGHBORS
    db = _open(opts.db, neighbors)
    model, tokenizer = load_causal_lm(opts.checkpoint, device=device)
    heldout = DEFAULT_HELDOUT_FRACTION if opts.heldout_fraction is None else opts.heldout_fraction
    report = evaluate_in_context(
        model,
        tokenizer,
        db,
        stride=opts.stride or DEFAULT_STRIDE,
        query_tokens=opts.query_tokens or DEFAULT_QUERY_TOKENS,
        num_neighbors=neighbors,
        context=opts.context,
        max_tokens=opts.max_tokens,
        split=opts.split,
        train_fraction=round(1.0 - heldout, 12),  # 0.1 -> 0.9, as `retlm train --train-fraction 0.9`
        seed=opts.seed if opts.seed is not None else 0,
        max_overlap=opts.max_overlap,
        batch_size=opts.batch_size,
        autocast=autocast_for(precision, device),
        progress=opts.progress,
    )
    report.update(model=str(opts.checkpoint), db=str(opts.db), precision=precision)
    print_report(report, opts.output, opts.json, format_in_context_table)
    return 0


def print_report(
    report: dict[str, Any], output: Path | None, as_json: bool, table: Callable[[dict[str, Any]], str]
) -> None:
    """`retlm eval`'s result: written to ``output`` as JSON (atomically) when given, then printed as JSON
    (``--json``) or as ``table(report)``."""
    if output is not None:
        from retlm.utils import write_json

        write_json(output, report, sort_keys=False)
    if as_json:
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        print(table(report))


def run_generate(opts: Any) -> int:
    """`retlm generate MODEL PROMPT --db DB --in-context`: the text, then the sources read (the options
    are checked: ``GenerateOptions.validate``)."""
    from retlm.generation import generate_in_context

    neighbors = opts.num_neighbors or DEFAULT_NEIGHBORS
    db = _open(opts.db, neighbors)
    model, tokenizer = load_causal_lm(opts.checkpoint)
    result = generate_in_context(
        model,
        tokenizer,
        db,
        opts.prompt,
        max_new_tokens=opts.max_new_tokens,
        stride=opts.stride or DEFAULT_STRIDE,
        query_tokens=opts.query_tokens or DEFAULT_QUERY_TOKENS,
        num_neighbors=neighbors,
        **opts.sampling(),
    )
    print(result.text)
    print()
    print_sources(result, opts.show_neighbors)
    return 0


def print_sources(result: Any, show_text: bool = False) -> None:
    """Each retrieval: where it happened, and the documents read (name, score); ``show_text``: also the
    query and each neighbor's text."""
    from retlm.utils import quoted

    print("sources read:")
    if not result.retrievals:
        print("  (no retrieval: nothing was generated)")
    for step in result.retrievals:
        where = "end of the prompt" if step.position == 0 else f"after {step.position} generated tokens"
        found = ", ".join(f"{n.source} (score {n.score:.3f})" for n in step.neighbors)
        print(f"  {where}: {found or '(no neighbor)'}")
        if show_text:
            print("  query:")
            print(quoted(step.query, "      | "))
            for rank, n in enumerate(step.neighbors, 1):
                print(f"    neighbor {rank}: {n.source} (chunk {n.chunk_id})")
                print(quoted(n.text, "      | "))
