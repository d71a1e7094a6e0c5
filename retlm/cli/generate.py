"""`retlm generate`: continue a prompt with a trained RETRO, retrieving at every chunk boundary."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retlm.cli.in_context import DEFAULT_QUERY_TOKENS, DEFAULT_STRIDE, IN_CONTEXT
from retlm.cli.in_context import check_options as check_in_context_options
from retlm.errors import OptionError
from retlm.options import add_dataclass_arguments, option, options_from

DESCRIPTION = (
    "Continue PROMPT with a trained RETRO model (a run directory, its model/ folder or a checkpoint-N "
    "folder). At every chunk boundary, the chunk just completed (of the prompt, then of the generated text) "
    "is embedded, the database is searched, and decoding continues with those neighbors. The RetNet "
    "decoder decodes recurrently (constant memory); the transformer decoder uses a KV cache. With "
    "--in-context, MODEL is any causal LM, kept frozen: at the end of the prompt and then every --stride "
    "tokens, the last --query-tokens tokens query the database and the neighbors' text goes in front of "
    "the context (In-Context RALM); the sources read are printed after the text."
)


@dataclass
class GenerateOptions:
    """The options of `retlm generate`."""

    checkpoint: Path = option(
        positional=True,
        metavar="MODEL",
        help="trained RETRO model or run directory; with --in-context, any causal LM (a model name, an HF "
        "folder or a .gguf file)",
    )
    prompt: str = option(positional=True, metavar="PROMPT", help="the text to continue")
    db: Path = option(
        metavar="DB", help="retrieval database (built with the model's tokenizer and chunk size)"
    )
    max_new_tokens: int = option(64, help="tokens to generate")
    sample: bool = option(False, help="sample instead of greedy decoding")
    temperature: float = option(1.0, help="sampling temperature (> 0)")
    top_k: int | None = option(None, help="sample among the k most likely tokens")
    top_p: float | None = option(None, help="nucleus sampling mass (0, 1]")
    repetition_penalty: float | None = option(
        None,
        help="divide the positive logits (multiply the negative ones) of every token already in the text "
        "by this (> 1 discourages repeats; HF's RepetitionPenaltyLogitsProcessor; greedy or sampled)",
    )
    no_repeat_ngram_size: int | None = option(
        None, help="never produce an n-gram of this many tokens twice (HF's NoRepeatNGramLogitsProcessor)"
    )
    seed: int = option(0, help="sampling seed")
    num_neighbors: int | None = option(
        None,
        flag="--neighbors",
        aliases=("--neighbours",),
        help="neighbors per chunk (default: the database's)",
    )
    retrieval: bool = option(True, negate=True, help="generate without retrieval")
    show_neighbors: bool = option(
        False,
        flag="--show-neighbors",
        help="print what was retrieved per chunk",
    )
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

    def sampling(self) -> dict[str, Any]:
        """The decoding keywords both generation paths take (RETRO's ``generate_text`` and
        ``generate_in_context``)."""
        return {
            "seed": self.seed,
            "do_sample": self.sample,
            "temperature": self.temperature,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "repetition_penalty": self.repetition_penalty,
            "no_repeat_ngram_size": self.no_repeat_ngram_size,
        }


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate text, retrieving at chunk boundaries",
        description=DESCRIPTION,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_dataclass_arguments(parser, GenerateOptions)
    parser.set_defaults(func=run_generate)


def validate(args: GenerateOptions) -> None:
    if args.max_new_tokens < 1:
        raise OptionError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not 0 < args.temperature < float("inf"):
        raise OptionError(f"--temperature must be a finite number > 0, got {args.temperature}")
    if not 0 <= args.seed < 2**63:
        raise OptionError(f"--seed must be in 0..2**63-1, got {args.seed}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise OptionError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k is not None and args.top_k < 1:
        raise OptionError(f"--top-k must be >= 1, got {args.top_k}")
    if args.repetition_penalty is not None and not 0 < args.repetition_penalty < float("inf"):
        raise OptionError(f"--repetition-penalty must be a finite number > 0, got {args.repetition_penalty}")
    if args.no_repeat_ngram_size is not None and args.no_repeat_ngram_size < 1:
        raise OptionError(f"--no-repeat-ngram-size must be >= 1, got {args.no_repeat_ngram_size}")
    if args.num_neighbors is not None and args.num_neighbors < 1:
        raise OptionError(f"--neighbors must be >= 1, got {args.num_neighbors}")
    if not args.prompt.strip():
        raise OptionError("PROMPT is empty")


def run_generate(args: argparse.Namespace) -> int:
    opts = options_from(args, GenerateOptions)
    validate(opts)
    check_in_context_options(opts, ("stride", "query_tokens"))
    if opts.in_context:
        from retlm.cli.in_context import run_generate as run_in_context_generate

        return run_in_context_generate(opts)
    from retlm.generation import generate_text, print_generation
    from retlm.models.auto import load_model
    from retlm.retrieval import RetrievalDatabase
    from retlm.training.checkpoint import check_model_fits_database

    db = RetrievalDatabase.open(opts.db)
    if opts.num_neighbors is not None:
        db.check_k(opts.num_neighbors, "--neighbors")  # before the model is loaded
    model = load_model(opts.checkpoint)
    check_model_fits_database(model.config, db)
    result = generate_text(
        model,
        db,
        opts.prompt,
        retrieval=opts.retrieval,
        max_new_tokens=opts.max_new_tokens,
        num_neighbors=opts.num_neighbors,
        **opts.sampling(),
    )
    print_generation(result, opts.show_neighbors)
    return 0
