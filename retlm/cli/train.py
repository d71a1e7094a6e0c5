"""`retlm train` and `retlm eval`: train RETRO on a retrieval database, and measure what retrieval buys.

Heavy imports (torch, transformers) happen inside the commands, so `retlm --help` stays fast.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from retlm.cli.in_context import (
    DEFAULT_HELDOUT_FRACTION,
    DEFAULT_NEIGHBORS,
    IN_CONTEXT,
    InContextOptions,
    print_report,
)
from retlm.errors import OptionError, check_int, short_repr
from retlm.options import add_dataclass_arguments, flag_of, option, option_values, options_from
from retlm.training.options import PRECISIONS, SPLITS, TrainOptions

TRAIN_DESCRIPTION = (
    "Train a RETRO model on the sequences of a retrieval database (see `retlm build-db`), with the "
    "neighbors precomputed there. Documents are split into training and held-out ones (--train-fraction); "
    "held-out documents are never trained on, nor retrieved during training. Checkpoints (safetensors) go "
    "to RUN_DIR; re-running the same command after a kill resumes on the same loss curve. Losses are logged "
    "to RUN_DIR/metrics.jsonl. The same command runs under `torchrun --nproc_per_node N` or "
    "`accelerate launch` for data-parallel training (see docs/training.md)."
)
EVAL_DESCRIPTION = (
    "Held-out perplexity of a trained model with retrieval and with retrieval switched off (the same "
    "weights, the same tokens), and bits per byte: the summed NLL in bits over the UTF-8 bytes of the "
    "tokenizer's decoding of the scored tokens. MODEL is a run directory, its model/ folder or a "
    "checkpoint-N folder. With --in-context, MODEL is any causal LM, kept frozen: every --stride tokens the "
    "last --query-tokens tokens query the database and the neighbors' text goes in front of the context "
    "(In-Context RALM, Ram et al. 2023); bits per byte without retrieval, with it and with unrelated "
    "neighbors (docs/in_context.md)."
)


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser(
        "train",
        help="train a RETRO model on a retrieval database",
        description=TRAIN_DESCRIPTION,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    train.add_argument("--db", type=Path, required=True, metavar="DB", help="retrieval database folder")
    train.add_argument(
        "--model-config",
        default="retro-tiny",
        metavar="YAML",
        help="model config: a yaml file of RetroConfig arguments, or a built-in name "
        "(retro-tiny, retro-tiny-transformer, retro-seed). num_tokens, chunk_size and "
        "pad_id default to the database's",
    )
    train.add_argument("--out", type=Path, required=True, metavar="RUN_DIR", help="run directory")
    add_training_arguments(train)
    train.set_defaults(func=run_train)

    evaluate = subparsers.add_parser(
        "eval",
        help="held-out bits per byte with and without retrieval (RETRO; any causal LM with --in-context)",
        description=EVAL_DESCRIPTION,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_dataclass_arguments(evaluate, EvalOptions)
    evaluate.set_defaults(func=run_eval)


def parse_fraction(text: str) -> float:
    """``"0.125"`` or ``"12.5%"`` -> 0.125, in [0, 1] (argparse type of --max-overlap)."""
    try:
        value = float(text[:-1]) / 100 if str(text).endswith("%") else float(text)
    except ValueError:
        message = f"expected a fraction (0.125) or a percentage (12.5%), got {text!r}"
        raise argparse.ArgumentTypeError(message) from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1] (or 0%..100%), got {text!r}")
    return value


@dataclass(kw_only=True)
class EvalOptions(InContextOptions):
    """The options of `retlm eval` (``validate()`` checks them all before anything loads);
    ``evaluate_kwargs()`` are the keywords of ``retlm.training.evaluation.evaluate(checkpoint, db,
    **kwargs)``."""

    IN_CONTEXT_ONLY: ClassVar[tuple[str, ...]] = (
        "stride",
        "query_tokens",
        "num_neighbors",
        "context",
        "max_tokens",
        "heldout_fraction",
        "seed",
    )

    checkpoint: Path = option(
        positional=True,
        metavar="MODEL",
        help="a RETRO run, model or checkpoint dir; with --in-context, any causal LM (a model name, an HF "
        "folder or a .gguf file)",
    )
    db: Path = option(metavar="DB", help="the retrieval database the model was trained on (or reads from)")
    split: str = option(
        "heldout",
        choices=SPLITS,
        help="the documents training held out, the ones it trained on, or all",
    )
    batch_size: int = option(8, help="sequences per forward pass")
    max_sequences: int | None = option(
        None, help="evaluate at most this many sequences, spread evenly over the split"
    )
    device: str | None = option(None, help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    precision: str = option("fp32", choices=PRECISIONS, help="numeric precision of the forward passes")
    json: bool = option(False, help="print the result as json instead of a table")
    output: Path | None = option(None, metavar="FILE.json", help="also write the result to this json file")
    max_overlap: float | None = option(
        None,
        type=parse_fraction,
        metavar="X",
        help="filtered evaluation: drop every neighbor whose longest common span covers "
        "more than X of the chunk that reads it (a fraction, or a percentage: 12.5%%)",
    )
    plot: Path | None = option(
        None,
        metavar="FILE.png",
        help="also draw loss by overlap bucket into this PNG (eval writes nothing unless asked: "
        "the checkpoint folder is an input)",
    )
    progress: bool = option(True, negate=True, help="hide progress bars")
    in_context: bool = option(  # InContextOptions' field, with eval's help
        False,
        group=IN_CONTEXT,
        help="In-Context RALM: score the database's documents (of --split, by --heldout-fraction and "
        "--seed) with MODEL frozen, without retrieval, with its neighbors' text in front of the context "
        "and with unrelated neighbors; bits per byte with paired bootstrap intervals",
    )
    num_neighbors: int | None = option(
        None,
        flag="--neighbors",
        group=IN_CONTEXT,
        help=f"chunks (each with its continuation) placed in front (default {DEFAULT_NEIGHBORS})",
    )
    context: int | None = option(
        None, group=IN_CONTEXT, help="window length in the LM's tokens (default: 1024, or the model's limit)"
    )
    max_tokens: int | None = option(None, group=IN_CONTEXT, help="score at most this many tokens")
    heldout_fraction: float | None = option(
        None,
        group=IN_CONTEXT,
        help=f"fraction of the documents held out, as training splits them (default "
        f"{DEFAULT_HELDOUT_FRACTION}: `retlm train --train-fraction 0.9`)",
    )
    seed: int | None = option(None, group=IN_CONTEXT, help="the seed of training's split (default 0)")

    def validate(self) -> None:
        """Every option, and the files it names (MODEL, DB, --output's folder), before anything loads."""
        self.validate_in_context()
        if self.split not in SPLITS:
            raise OptionError(f"unknown --split {short_repr(self.split)}; choose one of {', '.join(SPLITS)}")
        check_int("--batch-size", self.batch_size)
        if self.max_sequences is not None:
            check_int("--max-sequences", self.max_sequences)
        if not self.checkpoint.exists() and not self.in_context:  # in-context: MODEL may be a model name
            raise OptionError(f"MODEL: no such file or folder: {self.checkpoint}")
        if not self.db.exists():
            raise OptionError(f"--db: no retrieval database at {self.db}")
        if self.output is not None:
            if self.output.is_dir():
                raise OptionError(f"--output {self.output} is a folder; give a file name")
            if not self.output.parent.is_dir():
                raise OptionError(f"--output {self.output}: the folder {self.output.parent} does not exist")
        if self.in_context:
            for name in ("max_sequences", "plot"):
                if getattr(self, name) is not None:
                    raise OptionError(
                        f"{flag_of(EvalOptions, name)} applies to RETRO models; use --max-tokens with "
                        "--in-context"
                    )
            if self.split == "heldout" and self.heldout_fraction == 0:
                raise OptionError(
                    "--heldout-fraction 0 holds out no document; give a fraction, or --split all"
                )

    def evaluate_kwargs(self) -> dict[str, Any]:
        names = ("split", "batch_size", "max_sequences", "device", "precision", "progress", "max_overlap")
        return {name: getattr(self, name) for name in names}


def add_training_arguments(parser: argparse.ArgumentParser, *, baseline: bool = True) -> None:
    """The options of :class:`~retlm.training.options.TrainOptions` (length, optimisation, data,
    evaluation and checkpoints), shared by `retlm train` and `retlm retrofit`; ``baseline``: offer
    --no-retrieval."""
    add_dataclass_arguments(parser, TrainOptions, skip=() if baseline else ("retrieval",))


def training_options(args: argparse.Namespace, **completed: Any) -> dict[str, Any]:
    """The keywords of ``TrainOptions`` (and so of ``train`` and ``retrofit``) the command line gives,
    checked by building ``TrainOptions`` from them (with ``completed`` values in place of the ones the
    command fills in later); a bad value is a usage error."""
    values = option_values(args, TrainOptions)
    try:
        TrainOptions(**{**values, **completed})
    except ValueError as err:
        raise OptionError(str(err)) from None
    return values


def run_train(args: argparse.Namespace) -> int:
    from retlm.training.trainer import train

    options = training_options(args)
    if not args.db.exists():
        raise OptionError(f"--db: no retrieval database at {args.db} (build one with `retlm build-db`)")
    from retlm.training.config import read_model_config

    try:
        read_model_config(args.model_config)  # exists, is yaml, holds only RetroConfig keys
    except FileNotFoundError as err:
        raise OptionError(f"--model-config: {err}") from None
    result = train(args.db, args.model_config, args.out, **options)
    return print_training_result(result, args.out)


def print_training_result(result: Any, out: Path) -> int:
    """The summary lines of a finished `retlm train` / `retlm retrofit` run (rank 0 only)."""
    if os.environ.get("RANK", "0") != "0":  # under torchrun, one summary is enough
        return 0
    if result.stop_reason == "already_finished":
        print(
            f"{out} already finished ({result.global_step} steps); nothing to do. Model: {result.model_dir}"
        )
        return 0
    how = "time budget reached" if result.stop_reason == "time_budget" else "all steps done"
    print(f"trained {result.global_step}/{result.max_steps} steps in {result.elapsed_s / 60:.1f} min ({how})")
    if result.last_train_loss is not None:
        print(f"last training loss {result.last_train_loss:.4f}")
    if result.last_eval:
        e = result.last_eval
        line = f"held-out loss {e['eval_loss']:.4f} (perplexity {e['eval_perplexity']:.2f})"
        if "eval_loss_no_retrieval" in e:
            line += (
                f"; without retrieval {e['eval_loss_no_retrieval']:.4f} "
                f"(perplexity {e['eval_perplexity_no_retrieval']:.2f})"
            )
        print(line)
    print(f"model: {result.model_dir}   metrics: {result.metrics_file}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from retlm.training.evaluation import evaluate, format_table

    opts = options_from(args, EvalOptions)
    opts.validate()
    if opts.in_context:
        from retlm.cli.in_context import run_eval as run_in_context_eval

        return run_in_context_eval(opts)
    result = evaluate(args.checkpoint, args.db, **opts.evaluate_kwargs())
    plot = None
    if args.plot is not None:
        from retlm.training.plot import plot_overlap_buckets

        plot = plot_overlap_buckets(result, args.plot)

    def tables(report: dict[str, Any]) -> str:
        from retlm.training.leakage import format_overlap_table

        shown = f"{format_table(report)}\n\n{format_overlap_table(report)}"
        return shown if plot is None else f"{shown}\nplot of loss by overlap bucket: {plot}"

    print_report(result, args.output, args.json, tables)
    return 0
