"""`retlm generate`: continue a prompt with a trained RETRO, retrieving at every chunk boundary."""

from __future__ import annotations

import argparse
from pathlib import Path

from retlm.cli.main import UsageError

DESCRIPTION = (
    "Continue PROMPT with a trained RETRO model (a run directory, its model/ folder or a checkpoint-N "
    "folder). At every chunk boundary, the chunk just completed (of the prompt, then of the generated text) "
    "is embedded, the database is searched, and decoding continues with those neighbours. The RetNet "
    "decoder decodes recurrently (constant memory); the transformer decoder uses a KV cache."
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("generate", help="generate text, retrieving at chunk boundaries",
                                   description=DESCRIPTION,
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("checkpoint", type=Path, metavar="CHECKPOINT", help="trained model or run directory")
    parser.add_argument("prompt", metavar="PROMPT", help="the text to continue")
    parser.add_argument("--db", type=Path, required=True, metavar="DB",
                        help="retrieval database (built with the model's tokenizer and chunk size)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate")
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (> 0)")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (0, 1]")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--neighbours", type=int, default=None,
                        help="neighbours per chunk (default: the database's)")
    parser.add_argument("--no-retrieval", action="store_true", help="generate without retrieval")
    parser.add_argument("--show-neighbours", action="store_true", help="print what was retrieved per chunk")
    parser.set_defaults(func=run_generate)


def validate(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not 0 < args.temperature < float("inf"):
        raise UsageError(f"--temperature must be a finite number > 0, got {args.temperature}")
    if not 0 <= args.seed < 2**63:
        raise UsageError(f"--seed must be in 0..2**63-1, got {args.seed}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k is not None and args.top_k < 1:
        raise UsageError(f"--top-k must be >= 1, got {args.top_k}")
    if args.neighbours is not None and args.neighbours < 1:
        raise UsageError(f"--neighbours must be >= 1, got {args.neighbours}")
    if not args.prompt.strip():
        raise UsageError("PROMPT is empty")


def run_generate(args: argparse.Namespace) -> int:
    validate(args)
    from retlm.generation import generate_text, print_generation
    from retlm.models.auto import load_model
    from retlm.retrieval import RetrievalDatabase
    from retlm.training.checkpoint import check_model_fits_database

    db = RetrievalDatabase.open(args.db)
    if args.neighbours is not None:
        db.check_k(args.neighbours, "--neighbours")  # before the model is loaded
    model = load_model(args.checkpoint)
    check_model_fits_database(model.config, db)
    result = generate_text(
        model, db, args.prompt, retrieval=not args.no_retrieval, max_new_tokens=args.max_new_tokens,
        seed=args.seed, do_sample=args.sample, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, num_neighbours=args.neighbours,
    )
    print_generation(result, args.show_neighbours)
    return 0
