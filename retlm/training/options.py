"""``TrainOptions``: every option of a training run besides the database, the model config and the run
directory, written once. Each field carries its command-line metadata (``retlm.options.option``), so
`retlm train` and `retlm retrofit` derive their arguments and ``--config`` keys from this class, and
``train(db, config, out, **options)`` takes the same names as keywords.

This module imports neither torch nor transformers: `retlm --help` builds its parsers from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from retlm.errors import OptionError, short_repr
from retlm.options import option, zero_is_none

SCHEDULES = ("cosine", "linear", "constant")
RESUME_MODES = ("auto", "never")
SPLITS = ("heldout", "train", "all")  # the documents evaluate() scores
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # resolve_precision (training.precision) checks them

LENGTH = "length (with neither: one epoch)"
OPTIM = "optimisation"
DATA = "data"
RUNS = "evaluation, checkpoints, logging"


@dataclass
class TrainOptions:
    """Everything ``train`` can be told besides the database, model config and output directory."""

    max_steps: int | None = option(None, group=LENGTH, help="optimizer steps")
    minutes: float | None = option(
        None,
        group=LENGTH,
        help="wall-clock training budget, counted across resumes; without --max-steps the "
        "number of steps is chosen from a timing of the first steps",
    )
    lr: float = option(1e-3, group=OPTIM, help="peak learning rate (AdamW)")
    schedule: str = option(
        "cosine", choices=SCHEDULES, group=OPTIM, help="learning-rate schedule after warmup"
    )
    warmup: float = option(0.05, group=OPTIM, help="warmup steps, or a fraction of the run when below 1")
    grad_accum: int = option(1, group=OPTIM, help="micro-batches per optimizer step")
    max_grad_norm: float | None = option(
        1.0, to_value=zero_is_none, group=OPTIM, help="gradient clipping norm; 0: off"
    )
    batch_size: int = option(8, group=OPTIM, help="sequences per process per micro-batch")
    weight_decay: float = option(0.01, group=OPTIM, help="AdamW weight decay")
    eval_every: int | None = option(None, group=RUNS, help="steps between held-out evaluations")
    eval_sequences: int | None = option(
        64, to_value=zero_is_none, group=RUNS, help="held-out sequences used by those evaluations (0: all)"
    )
    save_every: int | None = option(
        100, to_value=zero_is_none, group=RUNS, help="steps between checkpoints (0: only the end of the run)"
    )
    save_total_limit: int | None = option(2, group=RUNS, help="checkpoints kept")
    log_every: int = option(1, group=RUNS, help="steps between metrics.jsonl records")
    precision: str = option(
        "auto", choices=PRECISIONS, group=OPTIM, help="auto: bf16 (or fp16) on CUDA, fp32 on CPU"
    )
    seed: int = option(0, group=OPTIM, help="seed of the initialisation, data order and split")
    train_fraction: float = option(
        0.9, group=DATA, help="fraction of the documents trained on; the rest are held out"
    )
    retrieval: bool = option(
        True,
        negate=True,
        group=DATA,
        help="train without neighbors: the no-retrieval baseline of the same model",
    )
    seq_len: int | None = option(None, group=DATA, help="tokens per sequence; None: the database's")
    resume: str = option(
        "auto",
        group=RUNS,
        help="auto: continue RUN_DIR's newest checkpoint; never: refuse a used RUN_DIR; "
        "or a checkpoint folder",
    )
    progress: bool = option(True, negate=True, group=RUNS, help="hide the progress bar")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Every option's type and range (run on construction: a ``TrainOptions`` is always valid)."""

        def positive(name: str, optional: bool = False) -> None:
            value = getattr(self, name)
            if (value is not None or not optional) and not (value is not None and value > 0):
                raise ValueError(f"{name} must be positive, got {value}")

        for name in ("lr", "warmup", "weight_decay", "max_grad_norm", "minutes", "train_fraction"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not math.isfinite(value)):
                raise OptionError(f"{name} must be a finite number, got {value}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise OptionError(f"seed must be an integer in 0..2**32-1, got {short_repr(self.seed)}")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise OptionError(
                f"save_total_limit must be >= 1 (checkpoints kept), got {self.save_total_limit}"
            )
        for name in ("batch_size", "grad_accum", "log_every", "lr"):
            positive(name)
        for name in ("max_steps", "eval_every", "save_every", "eval_sequences", "max_grad_norm", "seq_len"):
            positive(name, optional=True)
        if self.minutes is not None and not self.minutes > 0:
            raise ValueError(f"minutes (the time budget) must be positive, got {self.minutes}")
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"unknown schedule {short_repr(self.schedule)}; choose one of {', '.join(SCHEDULES)}"
            )
        if self.warmup < 0:
            raise ValueError(
                f"warmup must be >= 0 (steps, or a fraction of the run when below 1), got {self.warmup}"
            )
        if not 0.0 < self.train_fraction <= 1.0:
            raise ValueError(f"train_fraction must be in (0, 1], got {self.train_fraction}")
        if self.resume not in RESUME_MODES and not Path(str(self.resume)).is_dir():
            raise ValueError(
                f"resume must be 'auto', 'never' or a checkpoint directory, got {short_repr(self.resume)}"
            )

    @property
    def budget_s(self) -> float | None:
        return None if self.minutes is None else 60.0 * self.minutes

    def fixed(self) -> dict[str, Any]:
        """The options a resumed run must keep: they decide the data order and the model."""
        names = ("batch_size", "grad_accum", "train_fraction", "seed", "retrieval")
        return {name: getattr(self, name) for name in names}


TRAIN_OPTION_NAMES = frozenset(f.name for f in fields(TrainOptions))
