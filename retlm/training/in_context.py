"""In-Context RALM evaluation of a frozen causal LM on a retrieval database's documents (Ram et al. 2023).

The protocol, on the documents of one side of the training split (:class:`retlm.data.DocumentSplit`,
``train_fraction`` and ``seed`` as ``retlm train`` uses them; held out by default):

- each document's text (its chunks decoded with the database's tokenizer) is tokenized by the LM's own
  tokenizer and cut into windows of ``context`` tokens; each window is scored on its own, from its start;
- a window is scored in strides of ``stride`` tokens: stride ``i`` holds the targets at positions ``i*s ..
  i*s + s - 1`` (position 0 is input only). Before stride ``i >= 1``, the last ``query_tokens`` tokens
  (decoded to text) query the database, the evaluated document excluded; the top ``num_neighbors``
  chunks with their continuations are placed in front as text (:mod:`retlm.generation.in_context`:
  the block format and the context budget ``block + prefix <= max_length``), and the stride is scored
  given block + window prefix. Stride 0 has no query: it is read without retrieval in every variant;
- three variants score the same tokens: ``without_retrieval`` (the window alone), ``with_retrieval`` and
  ``unrelated_neighbors`` (the neighbors another window retrieved, from another document, at the same
  place in the schedule: what text in front gives without the right content).

The fast path and the naive loop it is checked against: :mod:`retlm.training.in_context_scoring`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from retlm.data import DocumentSplit
from retlm.errors import OptionError, check_int, short_repr
from retlm.generation.in_context import context_limit, fit_neighbors, neighbor_budget, search_neighbors
from retlm.generation.neighbors import NeighborText
from retlm.training.in_context_report import build_report
from retlm.training.in_context_scoring import VARIANTS, InContextPlan, Segment, Window, plan_jobs, score_plan
from retlm.training.leakage import byte_lengths_of, target_chunk_bytes
from retlm.training.overlap import UNBUCKETED, bucket_of, chunk_overlaps

SPLITS = ("heldout", "train", "all")
SEARCH_BATCH = 256  # queries embedded and searched at once
DEFAULT_CONTEXT = 1024


# ---- documents and windows ----


def split_documents(database: Any, split: str, train_fraction: float, seed: int) -> np.ndarray:
    """Sorted document ids of ``split`` ("heldout", "train" or "all") under training's document split."""
    if split not in SPLITS:
        raise OptionError(f"unknown split {short_repr(split)}; choose one of {', '.join(SPLITS)}")
    docs = np.unique(np.asarray(database.doc_ids, dtype=np.int64))
    docs = docs[docs >= 0]
    if split == "all":
        return docs
    heldout = DocumentSplit.make(database.doc_ids, train_fraction, seed).heldout_docs
    chosen = heldout if split == "heldout" else np.setdiff1d(docs, heldout)
    if not len(chosen):
        raise OptionError(f"the {split} split is empty (train fraction {train_fraction})")
    return chosen


def document_texts(database: Any, doc_ids: Sequence[int]) -> list[str]:
    """The text of each document: its chunks' tokens, padding dropped, decoded by the database's
    tokenizer (special tokens removed)."""
    all_docs = np.asarray(database.doc_ids, dtype=np.int64)
    order = np.argsort(all_docs, kind="stable")
    bounds = np.searchsorted(all_docs[order], np.asarray(doc_ids, dtype=np.int64), side="left")
    ends = np.searchsorted(all_docs[order], np.asarray(doc_ids, dtype=np.int64), side="right")
    c, pad = int(database.chunk_size), int(database.pad_id)
    pieces = []
    for lo, hi in zip(bounds, ends, strict=True):
        rows = np.sort(order[lo:hi])
        tokens = np.asarray(database.chunks[rows, :c]).reshape(-1)
        pieces.append(tokens[tokens != pad].tolist())
    return database.tokenizer.batch_decode(pieces, skip_special_tokens=True)


