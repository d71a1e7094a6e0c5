"""Loss curves of a run as a PNG: training loss per step, held-out loss with and without retrieval."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from retlm.training.callbacks import read_metrics
from retlm.utils import atomic_write

CURVES = (  # metrics.jsonl key, label, matplotlib style
    ("loss", "training loss", dict(color="tab:blue", alpha=0.6, linewidth=1)),
    ("eval_loss", "held-out loss", dict(color="tab:green", marker="o", linewidth=2)),
    ("eval_loss_no_retrieval", "held-out loss, retrieval off", dict(color="tab:red", marker="s", linewidth=2,
                                                                    linestyle="--")),
)


def plot_loss_curves(metrics_file: str | os.PathLike[str] | Mapping[str, str | os.PathLike[str]],
                     png: str | os.PathLike[str], title: str | None = None) -> Path:
    """Draw the curves logged in ``metrics_file`` (a run's ``metrics.jsonl``) into ``png``; returns it.

    ``metrics_file`` may also map run labels to metrics files, to compare runs in one plot (each run
    after the first is drawn with thinner, dotted lines of the same colours).
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    runs = metrics_file if isinstance(metrics_file, Mapping) else {"": metrics_file}
    fig, ax = plt.subplots(figsize=(8, 5))
    drawn = 0
    for number, (run_label, path) in enumerate(runs.items()):
        records = read_metrics(path) if Path(path).is_file() else []
        for key, label, style in CURVES:
            points = [(r["step"], r[key]) for r in records if key in r]
            if points:
                if number:
                    style = {**style, "linestyle": ":", "linewidth": 1.5}
                ax.plot(*zip(*points, strict=True), label=f"{run_label}: {label}" if run_label else label,
                        **style)
                drawn += 1
    if not drawn:
        plt.close(fig)
        raise ValueError(f"{metrics_file} holds no loss records to plot")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(title or "RETRO training")
    ax.grid(alpha=0.3)
    ax.legend()
    png = Path(png)
    atomic_write(png, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)
    return png
