"""What a training run is configured by: its options (``TrainOptions``) and its model config (a built-in
name, a yaml file, a mapping or a config object, completed from the database)."""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from transformers import PretrainedConfig

from retlm.errors import OptionError, did_you_mean
from retlm.models.retro import RetroConfig
from retlm.models.retro.configuration_retro import check_config_keys
from retlm.training import checkpoint as ckpt

CONFIG_DIR = "configs"
SCHEDULES = ("cosine", "linear", "constant")
RESUME_MODES = ("auto", "never")


def builtin_configs() -> dict[str, Path]:
    """Model configs shipped with retlm, by name (``retro-tiny``, ``retro-seed``, ...)."""
    folder = resources.files("retlm.training") / CONFIG_DIR
    return {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if str(p).endswith((".yaml", ".yml"))}


def read_model_config(model_config: str | os.PathLike[str] | Mapping[str, Any]) -> dict[str, Any]:
    """A model config mapping from a yaml path, a built-in config name or a mapping."""
    if isinstance(model_config, Mapping):
        check_config_keys(dict(model_config), "model config")
        return dict(model_config)
    path = Path(model_config)
    if not path.exists():
        named = builtin_configs()
        if str(model_config) not in named:
            raise FileNotFoundError(
                f"no model config {str(model_config)!r}: not a file, nor one of the "
                f"built-in configs ({', '.join(sorted(named))})"
                f"{did_you_mean(str(model_config), named)}"
            )
        path = named[str(model_config)]
    try:
        mapping = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, IsADirectoryError) as err:
        reason = " ".join(str(err).split())
        raise OptionError(f"model config {path} is not a valid yaml file: {reason}") from None
    if not isinstance(mapping, dict):
        raise OptionError(f"model config {path} must be a yaml mapping of RetroConfig arguments")
    check_config_keys(mapping, f"model config {path}")
    return mapping


def build_config(
    model_config: Any, db: Any, seq_len: int, *, signature: dict[str, Any] | None = None
) -> tuple[PretrainedConfig, dict[str, Any]]:
    """The model config, completed from the database (vocabulary, chunk size) and checked against it.

    ``signature``: ``checkpoint.database_signature(db)`` when the caller has it already."""
    signature = ckpt.database_signature(db) if signature is None else signature
    if isinstance(model_config, PretrainedConfig):
        config = copy.deepcopy(model_config)
        mapping = {k: v for k, v in config.to_diff_dict().items() if k not in ("transformers_version",)}
    else:
        mapping = read_model_config(model_config)
        mapping.setdefault("num_tokens", signature["vocab_size"])
        mapping.setdefault("chunk_size", signature["chunk_size"])
        mapping.setdefault("pad_id", signature["pad_id"])
        mapping.setdefault("max_seq_len", seq_len)
        try:
            config = RetroConfig(**mapping)
        except (TypeError, ValueError) as err:
            raise OptionError(f"bad model config: {err}") from None
    mapping.pop("retlm_data", None)
    ckpt.check_model_fits_database(config, db, signature=signature)
    if seq_len > int(config.max_seq_len):
        raise OptionError(f"seq_len {seq_len} is longer than the model's max_seq_len {config.max_seq_len}")
    return config, mapping


@dataclass
class TrainOptions:
    """Everything ``train`` can be told besides the database, model config and output directory."""

    max_steps: int | None = None  # optimizer steps
    minutes: float | None = None  # wall-clock training budget, across resumes
    lr: float = 1e-3
    schedule: str = "cosine"  # cosine | linear | constant (after warmup)
    warmup: float = 0.05  # steps, or a fraction of max_steps when below 1
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0  # None: no clipping
    batch_size: int = 8  # sequences per process per micro-batch
    weight_decay: float = 0.01
    eval_every: int | None = None  # steps between held-out evaluations; None: none during training
    eval_sequences: int | None = 64  # held-out sequences used by those evaluations; None: all
    save_every: int | None = 100  # steps between checkpoints; the run's end is always saved
    save_total_limit: int | None = 2
    log_every: int = 1
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    seed: int = 0
    train_fraction: float = 0.9  # of the documents; the rest are held out
    retrieval: bool = True  # False: the no-retrieval baseline (same model, no neighbours)
    seq_len: int | None = None  # default: the database's
    resume: str = "auto"  # auto | never | a checkpoint directory
    progress: bool = True

    def __post_init__(self) -> None:
        def positive(name: str, optional: bool = False) -> None:
            value = getattr(self, name)
            if (value is not None or not optional) and not (value is not None and value > 0):
                raise ValueError(f"{name} must be positive, got {value}")

        for name in ("lr", "warmup", "weight_decay", "max_grad_norm", "minutes", "train_fraction"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not math.isfinite(value)):
                raise OptionError(f"{name} must be a finite number, got {value}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise OptionError(f"seed must be an integer in 0..2**32-1, got {self.seed!r}")
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
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.warmup < 0:
            raise ValueError(
                f"warmup must be >= 0 (steps, or a fraction of the run when below 1), got {self.warmup}"
            )
        if not 0.0 < self.train_fraction <= 1.0:
            raise ValueError(f"train_fraction must be in (0, 1], got {self.train_fraction}")
        if self.resume not in RESUME_MODES and not Path(str(self.resume)).is_dir():
            raise ValueError(f"resume must be 'auto', 'never' or a checkpoint directory, got {self.resume!r}")

    @property
    def budget_s(self) -> float | None:
        return None if self.minutes is None else 60.0 * self.minutes

    def fixed(self) -> dict[str, Any]:
        """The options a resumed run must keep: they decide the data order and the model."""
        names = ("batch_size", "grad_accum", "train_fraction", "seed", "retrieval")
        return {name: getattr(self, name) for name in names}