def make_windows(
    tokenizer: Any,
    texts: Sequence[str],
    doc_ids: Sequence[int],
    context: int,
    max_tokens: int | None = None,
    seed: int = 0,
) -> list[Window]:
    """Windows of ``context`` LM tokens of each text (the last one shorter; fewer than 2 tokens dropped).
    ``max_tokens``: windows in a seeded random order until that many targets (``L - 1`` per window), the
    last one cut short to fit; else all, in document order."""
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"] if len(texts) else []
    windows = [
        Window(int(doc), np.asarray(tokens[i : i + context], dtype=np.int64))
        for doc, tokens in zip(doc_ids, ids, strict=True)
        for i in range(0, len(tokens), context)
        if len(tokens) - i >= 2
    ]
    if max_tokens is None:
        return windows
    chosen, left = [], max_tokens
    for i in np.random.default_rng(seed).permutation(len(windows)):
        if left <= 0:
            break
        window = windows[int(i)]
        window.tokens = window.tokens[: left + 1]
        left -= len(window.tokens) - 1
        chosen.append(window)
    return chosen


def make_segments(windows: Sequence[Window], stride: int, query_tokens: int, tokenizer: Any) -> list[Segment]:
    """The strides of every window, with their bytes (UTF-8 bytes of the scored targets, as
    :func:`retlm.training.leakage.target_chunk_bytes` counts them) and the query text of each stride
    after the first (the ``query_tokens`` tokens before it)."""
    lengths = byte_lengths_of(tokenizer)
    segments = []
    for w, window in enumerate(windows):
        size = len(window.tokens)
        counts = target_chunk_bytes(tokenizer, window.tokens[1:], stride, lengths)
        for i, j in enumerate(range(0, size, stride)):
            if min(j + stride, size) > max(j, 1):  # stride 1's first stride holds no target
                segments.append(Segment(w, max(j, 1), min(j + stride, size), bytes=int(counts[i])))
    wanted = [s for s in segments if s.start >= stride]
    texts = tokenizer.batch_decode(
        [windows[s.window].tokens[max(0, s.start - query_tokens) : s.start].tolist() for s in wanted],
        skip_special_tokens=True,
    )
    for segment, text in zip(wanted, texts, strict=True):
        segment.query = text
    return segments


# ---- retrieval ----


def attach_neighbors(
    plan: InContextPlan,
    database: Any,
    tokenizer: Any,
    num_neighbors: int,
    max_overlap: float | None = None,
    progress: bool = False,
) -> None:
    """Search for every stride that has a query (its own document excluded), pick each one's unrelated
    neighbors (another window's, from another document), drop the ones above ``max_overlap``, and fill
    ``blocks``, ``neighbors``, ``unrelated`` and ``overlap`` of each segment."""
    asked = [s for s in plan.segments if s.query is not None]
    found: list[list[NeighborText]] = []
    starts = range(0, len(asked), SEARCH_BATCH)
    for i in tqdm(starts, desc="retrieval", unit="batch", leave=False) if progress else starts:
        part = asked[i : i + SEARCH_BATCH]
        docs = [plan.windows[s.window].doc_id for s in part]
        found += search_neighbors(database, [s.query for s in part], num_neighbors, docs)
    budget = neighbor_budget(plan.max_length)
    cache: dict[int, list[int]] = {}
    for index, segment in enumerate(asked):
        own = plan.windows[segment.window].doc_id
        unrelated = _unrelated(asked, found, index, own, plan.windows)
        plan.no_unrelated += not unrelated
        span = plan.windows[segment.window].tokens[segment.start : segment.end]
        place = (span, tokenizer, budget, max_overlap, cache)
        real, real_tokens, dropped = _place(segment, "with_retrieval", found[index], *place)
        segment.unrelated = _place(segment, "unrelated_neighbors", unrelated, *place)[0]
        segment.neighbors = real
        plan.neighbors += len(real)
        plan.dropped += dropped
        if real:
            segment.overlap = float(chunk_overlaps(span[None], _padded(real_tokens)[None], pad_id=-1)[0][0])


