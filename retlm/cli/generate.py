"""`retlm generate`: continue a prompt with a trained RETRO, retrieving at every chunk boundary."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retlm.cli.in_context import InContextOptions
from retlm.errors import OptionError, check_int, short_repr
from retlm.options import add_dataclass_arguments, flag_of, option, option_from, options_from
from retlm.retrieval.config import BuildConfig

DESCRIPTION = (
    "Continue PROMPT with a trained RETRO model (a run directory, its model/ folder or a checkpoint-N "
    "folder). At every chunk boundary, the chunk just completed (of the prompt, then of the generated text) "
    "is embedded, the database is searched, and decoding continues with those neighbors. The RetNet "
    "decoder decodes recurrently (constant memory); the transformer decoder uses a KV cache. With "
    "--in-context, MODEL is any causal LM, kept frozen: at the end of the prompt and then every --stride "
    "tokens, the last --query-tokens tokens query the database and the neighbors' text goes in front of "
    "the context (In-Context RALM); the sources read are printed after the text."
)


@dataclass(kw_only=True)
class GenerateOptions(InContextOptions):
    """The options of `retlm generate` (``validate()`` checks them all before anything loads)."""

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
    num_neighbors: int | None = option_from(
        BuildConfig, "num_neighbors", None, help="neighbors per chunk (default: the database's)"
    )
    retrieval: bool = option(True, negate=True, help="generate without retrieval")
    show_neighbors: bool = option(
        False,
        flag="--show-neighbors",
        help="print what was retrieved per chunk",
    )

    def validate(self) -> None:
        for name in ("max_new_tokens", "top_k", "no_repeat_ngram_size", "num_neighbors"):
            if getattr(self, name) is not None:
                check_int(flag_of(GenerateOptions, name), getattr(self, name))
        if not 0 < self.temperature < float("inf"):
            raise OptionError(f"--temperature must be a finite number > 0, got {self.temperature}")
        if not 0 <= self.seed < 2**63:
            raise OptionError(f"--seed must be in 0..2**63-1, got {short_repr(self.seed)}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise OptionError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty is not None and not 0 < self.repetition_penalty < float("inf"):
            raise OptionError(
                f"--repetition-penalty must be a finite number > 0, got {self.repetition_penalty}"
            )
        if not self.prompt.strip():
            raise OptionError("PROMPT is empty")
        self.validate_in_context()
        if self.in_context and not self.retrieval:
            raise OptionError("--no-retrieval applies to RETRO models; --in-context always retrieves")

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


def run_generate(args: argparse.Namespace) -> int:
    opts = options_from(args, GenerateOptions)
    opts.validate()
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
