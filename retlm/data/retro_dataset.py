"""RETRODataset: training sequences and their neighbours from the retrieval database's memmaps.

Files (int32, little-endian, C order; written by :mod:`retlm.retrieval`):
    chunks.dat  ``(num_chunks, chunk_size + 1)``: each row is a chunk plus the first token of the next
                chunk of the same document (``pad_id`` at a document's end).
    knn.dat     ``(num_chunks, num_neighbors)``: neighbour chunk ids, -1 = none.
    seqs.dat    ``(num_sequences,)``: the first chunk of every training sequence.

Item ``i`` is ``(seq (seq_len + 1,), retrieved (seq_len // chunk_size, num_neighbors, 2 * chunk_size))``
with retro-pytorch's conventions, where retro-pytorch writes 0 this writes ``pad_id`` (0 for BERT, as
there; GPT-2 has no pad token and pads with its end-of-document token): tokens after the first EOS are
padding (one document per sequence); each neighbour is followed by its continuation (the next chunk),
which is padding when the neighbour chunk holds an EOS (its document ends there); a -1 neighbour becomes
all ``pad_id``. Unlike retro-pytorch the memmaps are opened read-only (it opens them ``r+`` and grows the
files).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

BERT_SEP_ID = 102  # [SEP] of the BERT tokenizers, retro-pytorch's EOS_ID

CHUNKS_FILE, KNN_FILE, SEQS_FILE, MANIFEST_FILE = "chunks.dat", "knn.dat", "seqs.dat", "manifest.json"


def _data_file(manifest: dict, name: str) -> str:
    """The file holding ``name`` now: ``add()`` writes new generations under new names (``files``)."""
    relative = (manifest.get("files") or {}).get(name, name)
    if not isinstance(relative, str) or Path(relative).is_absolute() or ".." in Path(relative).parts:
        raise ValueError(f"manifest.json: file of {name!r} must be a relative path inside the database")
    return relative


def open_readonly(path: str | os.PathLike, shape: tuple[int, ...], what: str) -> np.ndarray:
    """Read-only int32 memmap of ``shape``; refuses a file too small for it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist")
    needed = int(np.prod(shape)) * 4
    if path.stat().st_size < needed:
        raise ValueError(
            f"{what} file {path} holds {path.stat().st_size} bytes, fewer than the {needed} of an int32 "
            f"array of shape {shape}; check num_chunks / chunk_size / num_neighbors / num_sequences"
        )
    return np.memmap(path, dtype=np.int32, mode="r", shape=shape)


def neighbours_with_continuations(
    knn: np.ndarray, chunks: np.ndarray, *, add_continuations: bool, pad_id: int, eos_id: int
) -> np.ndarray:
    """``knn (..., k)`` chunk ids -> ``(..., k, c or 2c)`` tokens of each neighbour (+ continuation)."""
    num_chunks = chunks.shape[0]
    missing = knn < 0
    ids = np.maximum(knn, 0)
    rows = chunks[ids]  # (..., k, c + 1)
    retrieved = rows[..., :-1]
    if add_continuations:
        ends_document = np.any(rows == eos_id, axis=-1, keepdims=True)
        continuation = chunks[np.clip(ids + 1, 0, num_chunks - 1)][..., :-1]
        retrieved = np.concatenate((retrieved, np.where(ends_document, pad_id, continuation)), axis=-1)
    return np.where(missing[..., None], pad_id, retrieved)


