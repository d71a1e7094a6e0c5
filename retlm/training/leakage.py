"""Evaluation that tells copying from leakage: held-out loss and bits per byte bucketed by how much of
each evaluated chunk its neighbors contain (:mod:`retlm.training.overlap`), with retrieval on and off,
and the paper's filtered evaluation (``max_overlap``: neighbors that overlap the chunk reading them by
more than that fraction are dropped).

The RETRO paper (section 4.4, and Norlund et al. 2023) finds most of retrieval's gain on chunks whose
neighbors contain them: that is the model copying text it was shown, which a test set that leaks into
the database rewards. The buckets show where a gain comes from; the filtered evaluation what retrieval
gives without the leaked text.

Bits per byte per bucket: each target chunk's bytes are counted by :func:`target_chunk_bytes`, the way
:func:`retlm.training.evaluation.count_bytes` counts a sequence's, so the buckets' bytes add up to the
overall figure: exactly, token by token, for a byte-level BPE (GPT-2's); for other tokenizers as the
difference between the UTF-8 lengths of the decoded scored targets up to the chunk's end and up to its
start, which telescopes to the decoded sequence's length.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from retlm.data import IGNORE_INDEX, RetroCollator
from retlm.training.overlap import (
    BUCKET_NAMES,
    UNBUCKETED,
    bucket_of,
    drop_overlapping,
    sequence_overlaps,
    target_buckets,
)
from retlm.training.scoring import Score, causal_lm_loss, scoring_batches

UNBUCKETED_NAME = "not bucketed"  # chunk 0 of each sequence (reads no neighbor) and the extra target
VARIANTS = (("with_retrieval", True), ("without_retrieval", False))


class OverlapView(Dataset):
    """``dataset``'s ``(seq, retrieved)`` items, with the overlaps of every target chunk and, when
    ``max_overlap`` is given, the neighbors above it replaced by padding (computed once, up front).

    Attributes: ``overlap (N, n)`` (chunk v = 1..n of each sequence against the neighbors it reads, on
    what is fed), ``neighbors`` (real neighbors fed), ``dropped`` (neighbors removed by the filter).
    """

    def __init__(
        self,
        dataset: Dataset,
        chunk_size: int,
        pad_id: int,
        max_overlap: float | None = None,
        progress: bool = False,
    ) -> None:
        if max_overlap is not None and not 0.0 <= max_overlap <= 1.0:
            raise ValueError(f"max_overlap must be a fraction in [0, 1], got {max_overlap}")
        self.dataset, self.chunk_size, self.pad_id = dataset, chunk_size, pad_id
        self.items: list[tuple[torch.Tensor, torch.Tensor]] = []
        overlaps, self.dropped, self.neighbors = [], 0, 0
        indices = range(len(dataset))
        for i in tqdm(indices, desc="neighbor overlap", leave=False) if progress else indices:
            seq, retrieved = (np.asarray(t) for t in dataset[i])
            if max_overlap is not None:
                retrieved, dropped = drop_overlapping(seq, retrieved, chunk_size, pad_id, max_overlap)
                self.dropped += dropped
            overlap, _ = sequence_overlaps(seq, retrieved, chunk_size, pad_id)
            self.neighbors += int(((retrieved != pad_id) & (retrieved >= 0)).any(axis=-1).sum())
            overlaps.append(overlap)
            self.items.append((torch.as_tensor(seq), torch.as_tensor(retrieved)))
        self.overlap = np.stack(overlaps) if overlaps else np.zeros((0, 0))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.items[i]


@torch.no_grad()
def token_nll(
    model: torch.nn.Module,
    dataset: Dataset,
    *,
    pad_id: int,
    retrieval: bool,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    autocast: Any = None,
    desc: str | None = None,
    eos_id: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-target negative log-likelihoods ``(N, seq_len)`` float64 (0 where ignored) and the labels
    ``(N, seq_len)`` (``IGNORE_INDEX`` = not scored, as :class:`RetroCollator` marks them with ``pad_id``
    and ``eos_id``) of ``model`` over ``dataset``'s items."""
    was_training = model.training
    model.eval()
    losses, labels = [], []
    collate = RetroCollator(pad_id, retrieval=retrieval, eos_id=eos_id)
    try:
        for batch in scoring_batches(dataset, batch_size, collate, 0, 1, desc):
            batch = {k: v.to(device) for k, v in batch.items()}
            target = batch.pop("shift_labels")
            with autocast or nullcontext():
                logits = model(input_ids=batch["input_ids"], retrieved=batch.get("retrieved")).logits
            loss = causal_lm_loss(logits, target, reduction="none").view(target.shape)
            losses.append(loss.double().cpu().numpy())
            labels.append(target.cpu().numpy())
    finally:
        model.train(was_training)
    if not losses:
        return np.zeros((0, 0)), np.zeros((0, 0), dtype=np.int64)
    return np.concatenate(losses), np.concatenate(labels)


