"""How much do a database's neighbors say about the text that follows a chunk?

For each chunk u with a successor in its document, compare the tokens of chunk u+1 (what the model
must predict after reading chunk u's neighbors) with the tokens of chunk u's retrieved neighbors
(+ continuations), and with those of random chunks from other documents as a control. Reports the
fraction of u+1's distinct tokens present, and the fraction of its 4-grams present (verbatim copying
potential, which is where RETRO's large gains come from).

    .venv/bin/python bench/neighbor_quality.py DB [--samples 2000]
"""

from __future__ import annotations

import argparse

import numpy as np

from retlm.retrieval import RetrievalDatabase


def ngrams(tokens: np.ndarray, n: int) -> set[tuple[int, ...]]:
    tokens = [int(t) for t in tokens if t != 0]
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


def overlap(target: np.ndarray, sources: np.ndarray, n: int) -> float:
    want = ngrams(target, n)
    if not want:
        return float("nan")
    have = set().union(*(ngrams(s, n) for s in sources))
    return len(want & have) / len(want)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("db")
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    db = RetrievalDatabase.open(args.db)
    rng = np.random.default_rng(args.seed)
    doc_ids, knn, c = np.asarray(db.doc_ids), np.asarray(db.knn), db.chunk_size
    has_next = np.flatnonzero(doc_ids[:-1] == doc_ids[1:])
    chosen = rng.choice(has_next, size=min(args.samples, len(has_next)), replace=False)
    rows = {"neighbors": {1: [], 4: []}, "random chunks": {1: [], 4: []}}
    for u in chosen:
        target = np.asarray(db.chunks[u + 1, :c])
        neighbors = db.retrieved_tokens(knn[u])
        others = rng.choice(np.flatnonzero(doc_ids != doc_ids[u]), size=knn.shape[1], replace=False)
        randoms = db.retrieved_tokens(others)
        for n in (1, 4):
            rows["neighbors"][n].append(overlap(target, neighbors, n))
            rows["random chunks"][n].append(overlap(target, randoms, n))
    print(f"{db.path}: {len(chosen)} chunks, k={knn.shape[1]}, chunk_size={c}")
    print(f"{'source':<16}{'tokens of chunk u+1 found':>28}{'4-grams of chunk u+1 found':>30}")
    for name, by_n in rows.items():
        print(f"{name:<16}{np.nanmean(by_n[1]):>28.3f}{np.nanmean(by_n[4]):>30.3f}")


if __name__ == "__main__":
    main()