class RETRODataset(Dataset):
    """retro-pytorch's ``RETRODataset`` signature (keyword-only), reading memmaps read-only.

    Args:
        num_chunks, chunk_size, num_neighbors, num_sequences: the arrays' shapes (see module docstring).
        seq_len: tokens per training sequence (a multiple of ``chunk_size``); items hold seq_len + 1.
        chunk_memmap_path, chunk_nn_memmap_path, seq_memmap_path: the three files.
        eos_id: end-of-document token (BERT [SEP] = 102); pad_id: 0; add_continuations: True.
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
        super().__init__()
        if seq_len % chunk_size:
            raise ValueError(f"seq_len ({seq_len}) must be a multiple of chunk_size ({chunk_size})")
        self.num_chunks, self.chunk_size, self.seq_len = num_chunks, chunk_size, seq_len
        self.num_sequences, self.num_neighbors = num_sequences, num_neighbors
        self.seq_num_chunks = seq_len // chunk_size
        self.eos_id, self.pad_id, self.add_continuations = int(eos_id), int(pad_id), add_continuations
        self.paths = {
            "chunks": (Path(chunk_memmap_path), (num_chunks, chunk_size + 1)),
            "knn": (Path(chunk_nn_memmap_path), (num_chunks, num_neighbors)),
            "seqs": (Path(seq_memmap_path), (num_sequences,)),
        }
        self.neighbors_used: int | None = None  # from_database may keep only the first neighbours
        self._arrays: dict[str, np.ndarray] | None = None
        self.arrays()  # fail early on missing or short files

    @classmethod
    def from_database(
        cls,
        db_or_path: Any,
        seq_len: int | None = None,
        *,
        num_neighbors: int | None = None,
        add_continuations: bool = True,
    ) -> RETRODataset:
        """Dataset over a retrieval database directory (or a ``RetrievalDatabase``, via its ``path``).

        Shapes, ``pad_id`` and ``eos_id`` come from its ``manifest.json``. ``seq_len`` defaults to the
        database's; ``num_neighbors`` (at most the database's k) keeps the first neighbours.
        """
        path = Path(getattr(db_or_path, "path", db_or_path))
        manifest_path = path / MANIFEST_FILE
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{path} is not a retrieval database: {manifest_path} is missing")
        manifest = json.loads(manifest_path.read_text())
        stored_k = int(manifest["num_neighbors"])
        num_neighbors = stored_k if num_neighbors is None else num_neighbors
        if not 1 <= num_neighbors <= stored_k:
            raise ValueError(
                f"num_neighbors must be in 1..{stored_k} (the database's k), got {num_neighbors}"
            )
        num_sequences = manifest.get("num_seqs")
        if num_sequences is None:
            num_sequences = (path / SEQS_FILE).stat().st_size // 4
        dataset = cls(
            num_chunks=int(manifest["num_chunks"]),
            chunk_size=int(manifest["chunk_size"]),
            seq_len=int(seq_len or manifest["seq_len"]),
            num_sequences=int(num_sequences),
            num_neighbors=stored_k,
            chunk_memmap_path=path / _data_file(manifest, CHUNKS_FILE),
            chunk_nn_memmap_path=path / _data_file(manifest, KNN_FILE),
            seq_memmap_path=path / _data_file(manifest, SEQS_FILE),
            eos_id=int(manifest.get("eos_id", BERT_SEP_ID)),
            pad_id=int(manifest.get("pad_id", 0)),
            add_continuations=add_continuations,
        )
        dataset.neighbors_used = num_neighbors
        return dataset

    def arrays(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            self._arrays = {name: open_readonly(p, shape, name) for name, (p, shape) in self.paths.items()}
        return self._arrays

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers reopen the files
        return {**self.__dict__, "_arrays": None}

    def __len__(self) -> int:
        return self.num_sequences

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        arrays = self.arrays()
        chunks, knn = arrays["chunks"], arrays["knn"]
        begin = int(arrays["seqs"][index])
        end = begin + self.seq_num_chunks
        if not 0 <= begin < self.num_chunks:
            raise IndexError(f"sequence {index} starts at chunk {begin}, outside 0..{self.num_chunks - 1}")
        # a sequence running past the last chunk is padded (retro-pytorch reads zero rows there)
        missing = max(0, end - self.num_chunks)
        rows = np.concatenate(
            (chunks[begin:end], np.full((missing, self.chunk_size + 1), self.pad_id, np.int32))
        )
        neighbours = np.concatenate((knn[begin:end], np.full((missing, self.num_neighbors), -1, np.int32)))
        if self.neighbors_used is not None:
            neighbours = neighbours[:, : self.neighbors_used]

        seq = np.concatenate((rows[:, :-1].reshape(-1), rows[-1, -1:]))
        after_eos = np.cumsum(seq == self.eos_id) - (seq == self.eos_id) > 0
        seq = np.where(after_eos, self.pad_id, seq)

        retrieved = neighbours_with_continuations(
            neighbours,
            chunks,
            add_continuations=self.add_continuations,
            pad_id=self.pad_id,
            eos_id=self.eos_id,
        )
        return torch.from_numpy(seq.astype(np.int64)), torch.from_numpy(retrieved.astype(np.int64))