def target_chunk_bytes(
    tokenizer: Any, labels: np.ndarray, chunk_size: int, byte_lengths: np.ndarray | None = None
) -> np.ndarray:
    """UTF-8 bytes of each target chunk of one sequence, ``(n + 1,)`` for ``labels (n*c,)``: entry v for
    the targets of chunk v (label positions t with ``(t + 1) // c == v``; the last entry is the extra
    target). ``byte_lengths``: the bytes of every token of a byte-level BPE
    (:func:`retlm.tokenization.token_byte_lengths`), summed exactly; without it, the growth of the
    decoded scored targets' length over the chunk, so that the entries add up to the bytes of the whole
    decoded sequence (what ``evaluate.count_bytes`` counts for such tokenizers)."""
    labels = np.asarray(labels)
    c = chunk_size
    n = len(labels) // c
    scored = labels != IGNORE_INDEX
    if byte_lengths is not None:
        per_token = np.where(scored, byte_lengths[np.where(scored, labels, 0)], 0)
        chunk = (np.arange(len(labels)) + 1) // c
        return np.bincount(chunk, weights=per_token, minlength=n + 1).astype(np.int64)
    ends = [min(len(labels), v * c + c - 1) for v in range(n + 1)]  # label index after chunk v's targets
    prefixes = [labels[:end][scored[:end]].tolist() for end in ends]
    texts = tokenizer.batch_decode(prefixes, skip_special_tokens=True)
    lengths = np.array([0] + [len(text.encode("utf-8")) for text in texts], dtype=np.int64)
    return np.diff(lengths)


def byte_lengths_of(tokenizer: Any) -> np.ndarray | None:
    """Per-token bytes where ``evaluate.count_bytes`` counts bytes token by token (a byte-level BPE);
    None otherwise (then chunks are measured on the decoded text)."""
    if tokenizer is None or not hasattr(tokenizer, "backend_tokenizer"):
        return None
    from retlm.tokenization import token_byte_lengths

    return token_byte_lengths(tokenizer)


