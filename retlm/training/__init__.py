"""Training and evaluation of RETRO on a retrieval database.

- ``train(db, model_config, out_dir, **options)``: HF Trainer based training (``TrainOptions`` lists the
  options), resumable, time-budgeted, DDP-ready; returns a ``TrainResult``.
- ``evaluate(checkpoint, db)``: held-out perplexity with and without retrieval, and bits per byte.
- ``evaluate_in_context(model, tokenizer, db)``: In-Context RALM for any frozen causal LM: bits per byte
  without retrieval, with the neighbors' text in front, and with unrelated neighbors.
- ``read_metrics(path)``: the loss curves a run logged to ``metrics.jsonl``;
  ``plot_loss_curves(path, png)`` draws them.

The names load on first use (PEP 562): the command line imports ``retlm.training.options`` to build
its parsers, and that must not import torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "TrainOptions": "retlm.training.options",
    "TrainResult": "retlm.training.trainer",
    "train": "retlm.training.trainer",
    "builtin_configs": "retlm.training.config",
    "evaluate": "retlm.training.evaluation",
    "evaluate_in_context": "retlm.training.in_context",
    "format_table": "retlm.training.evaluation",
    "load_model": "retlm.models.auto",
    "plot_loss_curves": "retlm.training.plot",
    "read_metrics": "retlm.training.callbacks",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'retlm.training' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])
