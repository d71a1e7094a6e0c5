"""The report of an In-Context RALM evaluation (:mod:`retlm.training.in_context`), and its text table.

Scores are sums over strides (a stride's tokens are scored after one retrieval), so the paired bootstrap
resamples strides: each resample keeps every stride's three scores together. Strides of one document
are correlated (a document whose text the database holds in another file gains on all its strides), so
these intervals are narrower than a bootstrap over documents would give; the overlap buckets show where
a gain comes from.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from retlm.training.evaluation import paired_bootstrap
from retlm.training.in_context_scoring import VARIANTS
from retlm.training.overlap import BUCKET_NAMES, UNBUCKETED
from retlm.training.scoring import Score

DIFFERENCES = (
    ("with_retrieval", "without_retrieval"),
    ("unrelated_neighbors", "without_retrieval"),
    ("with_retrieval", "unrelated_neighbors"),
)
NO_RETRIEVAL_NAME = "no retrieval"  # the bucket of each window's first stride, read without neighbors


def summary(nll: float, tokens: int, n_bytes: int) -> dict[str, Any]:
    """``{bits_per_byte, loss, perplexity, tokens, bytes}`` of summed NLL (nats) over tokens and bytes."""
    score = Score(nll=float(nll), tokens=int(tokens), bytes=int(n_bytes))
    return {**score.as_dict(), "tokens": int(tokens), "bytes": int(n_bytes)}


def difference(
    a: np.ndarray, b: np.ndarray, n_bytes: np.ndarray, samples: int = 2000, seed: int = 0
) -> dict[str, float | None]:
    """Bits per byte of ``a`` minus those of ``b`` (per-stride NLL sums in nats, paired) with its paired
    bootstrap 95% interval, and the change relative to ``b``."""
    if n_bytes.sum() <= 0:
        return {"bits_per_byte": None, "low": None, "high": None, "relative": None}
    bits = (np.asarray(a) - np.asarray(b)) / math.log(2)
    mean, low, high = paired_bootstrap(bits, n_bytes, samples, seed)
    base = float(np.sum(b) / math.log(2) / n_bytes.sum())
    return {"bits_per_byte": mean, "low": low, "high": high, "relative": mean / base if base else None}


def build_report(
    nll: dict[str, np.ndarray],
    tokens: np.ndarray,
    n_bytes: np.ndarray,
    buckets: np.ndarray,
    *,
    samples: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """The scores of per-stride sums: ``nll[variant] (m,)`` nats, ``tokens (m,)``, ``n_bytes (m,)`` and
    ``buckets (m,)`` (:func:`retlm.training.overlap.bucket_of`, or ``UNBUCKETED`` for strides read
    without retrieval).

    Returns ``{variant: summary for each of VARIANTS, "differences": {"A - B": difference},
    "buckets": [{"bucket", "strides", "tokens", "bytes", variant: summary..., "with_retrieval -
    without_retrieval": difference}], "strides"}``.
    """
    tokens, n_bytes, buckets = (np.asarray(x) for x in (tokens, n_bytes, buckets))
    report: dict[str, Any] = {v: summary(nll[v].sum(), tokens.sum(), n_bytes.sum()) for v in VARIANTS}
    report["differences"] = {
        f"{a} - {b}": difference(nll[a], nll[b], n_bytes, samples, seed) for a, b in DIFFERENCES
    }
    rows = []
    for bucket, name in (*enumerate(BUCKET_NAMES), (UNBUCKETED, NO_RETRIEVAL_NAME)):
        mask = buckets == bucket
        row: dict[str, Any] = {
            "bucket": name,
            "strides": int(mask.sum()),
            "tokens": int(tokens[mask].sum()),
            "bytes": int(n_bytes[mask].sum()),
        }
        for v in VARIANTS:
            row[v] = summary(nll[v][mask].sum(), row["tokens"], row["bytes"])
        a, b = DIFFERENCES[0]
        row[f"{a} - {b}"] = difference(nll[a][mask], nll[b][mask], n_bytes[mask], samples, seed)
        rows.append(row)
    report["buckets"] = rows
    report["strides"] = len(tokens)
    return report


def _cell(value: float | None, digits: int = 4, sign: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _interval(d: dict[str, Any]) -> str:
    return f"[{_cell(d['low'], sign=True)}, {_cell(d['high'], sign=True)}]"


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)])
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def format_in_context_table(report: dict[str, Any]) -> str:
    """Three rows (bits per byte, loss, tokens, bytes), the differences with their intervals, the overlap
    buckets, then what was scored and what it cost."""
    rows = [("", "bits/byte", "loss (nats)", "perplexity", "tokens", "bytes")]
    for v in VARIANTS:
        r = report[v]
        numbers = (_cell(r["bits_per_byte"]), _cell(r["loss"]), _cell(r["perplexity"], 2))
        rows.append((v.replace("_", " "), *numbers, str(r["tokens"]), str(r["bytes"])))
    lines = _table(rows)
    strides = report["strides"]
    lines += ["", f"difference in bits/byte, paired bootstrap 95% interval over {strides} strides:"]
    diff_rows = [("", "bits/byte", "95% interval", "relative")]
    for name, d in report["differences"].items():
        relative = "n/a" if d["relative"] is None else f"{100 * d['relative']:+.1f}%"
        diff_rows.append(
            (name.replace("_", " "), _cell(d["bits_per_byte"], sign=True), _interval(d), relative)
        )
    lines += _table(diff_rows)
    settings = report.get("settings", {})
    on = settings.get("overlap_on", "LM tokens")
    lines += ["", f"by overlap of each stride with the neighbors it reads ({on}):", *_bucket_lines(report)]
    lines += _footer(report, settings)
    return "\n".join(lines)


def _bucket_lines(report: dict[str, Any]) -> list[str]:
    header = ("overlap", "strides", "tokens", "bpb without", "bpb with", "bpb unrelated")
    rows = [(*header, "with - without", "95% interval")]
    for row in report["buckets"]:
        d = row["with_retrieval - without_retrieval"]
        if row["tokens"]:
            cells = [_cell(row[v]["bits_per_byte"]) for v in VARIANTS]
            cells += [_cell(d["bits_per_byte"], sign=True), _interval(d)]
        else:
            cells = ["-"] * 5
        rows.append((row["bucket"], str(row["strides"]), str(row["tokens"]), *cells))
    note = (
        f"('{NO_RETRIEVAL_NAME}': each window's first stride, which has no query: the three rows are equal)"
    )
    return [*_table(rows), note]


def _footer(report: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    lines = []
    if settings.get("max_overlap") is not None:
        lines.append(
            f"filtered: {report.get('dropped_neighbors', 0)} neighbors overlapping their stride by more than "
            f"{100 * settings['max_overlap']:g}% dropped; {report.get('neighbors', 0)} read"
        )
    if settings:
        lines.append(
            f"{settings['split']} split: {report.get('documents')} documents, {report.get('windows')} "
            f"windows of up to {settings['context']} tokens, {report.get('retrievals')} retrievals "
            f"(stride {settings['stride']}, query {settings['query_tokens']} tokens, "
            f"{settings['num_neighbors']} neighbors)"
        )
    if report.get("strides_without_unrelated_neighbors"):
        lines.append(
            f"note: {report['strides_without_unrelated_neighbors']} strides found no other document's "
            "neighbors to borrow (too few documents scored): their unrelated row reads none"
        )
    cost = report.get("cost")
    if cost:
        per = cost["lm_tokens_per_scored_token"]
        lines.append(
            "LM tokens read per scored token: "
            + ", ".join(f"{v.replace('_', ' ')} {per[v]:.2f}" for v in VARIANTS)
            + f" (naive loop: {cost['naive_lm_tokens_per_scored_token']:.2f} for all three); "
            f"{cost['scored_tokens_per_second']:.1f} scored tokens/s"
        )
    return lines
