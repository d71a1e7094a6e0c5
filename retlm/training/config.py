"""A training run's model config: a built-in name, a yaml file, a mapping or a config object, completed
from the database (its options are ``retlm.training.options.TrainOptions``)."""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig

from retlm.errors import OptionError, did_you_mean
from retlm.models.retro import RetroConfig
from retlm.models.retro.configuration_retro import check_config_keys
from retlm.options import load_yaml
from retlm.training import checkpoint as ckpt

CONFIG_DIR = "configs"


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
    mapping = load_yaml(path, "model config")  # bounded: size checked, no aliases
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
