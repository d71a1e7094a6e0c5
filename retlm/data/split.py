"""From a retrieval database to the training and held-out sequences: the document split.

The split is by document, never by sequence: every sequence of a held-out document is held out, so
no held-out token is ever a training target. Held-out documents are also hidden from the
neighbors that training sequences retrieve, so the model never reads held-out text at all.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset


def open_database(db: Any) -> Any:
    """A ``RetrievalDatabase`` from a path (or the database itself), with a clear error when missing."""
    if not isinstance(db, str | Path):
        return db
    path = Path(db)
    if not path.exists():
        raise FileNotFoundError(f"no retrieval database at {path} (build one with `retlm build-db`)")
    if not path.is_dir():
        raise ValueError(f"{path} is a file; a retrieval database is a directory made by `retlm build-db`")
    from retlm.retrieval import RetrievalDatabase

    return RetrievalDatabase.open(path, read_index=False)  # training reads the neighbors, not the index


@dataclass(frozen=True)
class DocumentSplit:
    """Which documents are held out: a deterministic function of the database's documents and a seed."""

    train_fraction: float
    seed: int
    heldout_docs: np.ndarray  # sorted document ids, int64

    @classmethod
    def make(cls, doc_ids: np.ndarray, train_fraction: float, seed: int) -> DocumentSplit:
        if not 0.0 < train_fraction <= 1.0:
            raise ValueError(f"train_fraction must be in (0, 1], got {train_fraction}")
        docs = np.unique(np.asarray(doc_ids))
        docs = docs[docs >= 0]
        n_heldout = int(round((1.0 - train_fraction) * len(docs)))
        if train_fraction < 1.0 and len(docs) < 2:
            raise ValueError(f"a held-out split needs at least 2 documents; the database has {len(docs)}")
        if train_fraction < 1.0:
            n_heldout = min(max(n_heldout, 1), len(docs) - 1)
        order = np.random.default_rng(seed).permutation(len(docs))
        heldout = np.sort(docs[order[:n_heldout]]).astype(np.int64)
        return cls(train_fraction=train_fraction, seed=seed, heldout_docs=heldout)

    def is_heldout(self, doc_ids: np.ndarray) -> np.ndarray:
        return np.isin(np.asarray(doc_ids), self.heldout_docs)

    def to_json(self) -> dict[str, Any]:
        return {
            "train_fraction": self.train_fraction,
            "seed": self.seed,
            "heldout_docs": self.heldout_docs.tolist(),
        }


def sequence_doc_ids(db: Any) -> np.ndarray:
    """The document of each sequence: the document of its first chunk. Shape ``(n_seqs,)``."""
    seqs = np.asarray(db.seqs, dtype=np.int64)
    return np.asarray(db.doc_ids, dtype=np.int64)[seqs]


class SplitSequences(Dataset):
    """The sequences of one side of a ``DocumentSplit``, as ``(seq, retrieved)`` pairs.

    ``seq`` is ``(seq_len + 1,)`` and ``retrieved`` is ``(seq_len / chunk_size, k, 2 * chunk_size)``,
    exactly as the wrapped ``RETRODataset`` yields them. With ``hide_docs``, neighbors that come from
    those documents are replaced by padding, which the model treats as a missing neighbor.
    """

    def __init__(
        self, dataset: Dataset, db: Any, indices: Sequence[int], hide_docs: np.ndarray | None = None
    ):
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)
        self.pad_id = int(db.pad_id)
        self.hide_docs = hide_docs if hide_docs is not None and len(hide_docs) else None
        if self.hide_docs is not None:
            self.seqs = np.asarray(db.seqs, dtype=np.int64)
            self.knn, self.doc_ids = db.knn, db.doc_ids

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = int(self.indices[i])
        seq, retrieved = self.dataset[index]
        seq, retrieved = torch.as_tensor(np.asarray(seq)), torch.as_tensor(np.asarray(retrieved))
        if self.hide_docs is not None:
            retrieved = retrieved.clone()
            retrieved[self._hidden_neighbors(index, retrieved.shape[0])] = self.pad_id
        return seq, retrieved

    def _hidden_neighbors(self, index: int, n_chunks: int) -> torch.Tensor:
        """``(n_chunks, k)`` bool: which retrieved slots come from a hidden document."""
        first = int(self.seqs[index])
        rows = np.arange(first, first + n_chunks)
        rows = rows[rows < len(self.knn)]
        neighbors = np.asarray(self.knn[rows], dtype=np.int64)
        hidden = np.zeros((n_chunks, neighbors.shape[1]), dtype=bool)
        found = neighbors >= 0
        hidden[: len(rows)][found] = np.isin(np.asarray(self.doc_ids)[neighbors[found]], self.hide_docs)
        return torch.from_numpy(hidden)


def split_datasets(
    dataset: Dataset, db: Any, split: DocumentSplit, *, hide_heldout: bool = True
) -> tuple[SplitSequences, SplitSequences]:
    """``(train, heldout)`` views of ``dataset`` (one item per database sequence)."""
    if len(dataset) != len(db.seqs):
        raise ValueError(f"the dataset has {len(dataset)} sequences but the database lists {len(db.seqs)}")
    heldout = split.is_heldout(sequence_doc_ids(db))
    train_idx, heldout_idx = np.flatnonzero(~heldout), np.flatnonzero(heldout)
    if len(train_idx) == 0:
        raise ValueError("no training sequences: every document is held out; raise train_fraction")
    hide = split.heldout_docs if hide_heldout else None
    return SplitSequences(dataset, db, train_idx, hide), SplitSequences(dataset, db, heldout_idx)


def spread_subset(dataset: SplitSequences, max_sequences: int | None) -> SplitSequences:
    """At most ``max_sequences`` items, evenly spread over ``dataset`` so that every region counts."""
    if max_sequences is None or max_sequences >= len(dataset):
        return dataset
    if max_sequences <= 0:
        raise ValueError(f"max_sequences must be positive, got {max_sequences}")
    picks = np.unique(np.linspace(0, len(dataset) - 1, max_sequences).round().astype(np.int64))
    subset = copy.copy(dataset)
    subset.indices = dataset.indices[picks]
    return subset
