"""RETRODataset: training sequences and their neighbors, read from a retrieval database.

The arrays come from :mod:`retlm.retrieval` (:class:`retlm.retrieval.layout.ChunkStore`, which owns the
file layout), and the neighbor tokens from :func:`retlm.retrieval.layout.neighbor_tokens`, the same
function that ``RetrievalDatabase.search`` uses at generation time.

Item ``i`` is ``(seq (seq_len + 1,), retrieved (seq_len // chunk_size, num_neighbors, 2 * chunk_size))``
with retro-pytorch's conventions, where retro-pytorch writes 0 this writes ``pad_id`` (0 for BERT, as
there; GPT-2 has no pad token and pads with its end-of-document token): tokens after the first EOS are
padding (one document per sequence); each neighbor is followed by its continuation (the next chunk)
when that chunk belongs to the same document, else by padding; a -1 neighbor becomes all ``pad_id``.

One difference from retro-pytorch, a fix: retro-pytorch drops a neighbor's continuation when the
neighbor's row holds EOS anywhere, including the extra (``chunk_size + 1``-th) column, which belongs to
the next chunk. Here the database's ``doc_ids`` decide, and for retro-pytorch's own files (the memmap-path
signature, no ``doc_ids``) a chunk ends its document when its own ``chunk_size`` tokens hold EOS, which is
how that format lays documents out (see :mod:`retlm.retrieval.layout`). Unlike retro-pytorch the memmaps
are opened read-only (it opens them ``r+`` and grows the files).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from retlm.retrieval.layout import ChunkStore

BERT_SEP_ID = 102  # [SEP] of the BERT tokenizers, retro-pytorch's EOS_ID


class RETRODataset(Dataset):
    """retro-pytorch's ``RETRODataset`` signature (keyword-only), reading memmaps read-only.

    Args:
        num_chunks, chunk_size, num_neighbors, num_sequences: the arrays' shapes (see module docstring).
        seq_len: tokens per training sequence (a multiple of ``chunk_size``); items hold seq_len + 1.
        chunk_memmap_path, chunk_nn_memmap_path, seq_memmap_path: the three files.
        eos_id: end-of-document token (BERT [SEP] = 102); pad_id: 0; add_continuations: True.

    :meth:`from_database` opens a retrieval database instead (the usual way).
    """

    def __init__(
        self,
        *,
        num_chunks: int,
        chunk_size: int,
        seq_len: int,
        num_sequences: int,
        num_neighbors: int,
        chunk_memmap_path: str | os.PathLike,
        chunk_nn_memmap_path: str | os.PathLike,
        seq_memmap_path: str | os.PathLike,
        eos_id: int = BERT_SEP_ID,
        pad_id: int = 0,
        add_continuations: bool = True,
    ) -> None:
        store = ChunkStore.from_files(
            num_chunks=num_chunks,
            chunk_size=chunk_size,
            num_sequences=num_sequences,
            num_neighbors=num_neighbors,
            chunks=chunk_memmap_path,
            knn=chunk_nn_memmap_path,
            seqs=seq_memmap_path,
            pad_id=pad_id,
            eos_id=eos_id,
        )
        self._setup(store, seq_len, add_continuations)

    def _setup(self, store: ChunkStore, seq_len: int, add_continuations: bool) -> None:
        super().__init__()
        chunk_size = store.chunk_size
        if seq_len % chunk_size:
            raise ValueError(f"seq_len ({seq_len}) must be a multiple of chunk_size ({chunk_size})")
        self.store = store
        self.num_chunks, self.chunk_size, self.seq_len = store.num_chunks, chunk_size, seq_len
        self.num_sequences, self.num_neighbors = len(store.seqs), store.num_neighbors
        self.seq_num_chunks = seq_len // chunk_size
        self.eos_id, self.pad_id, self.add_continuations = store.eos_id, store.pad_id, add_continuations
        self.neighbors_used: int | None = None  # from_database may keep only the first neighbors

    @classmethod
    def from_database(
        cls,
        db_or_path: Any,
        seq_len: int | None = None,
        *,
        num_neighbors: int | None = None,
        add_continuations: bool = True,
    ) -> RETRODataset:
        """Dataset over a ``RetrievalDatabase`` (its open arrays), or a database directory (or anything
        with a ``path`` to one).

        Shapes, ``pad_id`` and ``eos_id`` come from its manifest. ``seq_len`` defaults to the
        database's; ``num_neighbors`` (at most the database's k) keeps the first neighbors.
        """
        from retlm.retrieval import RetrievalDatabase

        if isinstance(db_or_path, RetrievalDatabase):
            store = ChunkStore.of_database(db_or_path)
        else:
            store = ChunkStore.from_directory(getattr(db_or_path, "path", db_or_path))
        stored_k = store.num_neighbors
        num_neighbors = stored_k if num_neighbors is None else num_neighbors
        if not 1 <= num_neighbors <= stored_k:
            raise ValueError(
                f"num_neighbors must be in 1..{stored_k} (the database's k), got {num_neighbors}"
            )
        dataset = cls.__new__(cls)
        dataset._setup(store, int(seq_len or store.manifest["seq_len"]), add_continuations)
        dataset.neighbors_used = num_neighbors
        return dataset

    def __len__(self) -> int:
        return self.num_sequences

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        store = self.store
        chunks, knn = store.chunks, store.knn
        begin = int(store.seqs[index])
        end = begin + self.seq_num_chunks
        if not 0 <= begin < self.num_chunks:
            raise IndexError(f"sequence {index} starts at chunk {begin}, outside 0..{self.num_chunks - 1}")
        # a sequence running past the last chunk is padded (retro-pytorch reads zero rows there)
        missing = max(0, end - self.num_chunks)
        rows = np.concatenate(
            (chunks[begin:end], np.full((missing, self.chunk_size + 1), self.pad_id, np.int32))
        )
        neighbors = np.concatenate((knn[begin:end], np.full((missing, self.num_neighbors), -1, np.int32)))
        if self.neighbors_used is not None:
            neighbors = neighbors[:, : self.neighbors_used]

        seq = np.concatenate((rows[:, :-1].reshape(-1), rows[-1, -1:]))
        after_eos = np.cumsum(seq == self.eos_id) - (seq == self.eos_id) > 0
        seq = np.where(after_eos, self.pad_id, seq)

        retrieved = store.retrieved_tokens(neighbors)
        if not self.add_continuations:
            retrieved = retrieved[..., : self.chunk_size]
        return torch.from_numpy(seq.astype(np.int64)), torch.from_numpy(retrieved)
