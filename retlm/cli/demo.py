"""`retlm demo`: build a database, train, evaluate and generate, end to end, on a CPU."""

from __future__ import annotations

import argparse
from pathlib import Path

from retlm.cli.main import UsageError

DESCRIPTION = (
    "The whole retlm workflow in one command, on the bundled corpus (the English documentation shipped "
    "with Python: pydoc topics and standard-library docstrings) or on --corpus DIR: (1) build the "
    "retrieval database (GPT-2 byte-level BPE tokens by default), (2) train a small RETRO with a RetNet "
    "decoder on ~90% of the documents within --minutes, (3) evaluate held-out perplexity and bits per byte "
    "with and without retrieval, (4) generate from the first chunk of --num-prompts held-out documents (or "
    "--prompt), retrieving at chunk boundaries, and show each neighbour read with its source document, "
    "(5) write loss.png and report.json into --work-dir. A second run reuses what the first finished; a "
    "killed run resumes."
)


def register(subparsers: argparse._SubParsersAction) -> None:
    from retlm.demo import DemoOptions

    d = DemoOptions()
    parser = subparsers.add_parser("demo", help="end-to-end demo: database, training, evaluation, generation",
                                   description=DESCRIPTION,
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--work-dir", type=Path, default=d.work_dir, help="where everything is written")
    parser.add_argument("--corpus", type=Path, default=None,
                        help="folder of your own text files (default: the bundled Python documentation)")
    parser.add_argument("--tokenizer", default=d.tokenizer,
                        help="LM tokenizer: gpt2 (cased, lossless byte-level BPE), bert (the seed's way: the "
                        "embedder's uncased WordPiece for both) or a tokenizer folder")
    parser.add_argument("--minutes", type=float, default=d.minutes, help="training time budget per model")
    parser.add_argument("--baseline", action="store_true",
                        help="also train the same model with no retrieval at all (the paper's control)")
    parser.add_argument("--model-config", default=d.model_config,
                        help="built-in model config name or a yaml file of RetroConfig arguments")
    parser.add_argument("--seq-len", type=int, default=d.seq_len, help="training sequence length")
    parser.add_argument("--chunk-size", type=int, default=d.chunk_size, help="tokens per retrieval chunk")
    parser.add_argument("--neighbours", type=int, default=d.num_neighbors, help="neighbours per chunk")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="training batch size")
    parser.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    parser.add_argument("--eval-sequences", type=int, default=d.eval_sequences,
                        help="held-out sequences scored (0: all)")
    parser.add_argument("--prompt", default=None,
                        help="prompt for the generation step (default: the first chunk of --num-prompts "
                        "held-out documents)")
    parser.add_argument("--num-prompts", type=int, default=d.num_prompts,
                        help="held-out documents whose first chunk is a prompt (without --prompt)")
    parser.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="tokens to generate")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of initialisation, data order, split")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from retlm.demo import DemoOptions, run_demo

    if not args.minutes > 0:
        raise UsageError(f"--minutes must be positive (a training time budget), got {args.minutes}")
    if args.corpus is not None and not args.corpus.is_dir():
        raise UsageError(f"--corpus {args.corpus}: no such folder")
    if args.eval_sequences < 0:
        raise UsageError(f"--eval-sequences must be >= 0 (0: all), got {args.eval_sequences}")
    if args.num_prompts < 1:
        raise UsageError(f"--num-prompts must be >= 1, got {args.num_prompts}")
    opts = DemoOptions(
        work_dir=args.work_dir, corpus=args.corpus, minutes=args.minutes, baseline=args.baseline,
        model_config=args.model_config, seq_len=args.seq_len, chunk_size=args.chunk_size,
        num_neighbors=args.neighbours, batch_size=args.batch_size, lr=args.lr,
        eval_sequences=args.eval_sequences or None, prompt=args.prompt, max_new_tokens=args.max_new_tokens,
        seed=args.seed, progress=not args.no_progress, tokenizer=args.tokenizer, num_prompts=args.num_prompts,
    )
    run_demo(opts)
    return 0
