"""How much of an evaluated chunk its neighbors contain: the RETRO paper's leakage measure (section 2.6).

For an evaluated chunk C and one neighbor N (a retrieved chunk with its continuation), the *longest
common span* is the longest run of tokens that occurs contiguously in both (padding and missing tokens
never match). The chunk's **overlap** is the fraction of its real tokens covered by the longest common
spans with its neighbors (the union over the neighbors, one span each: the leftmost in C when several
are as long). A neighbor's own overlap is its span's length over the chunk's real tokens.

Which neighbors a chunk is compared with follows RETRO's causal shift: the target tokens of chunk v
(sequence positions ``v*c .. v*c + c - 1``) are all predicted by positions that read the neighbors
retrieved for chunk v-1, so chunk v is compared with ``retrieved[v - 1]``. Two kinds of target stay out
of the buckets (:data:`UNBUCKETED`): those of chunk 0, which read no neighbor, and the sequence's one
extra target (position ``n*c``, the first token of the next chunk), a chunk of a single token.

Buckets (the paper's): ``[0, 12.5%)``, ``[12.5%, 25%)``, ``[25%, 50%)``, ``[50%, 100%]``.
"""

from __future__ import annotations

import numpy as np

BUCKET_EDGES = (0.0, 0.125, 0.25, 0.5, 1.0)
BUCKET_NAMES = ("0-12.5%", "12.5-25%", "25-50%", "50-100%")
UNBUCKETED = -1  # bucket id of target tokens outside every bucket (the first chunk, the extra target)


def _valid(tokens: np.ndarray, pad_id: int) -> np.ndarray:
    return (tokens != pad_id) & (tokens >= 0)


def longest_common_spans(
    chunks: np.ndarray, neighbors: np.ndarray, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Longest common contiguous spans of each chunk with each of its neighbors.

    Args:
        chunks: ``(m, n)`` token ids of m evaluated chunks.
        neighbors: ``(m, k, r)`` token ids of their k neighbors each (``pad_id`` / negative = none).

    Returns ``(lengths (m, k), starts (m, k))``: the span's length and its first position in the chunk
    (the leftmost of the longest; 0 where the length is 0).
    """
    chunks = np.asarray(chunks, dtype=np.int64)
    neighbors = np.asarray(neighbors, dtype=np.int64)
    m, n = chunks.shape
    k, r = neighbors.shape[1:]
    equal = (chunks[:, None, :, None] == neighbors[:, :, None, :]) & _valid(chunks, pad_id)[:, None, :, None]
    equal &= _valid(neighbors, pad_id)[:, :, None, :]
    # run[i, j]: length of the common run ending at chunk position i and neighbor position j
    run = np.zeros((m, k, n, r), dtype=np.int32)
    run[:, :, 0] = equal[:, :, 0]
    for i in range(1, n):
        run[:, :, i, 0] = equal[:, :, i, 0]
        run[:, :, i, 1:] = (run[:, :, i - 1, :-1] + 1) * equal[:, :, i, 1:]
    best_at = run.max(axis=3)  # (m, k, n): the longest run ending at each chunk position
    lengths = best_at.max(axis=2) if n else np.zeros((m, k), dtype=np.int32)
    ends = best_at.argmax(axis=2)  # the first (leftmost) end reaching the longest
    starts = np.where(lengths > 0, ends - lengths + 1, 0)
    return lengths.astype(np.int64), starts.astype(np.int64)


def chunk_overlaps(chunks: np.ndarray, neighbors: np.ndarray, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """``(overlap (m,), per_neighbor (m, k))`` fractions of each chunk's real tokens covered by its
    neighbors' longest common spans (the union over neighbors), and by each neighbor's alone. A chunk
    with no real token has overlap 0."""
    chunks = np.asarray(chunks, dtype=np.int64)
    lengths, starts = longest_common_spans(chunks, neighbors, pad_id)
    real = _valid(chunks, pad_id).sum(axis=1)
    positions = np.arange(chunks.shape[1])
    covered = (positions >= starts[..., None]) & (positions < (starts + lengths)[..., None])  # (m, k, n)
    denominator = np.maximum(real, 1).astype(np.float64)
    overlap = covered.any(axis=1).sum(axis=1) / denominator
    return overlap, lengths / denominator[:, None]


def bucket_of(overlap: np.ndarray) -> np.ndarray:
    """Bucket index (0..3) of each overlap fraction: ``[0, .125) [.125, .25) [.25, .5) [.5, 1]``."""
    return np.clip(
        np.searchsorted(np.asarray(BUCKET_EDGES[1:-1]), overlap, side="right"), 0, len(BUCKET_NAMES) - 1
    )


def sequence_chunks(seq: np.ndarray, chunk_size: int) -> list[np.ndarray]:
    """The target chunks of a ``(n*c + 1,)`` training sequence that read neighbors: chunk v = 1..n is
    ``seq[v*c : v*c + c]`` (the last one holds the single extra target)."""
    n = (len(seq) - 1) // chunk_size
    return [seq[v * chunk_size : v * chunk_size + chunk_size] for v in range(1, n + 1)]


def sequence_overlaps(
    seq: np.ndarray, retrieved: np.ndarray, chunk_size: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Overlaps of the target chunks v = 1..n of one sequence with the neighbors they read.

    ``seq (n*c + 1,)``, ``retrieved (n, k, r)`` (as ``RETRODataset`` yields them). Returns
    ``(overlap (n,), per_neighbor (n, k))``; entry v-1 is chunk v against ``retrieved[v - 1]``; the last
    entry is the one-token extra target.
    """
    seq, retrieved = np.asarray(seq), np.asarray(retrieved)
    c = chunk_size
    n = retrieved.shape[0]
    chunks = np.full((n, c), pad_id, dtype=np.int64)
    for v, chunk in enumerate(sequence_chunks(seq, c), start=1):
        chunks[v - 1, : len(chunk)] = chunk
    return chunk_overlaps(chunks, retrieved, pad_id)


def target_buckets(overlap: np.ndarray, seq_len: int, chunk_size: int) -> np.ndarray:
    """Bucket id of every target of a sequence (label position t predicts ``seq[t + 1]``), ``(seq_len,)``:
    the bucket of its target chunk ``(t + 1) // c``, or :data:`UNBUCKETED` for chunk 0 (no neighbor
    read) and for the extra target."""
    c = chunk_size
    n = seq_len // c
    chunk = (np.arange(seq_len) + 1) // c
    buckets = np.full(seq_len, UNBUCKETED, dtype=np.int64)
    inside = (chunk >= 1) & (chunk < n)
    buckets[inside] = bucket_of(np.asarray(overlap)[chunk[inside] - 1])
    return buckets


def drop_overlapping(
    seq: np.ndarray, retrieved: np.ndarray, chunk_size: int, pad_id: int, max_overlap: float
) -> tuple[np.ndarray, int]:
    """The paper's filtered evaluation: ``retrieved`` with every neighbor whose overlap with the chunk
    that reads it exceeds ``max_overlap`` replaced by padding (a missing neighbor). Returns
    ``(filtered copy, number dropped)``."""
    _, per_neighbor = sequence_overlaps(seq, retrieved, chunk_size, pad_id)
    drop = per_neighbor > max_overlap + 1e-12
    filtered = np.array(retrieved, copy=True)
    filtered[drop] = pad_id
    return filtered, int(drop.sum())
