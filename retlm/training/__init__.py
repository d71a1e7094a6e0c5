"""Training and evaluation of RETRO on a retrieval database.

- ``train(db, model_config, out_dir, **options)``: HF Trainer based training (``TrainOptions`` lists the
  options), resumable, time-budgeted, DDP-ready; returns a ``TrainResult``.
- ``evaluate(checkpoint, db)``: held-out perplexity with and without retrieval, and bits per byte.
- ``read_metrics(path)``: the loss curves a run logged to ``metrics.jsonl``;
  ``plot_loss_curves(path, png)`` draws them.
"""

from retlm.models.auto import load_model
from retlm.training.callbacks import read_metrics
from retlm.training.config import TrainOptions, builtin_configs
from retlm.training.evaluate import evaluate, format_table
from retlm.training.plot import plot_loss_curves
from retlm.training.trainer import TrainResult, train

__all__ = [
    "TrainOptions",
    "TrainResult",
    "builtin_configs",
    "evaluate",
    "format_table",
    "load_model",
    "plot_loss_curves",
    "read_metrics",
    "train",
]