def score_by_overlap(
    model: torch.nn.Module,
    dataset: Dataset,
    *,
    pad_id: int,
    chunk_size: int,
    tokenizer: Any = None,
    max_overlap: float | None = None,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    autocast: Any = None,
    progress: bool = False,
    eos_id: int | None = None,
) -> dict[str, Any]:
    """Loss and bits per byte, overall and per overlap bucket, with retrieval on and off.

    Returns the keys of :func:`retlm.training.evaluation.compare_retrieval` (``with_retrieval``,
    ``without_retrieval``, ``perplexity_ratio``, ``tokens``, ``bytes``, ``sequences``; with ``max_overlap``
    the retrieval numbers are those of the filtered neighbors) plus ``overlap``: ``{"max_overlap",
    "neighbors", "dropped_neighbors", "buckets": [{"bucket", "chunks", "tokens", "bytes",
    "with_retrieval": {loss, perplexity, bits_per_byte}, "without_retrieval": {...},
    "loss_change_from_retrieval"}, ...]}``, the four overlap buckets then the unbucketed targets.
    """
    view = OverlapView(dataset, chunk_size, pad_id, max_overlap, progress=progress)
    nll, labels = {}, None
    for name, retrieval in VARIANTS:
        nll[name], labels = token_nll(
            model,
            view,
            pad_id=pad_id,
            retrieval=retrieval,
            batch_size=batch_size,
            device=device,
            autocast=autocast,
            desc=f"eval {name.replace('_', ' ')}" if progress else None,
            eos_id=eos_id,
        )
    scored = labels != IGNORE_INDEX
    seq_len = labels.shape[1] if labels.size else 0
    buckets = (
        np.stack([target_buckets(o, seq_len, chunk_size) for o in view.overlap])
        if len(view)
        else np.zeros((0, 0), dtype=np.int64)
    )
    # bytes and chunk counts per bucket: chunk v of a sequence is in the bucket of its targets
    n = seq_len // chunk_size
    chunk_bucket = np.full((len(view), n + 1), UNBUCKETED, dtype=np.int64)
    if n > 1:
        chunk_bucket[:, 1:n] = bucket_of(view.overlap[:, : n - 1])
    lengths = byte_lengths_of(tokenizer)
    chunk_bytes = (
        np.stack([target_chunk_bytes(tokenizer, row, chunk_size, lengths) for row in labels])
        if tokenizer is not None and len(view)
        else np.zeros_like(chunk_bucket)
    )
    ids = [*range(len(BUCKET_NAMES)), UNBUCKETED]
    names = [*BUCKET_NAMES, UNBUCKETED_NAME]
    rows, totals = [], {name: Score(0.0, 0, 0) for name, _ in VARIANTS}
    for bucket, label in zip(ids, names, strict=True):
        mask = scored & (buckets == bucket)
        n_bytes = int(chunk_bytes[chunk_bucket == bucket].sum())
        row: dict[str, Any] = {
            "bucket": label,
            "chunks": int((chunk_bucket == bucket).sum()),
            "tokens": int(mask.sum()),
            "bytes": n_bytes,
        }
        for name, _ in VARIANTS:
            part = Score(nll=float(nll[name][mask].sum()), tokens=row["tokens"], bytes=n_bytes)
            row[name] = part.as_dict()
            totals[name] = Score(
                totals[name].nll + part.nll,
                totals[name].tokens + part.tokens,
                totals[name].bytes + part.bytes,
            )
        row["loss_change_from_retrieval"] = row["with_retrieval"]["loss"] - row["without_retrieval"]["loss"]
        rows.append(row)
    with_r, without_r = totals["with_retrieval"], totals["without_retrieval"]
    return {
        "with_retrieval": with_r.as_dict(),
        "without_retrieval": without_r.as_dict(),
        "perplexity_ratio": without_r.perplexity / with_r.perplexity,
        "tokens": with_r.tokens,
        "bytes": with_r.bytes,
        "sequences": len(view),
        "overlap": {
            "max_overlap": max_overlap,
            "neighbors": view.neighbors,
            "dropped_neighbors": view.dropped,
            "buckets": rows,
        },
    }


def format_overlap_table(result: dict[str, Any]) -> str:
    """The ``overlap`` part of a :func:`score_by_overlap` result as a text table."""
    overlap = result["overlap"]

    def cell(value: float | None, digits: int = 4) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}"

    header = (
        "chunk overlap with its neighbors",
        "chunks",
        "tokens",
        "loss on",
        "loss off",
        "on - off",
        "bpb on",
        "bpb off",
    )
    rows = [header]
    for row in overlap["buckets"]:
        on, off = row["with_retrieval"], row["without_retrieval"]
        empty = row["tokens"] == 0
        rows.append(
            (
                row["bucket"],
                str(row["chunks"]),
                str(row["tokens"]),
                *(
                    ("-",) * 5
                    if empty
                    else (
                        cell(on["loss"]),
                        cell(off["loss"]),
                        f"{row['loss_change_from_retrieval']:+.4f}",
                        cell(on["bits_per_byte"]),
                        cell(off["bits_per_byte"]),
                    )
                ),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        return "  ".join(
            [row[0].ljust(widths[0])] + [v.rjust(w) for v, w in zip(row[1:], widths[1:], strict=True)]
        )

    lines = [line(r) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    what = "nats per token; bpb: bits per byte; on/off: retrieval"
    if overlap["max_overlap"] is not None:
        what += (
            f"; filtered: {overlap['dropped_neighbors']} neighbors overlapping their chunk by more than "
            f"{100 * overlap['max_overlap']:g}% dropped, {overlap['neighbors']} read"
        )
    lines.append(
        f"({what}; '{UNBUCKETED_NAME}': each sequence's first chunk, which reads no neighbor, and "
        "its one extra target)"
    )
    return "\n".join(lines)
