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
    (
        "eval_loss_no_retrieval",
        "held-out loss, retrieval off",
        dict(color="tab:red", marker="s", linewidth=2, linestyle="--"),
    ),
)


def plot_loss_curves(
    metrics_file: str | os.PathLike[str] | Mapping[str, str | os.PathLike[str]],
    png: str | os.PathLike[str],
    title: str | None = None,
) -> Path:
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
                ax.plot(
                    *zip(*points, strict=True), label=f"{run_label}: {label}" if run_label else label, **style
                )
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


def plot_overlap_buckets(result: Mapping, png: str | os.PathLike[str], title: str | None = None) -> Path:
    """Held-out loss (and bits per byte, when counted) per bucket of neighbor overlap, with retrieval on
    and off, from an evaluation result holding ``"overlap"`` (``retlm.training.evaluate`` with
    ``by_overlap``); empty buckets are left out. Returns ``png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["overlap"]["buckets"] if r["tokens"]]
    if not rows:
        raise ValueError("the evaluation scored no token, so there is nothing to plot")
    has_bytes = all(r["with_retrieval"]["bits_per_byte"] is not None for r in rows)
    fig, axes = plt.subplots(1, 2 if has_bytes else 1, figsize=(11 if has_bytes else 6, 4.5), squeeze=False)
    labels = [f"{r['bucket']}\n{r['tokens']} tokens" for r in rows]
    x = range(len(rows))
    metrics = (("loss", "loss (nats per token)"), ("bits_per_byte", "bits per byte"))
    for ax, (metric, unit) in zip(axes[0], metrics, strict=False):
        for key, label, style in (
            ("with_retrieval", "retrieval on", dict(color="tab:green", marker="o")),
            ("without_retrieval", "retrieval off", dict(color="tab:red", marker="s", linestyle="--")),
        ):
            ax.plot(x, [r[key][metric] for r in rows], label=label, linewidth=2, **style)
        ax.set_xticks(list(x), labels, fontsize=8)
        ax.set_xlabel("share of the chunk's tokens in its neighbors' longest common spans")
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
        ax.legend()
    limit = result["overlap"].get("max_overlap")
    suffix = f" (neighbors over {100 * limit:g}% overlap dropped)" if limit is not None else ""
    fig.suptitle((title or "held-out loss by neighbor overlap") + suffix)
    png = Path(png)
    atomic_write(png, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)
    return png