def _place(
    segment: Segment,
    variant: str,
    candidates: list[NeighborText],
    span: np.ndarray,
    tokenizer: Any,
    budget: int,
    max_overlap: float | None,
    cache: dict[int, list[int]],
) -> tuple[list[NeighborText], list[list[int]], int]:
    """Fill ``segment.blocks[variant]`` with the block of ``candidates`` less those overlapping ``span``
    by more than ``max_overlap`` (each alone) and those the budget leaves out. Returns the neighbors kept,
    their LM tokens, and how many the filter dropped."""
    tokens = [_lm_tokens(tokenizer, n, cache) for n in candidates]
    kept = list(range(len(candidates)))
    if max_overlap is not None and candidates:
        _, each = chunk_overlaps(span[None], _padded(tokens)[None], pad_id=-1)
        kept = [i for i in kept if each[0, i] <= max_overlap + 1e-12]
    segment.blocks[variant], fitted = fit_neighbors(tokenizer, [candidates[i].text for i in kept], budget)
    dropped = len(candidates) - len(kept)
    kept = kept[:fitted]
    return [candidates[i] for i in kept], [tokens[i] for i in kept], dropped


def _unrelated(
    asked: list[Segment], found: list[list[NeighborText]], index: int, own: int, windows: list[Window]
) -> list[NeighborText]:
    """The neighbors of the stride half the list away, or of the next one after it that comes from
    another document and retrieved nothing from this one (the evaluated document is never read), so that
    consecutive strides of a window borrow consecutive strides of one other window. Empty when no stride
    qualifies (every scored window from one document)."""
    n = len(asked)
    for tries in range(n):
        other = (index + max(n // 2, 1) + tries) % n
        if windows[asked[other].window].doc_id != own and all(nb.doc_id != own for nb in found[other]):
            return found[other]
    return []


def _lm_tokens(tokenizer: Any, neighbor: NeighborText, cache: dict[int, list[int]]) -> list[int]:
    if neighbor.chunk_id not in cache:
        cache[neighbor.chunk_id] = tokenizer(neighbor.text, add_special_tokens=False)["input_ids"]
    return cache[neighbor.chunk_id]


def _padded(rows: Sequence[Sequence[int]]) -> np.ndarray:
    """``(len(rows), longest)`` int64, -1 after each row's end."""
    out = np.full((len(rows), max((len(r) for r in rows), default=0)), -1, dtype=np.int64)
    for row, ids in zip(out, rows, strict=True):
        row[: len(ids)] = ids
    return out


# ---- the entry point ----


def evaluate_in_context(
    model: Any,
    tokenizer: Any,
    database: Any,
    *,
    stride: int = 32,
    query_tokens: int = 32,
    num_neighbors: int = 2,
    context: int | None = None,
    max_length: int | None = None,
    max_tokens: int | None = None,
    split: str = "heldout",
    train_fraction: float = 0.9,
    seed: int = 0,
    max_overlap: float | None = None,
    batch_size: int = 8,
    autocast: Any = None,
    fast: bool = True,
    progress: bool = True,
    bootstrap_samples: int = 2000,
) -> dict[str, Any]:
    """Bits per byte of the frozen causal LM ``model`` on ``database``'s documents of ``split``, without
    retrieval, with in-context retrieval and with unrelated neighbors (see the module docstring).

    ``context``: window length in LM tokens (default: 1,024, or ``max_length`` if smaller);
    ``max_length``: the LM's context budget (default: the model's limit); ``max_tokens``: score at most
    this many targets (windows in a seeded random order); ``max_overlap``: drop every neighbor whose
    longest common span with the stride it is read for covers more than that fraction of it (LM tokens).

    Returns the report of :func:`retlm.training.in_context_report.build_report` (``without_retrieval``,
    ``with_retrieval``, ``unrelated_neighbors``, ``differences``, ``buckets``) plus ``settings``,
    ``documents``, ``windows``, ``retrievals``, ``neighbors``, ``dropped_neighbors`` and ``cost``.
    """
    max_length = context_limit(model) if max_length is None else int(max_length)
    context = min(DEFAULT_CONTEXT, max_length) if context is None else int(context)
    _check(stride, query_tokens, num_neighbors, context, max_length, max_tokens, max_overlap, batch_size)
    database.check_k(num_neighbors, "num_neighbors")
    start = time.perf_counter()
    docs = split_documents(database, split, train_fraction, seed)
    windows = make_windows(tokenizer, document_texts(database, docs), docs, context, max_tokens, seed)
    if not windows:
        raise OptionError(f"the {split} documents hold no window of 2 or more tokens to score")
    plan = InContextPlan(windows, make_segments(windows, stride, query_tokens, tokenizer), stride, max_length)
    attach_neighbors(plan, database, tokenizer, num_neighbors, max_overlap, progress)
    retrieved = time.perf_counter()
    nll, read = score_plan(
        model, plan, fast=fast, batch_size=batch_size, autocast=autocast, progress=progress
    )
    scored_at = time.perf_counter()
    seg_nll, buckets = _segment_sums(plan, nll)
    report = build_report(
        seg_nll,
        np.array([s.end - s.start for s in plan.segments]),
        np.array([s.bytes for s in plan.segments]),
        buckets,
        samples=bootstrap_samples,
        seed=seed,
    )
    tokens = report["without_retrieval"]["tokens"]
    naive = sum(len(job.ids) for job in plan_jobs(plan, fast=False))
    report.update(
        settings=dict(
            stride=stride,
            query_tokens=query_tokens,
            num_neighbors=num_neighbors,
            context=context,
            max_length=max_length,
            max_tokens=max_tokens,
            split=split,
            train_fraction=train_fraction,
            seed=seed,
            max_overlap=max_overlap,
            overlap_on="LM tokens",
        ),
        documents=len({w.doc_id for w in windows}),
        windows=len(windows),
        retrievals=sum(s.query is not None for s in plan.segments),
        neighbors=plan.neighbors,
        dropped_neighbors=plan.dropped,
        strides_without_unrelated_neighbors=plan.no_unrelated,
        cost=dict(
            lm_tokens=read,
            lm_tokens_per_scored_token={v: read[v] / max(tokens, 1) for v in VARIANTS},
            naive_lm_tokens_per_scored_token=naive / max(tokens, 1),
            retrieval_seconds=retrieved - start,
            scoring_seconds=scored_at - retrieved,
            scored_tokens_per_second=tokens / max(scored_at - start, 1e-9),
        ),
    )
    return report


def _segment_sums(
    plan: InContextPlan, nll: dict[str, list[np.ndarray]]
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per segment: the summed NLL of each variant, and the overlap bucket (UNBUCKETED: no retrieval)."""
    sums = {
        v: np.array([nll[v][s.window][s.start - 1 : s.end - 1].sum() for s in plan.segments])
        for v in VARIANTS
    }
    buckets = np.array(
        [
            int(bucket_of(np.array([s.overlap]))[0]) if s.query is not None else UNBUCKETED
            for s in plan.segments
        ],
        dtype=np.int64,
    )
    return sums, buckets


def _check(
    stride: int,
    query_tokens: int,
    num_neighbors: int,
    context: int,
    max_length: int,
    max_tokens: int | None,
    max_overlap: float | None,
    batch_size: int,
) -> None:
    for name, value in (
        ("stride", stride),
        ("query_tokens", query_tokens),
        ("num_neighbors", num_neighbors),
        ("context", context),
        ("batch_size", batch_size),
    ):
        check_int(name, value)
    if context < 2 or context > max_length:
        raise OptionError(f"context must be in 2..{max_length} (the model's context length), got {context}")
    if stride >= neighbor_budget(max_length):
        raise OptionError(f"stride must be less than half the context length {max_length}, got {stride}")
    if max_tokens is not None:
        check_int("max_tokens", max_tokens)
    if max_overlap is not None and not 0.0 <= max_overlap <= 1.0:
        raise OptionError(f"max_overlap must be a fraction in [0, 1], got {max_overlap}")
