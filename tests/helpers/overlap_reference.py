"""The naive reference of the neighbor-overlap measure (``retlm/training/overlap.py``): try every span of
the chunk. Shared by the overlap tests and the leakage evaluation's tests."""

from __future__ import annotations

PAD = 0


def naive_span(chunk: list[int], neighbor: list[int]) -> tuple[int, int]:
    """(length, start) of the longest chunk span occurring contiguously in the neighbor; the leftmost."""
    best, best_start = 0, 0
    for i in range(len(chunk)):
        for j in range(i + 1, len(chunk) + 1):
            span = chunk[i:j]
            if any(t == PAD or t < 0 for t in span):
                break
            found = any(neighbor[s : s + len(span)] == span for s in range(len(neighbor) - len(span) + 1))
            if found and len(span) > best:
                best, best_start = len(span), i
    return best, best_start


def naive_overlap(chunk: list[int], neighbors: list[list[int]]) -> tuple[float, list[float]]:
    real = max(1, sum(t != PAD and t >= 0 for t in chunk))
    covered = set()
    single = []
    for neighbor in neighbors:
        length, start = naive_span(chunk, neighbor)
        covered |= set(range(start, start + length))
        single.append(length / real)
    return len(covered) / real, single
