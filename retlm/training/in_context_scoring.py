"""Scoring an In-Context RALM plan (:mod:`retlm.training.in_context`): the forward passes, fast or naive.

The fast path computes the same numbers with fewer and larger forward passes, using causality (the
logits at position t depend only on the tokens up to t) where it holds exactly:

- without retrieval, every stride of a window comes from ONE pass over the window: stride i's input in the
  naive loop is ``window[:end_i]``, a prefix of the window, with the same positions;
- with retrieval, consecutive strides whose neighbor blocks are the same token ids share one pass over
  ``block + window[:end]`` (their inputs are prefixes of it), as long as that fits in ``max_length``
  untruncated; a stride whose block is empty reads what the window alone reads;
- only the scored positions' logits are computed (``logits_to_keep``), and passes of similar length are
  batched, left-padded, with explicit ``position_ids``.

``fast=False`` runs the naive loop (one full forward pass per stride and variant): the reference the
fast path is tested against.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from retlm.generation.neighbors import NeighborText

VARIANTS = ("without_retrieval", "with_retrieval", "unrelated_neighbors")
RETRIEVAL_VARIANTS = VARIANTS[1:]
LOGIT_BUDGET = 2**27  # floats of logits one batched forward pass may hold (512 MiB)


@dataclass
class Window:
    """``tokens (L,)``: LM ids of one piece of document ``doc_id``, scored from its start."""

    doc_id: int
    tokens: np.ndarray


@dataclass
class Segment:
    """One stride of window ``window``: targets at positions ``start .. end - 1``. ``query`` is None for a
    window's first stride (read without retrieval). ``blocks[variant]``: the LM ids placed in front for
    that variant (empty: none); ``neighbors``/``unrelated``: what they hold; ``overlap``: the fraction of
    the stride's tokens covered by its (real) neighbors' longest common spans, on LM tokens."""

    window: int
    start: int
    end: int
    query: str | None = None
    neighbors: list[NeighborText] = field(default_factory=list)
    unrelated: list[NeighborText] = field(default_factory=list)
    blocks: dict[str, list[int]] = field(default_factory=dict)
    overlap: float = 0.0
    bytes: int = 0


@dataclass
class InContextPlan:
    """Everything scoring needs: windows, their strides with the blocks to read, and the budget."""

    windows: list[Window]
    segments: list[Segment]
    stride: int
    max_length: int
    neighbors: int = 0  # neighbors read (real ones), after filtering and the budget
    dropped: int = 0  # real neighbors dropped by max_overlap
    no_unrelated: int = 0  # strides with a query but no other document's neighbors to borrow


@dataclass
class _Job:
    """One input sequence: its last ``n_scored`` tokens are targets at window positions ``start ..``."""

    ids: list[int]
    n_scored: int
    window: int
    start: int
    variant: str


# ---- scoring ----


def plan_jobs(plan: InContextPlan, fast: bool = True) -> list[_Job]:
    """The forward passes that score every target of ``plan`` in every variant (see the module
    docstring); a target the fast path reads from the no-retrieval pass appears in no retrieval job."""
    jobs = []
    if fast:
        for w, window in enumerate(plan.windows):
            jobs.append(_Job(window.tokens.tolist(), len(window.tokens) - 1, w, 1, VARIANTS[0]))
        for variant in RETRIEVAL_VARIANTS:
            jobs += _grouped_jobs(plan, variant)
        return jobs
    for segment in plan.segments:
        for variant in VARIANTS:
            jobs.append(_job(plan, segment.blocks.get(variant, []), segment, segment.start, variant))
    return jobs


def _grouped_jobs(plan: InContextPlan, variant: str) -> list[_Job]:
    jobs, group = [], None  # group: (block, first segment, last segment)
    for segment in plan.segments:
        block = segment.blocks.get(variant, [])
        if (
            group is not None
            and block
            and group[0] == block
            and group[2].window == segment.window
            and group[2].end == segment.start
            and len(block) + segment.end <= plan.max_length
        ):
            group = (block, group[1], segment)
            continue
        if group is not None:
            jobs.append(_job(plan, group[0], group[2], group[1].start, variant))
        group = (block, segment, segment) if block else None
    if group is not None:
        jobs.append(_job(plan, group[0], group[2], group[1].start, variant))
    return jobs


def _job(plan: InContextPlan, block: list[int], last: Segment, start: int, variant: str) -> _Job:
    """``block`` + the window up to ``last.end``, cut at the left to fit ``max_length``."""
    tokens = plan.windows[last.window].tokens
    first = max(0, len(block) + last.end - plan.max_length)
    return _Job([*block, *tokens[first : last.end].tolist()], last.end - start, last.window, start, variant)


def _batches(jobs: list[_Job], fast: bool, batch_size: int, vocab: int) -> list[list[int]]:
    """Job indices per forward pass: one each (naive), or up to ``batch_size`` of similar length whose
    kept logits fit :data:`LOGIT_BUDGET` (fast)."""
    if not fast:
        return [[i] for i in range(len(jobs))]
    batches: list[list[int]] = []
    for i in sorted(range(len(jobs)), key=lambda i: (len(jobs[i].ids), jobs[i].n_scored)):
        batch = batches[-1] if batches else None
        keep = max([jobs[j].n_scored for j in batch or []] + [jobs[i].n_scored]) + 1
        if batch is None or len(batch) >= batch_size or (len(batch) + 1) * keep * vocab > LOGIT_BUDGET:
            batches.append([i])
        else:
            batch.append(i)
    return batches


@torch.no_grad()
def score_jobs(
    model: Any,
    jobs: list[_Job],
    *,
    fast: bool = True,
    batch_size: int = 8,
    autocast: Any = None,
    bar: Any = None,
) -> list[np.ndarray]:
    """Per-target NLL (nats, float64) of each job's last ``n_scored`` tokens, in job order.

    Naive: one plain ``model(input_ids)`` per job, all logits. Fast: batches of similar length,
    left-padded (``attention_mask``, ``position_ids`` counting real tokens from 0), logits kept for the
    scored positions only.
    """
    device = next(model.parameters()).device
    vocab = int(model.get_output_embeddings().weight.shape[0])
    results: list[np.ndarray] = [np.zeros(0)] * len(jobs)
    for batch in _batches(jobs, fast, batch_size, vocab):
        rows = [jobs[i] for i in batch]
        width = max(len(job.ids) for job in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, job in enumerate(rows):
            ids[r, width - len(job.ids) :] = torch.tensor(job.ids)
            mask[r, width - len(job.ids) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        with autocast or nullcontext():
            if not fast:
                logits = model(input_ids=ids, use_cache=False).logits
            else:
                extra = {"attention_mask": mask} if not bool(mask.all()) else {}
                positions = (mask.cumsum(-1) - 1).clamp(min=0)
                keep = max(job.n_scored for job in rows) + 1
                logits = model(
                    input_ids=ids, position_ids=positions, use_cache=False, logits_to_keep=keep, **extra
                ).logits
        for r, (i, job) in enumerate(zip(batch, rows, strict=True)):
            n = job.n_scored
            nll = F.cross_entropy(logits[r, -n - 1 : -1].float(), ids[r, -n:], reduction="none")
            results[i] = nll.double().cpu().numpy()
            if bar is not None:
                bar.update(n)
    return results


def score_plan(
    model: Any,
    plan: InContextPlan,
    *,
    fast: bool = True,
    batch_size: int = 8,
    autocast: Any = None,
    progress: bool = False,
) -> tuple[dict[str, list[np.ndarray]], dict[str, int]]:
    """``(nll, lm_tokens)``: per variant, the NLL of every target of each window (``(L - 1,)`` arrays,
    position t at index t - 1), and the tokens the LM read (summed input lengths)."""
    jobs = plan_jobs(plan, fast)
    scored = sum(len(w.tokens) - 1 for w in plan.windows)
    bar = (
        tqdm(total=scored * len(VARIANTS), desc="scored tokens", unit="tok", leave=False)
        if progress
        else None
    )
    was_training = model.training
    model.eval()
    try:
        results = score_jobs(model, jobs, fast=fast, batch_size=batch_size, autocast=autocast, bar=bar)
    finally:
        model.train(was_training)
    nll = {v: [np.full(len(w.tokens) - 1, np.nan) for w in plan.windows] for v in VARIANTS}
    read = dict.fromkeys(VARIANTS, 0)
    for job, values in zip(jobs, results, strict=True):
        nll[job.variant][job.window][job.start - 1 : job.start - 1 + job.n_scored] = values
        read[job.variant] += len(job.ids)
    for variant in RETRIEVAL_VARIANTS:  # targets no retrieval job scored read the window alone
        for mine, plain in zip(nll[variant], nll[VARIANTS[0]], strict=True):
            missing = np.isnan(mine)
            mine[missing] = plain[missing]
            if bar is not None:
                bar.update(int(missing.sum()))
    if bar is not None:
        bar.close()
    return nll, read
