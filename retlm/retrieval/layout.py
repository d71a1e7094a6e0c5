"""The chunk layout, read in one place: chunk ids -> neighbor (+ continuation) tokens, and the arrays
a dataset reads (``chunks``, ``knn``, ``seqs``, ``doc_ids``).

:func:`neighbor_tokens` is the only implementation of the neighbor layout. Training
(``retlm.data.RETRODataset``), evaluation (which reads that dataset) and generation
(``RetrievalDatabase.search`` -> ``RetrievalDatabase.retrieved_tokens``) all call it, so a model reads
at generation time exactly the layout it was trained on.

The rule: a neighbor chunk is followed by its continuation, the next chunk, when that chunk belongs
to the same document, and by padding otherwise; a ``-1`` neighbor is all padding. "The same document"
comes from ``doc_ids.dat`` when the files have one (every database that ``retlm build-db`` writes).

retro-pytorch's memmaps (opened through ``RETRODataset``'s memmap-path signature) have no document
ids. Their format defines the boundaries instead: every document's tokens end with the end-of-document
id (the BERT tokenizer's ``[SEP]``), and a document is cut into whole rows of ``chunk_size`` with padding
after that id, so the row whose first ``chunk_size`` tokens hold ``eos_id`` is the document's last
chunk. The extra (``chunk_size + 1``-th) column belongs to the next row, so it does not count: a
document whose tokens end exactly on a chunk boundary puts its ``eos_id`` at the start of the next row,
and that row (the document's last) is still its continuation. retro-pytorch itself looks for ``eos_id``
anywhere in the row, extra column included, and so drops that continuation; that is the behaviour this
module fixes. Text holding ``eos_id`` cannot be told apart from a document end in such files;
``retlm build-db`` never writes it (it tokenizes special-token spellings as text) and records
``doc_ids`` anyway.
"""

from __future__ import annotations

import math
import os
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from retlm.retrieval import format
from retlm.retrieval.format import CHUNKS_FILE, DOC_IDS_FILE, KNN_FILE, MANIFEST_FILE, SEQS_FILE
from retlm.utils import deprecated_aliases

__getattr__ = deprecated_aliases(__name__, {"neighbour_tokens": "neighbor_tokens"})


def next_in_document(
    chunks: np.ndarray, chunk_ids: np.ndarray, *, doc_ids: np.ndarray | None = None, eos_id: int | None = None
) -> np.ndarray:
    """``chunk_ids (m,)`` valid ids -> ``(m,)`` bool: the next chunk belongs to the same document.

    With ``doc_ids (num_chunks,)``: same document id. Without: the chunk's first ``chunk_size`` tokens
    do not hold ``eos_id`` (see the module docstring).
    """
    n = chunks.shape[0]
    has_next = chunk_ids + 1 < n
    following = np.minimum(chunk_ids + 1, n - 1)
    if doc_ids is not None:
        return has_next & (np.asarray(doc_ids[following]) == np.asarray(doc_ids[chunk_ids]))
    if eos_id is None:
        raise ValueError("document boundaries need doc_ids or eos_id")
    c = chunks.shape[1] - 1
    return has_next & ~np.any(np.asarray(chunks[chunk_ids, :c]) == eos_id, axis=-1)


def neighbor_tokens(
    chunks: np.ndarray,
    chunk_ids: np.ndarray,
    *,
    pad_id: int,
    doc_ids: np.ndarray | None = None,
    eos_id: int | None = None,
) -> np.ndarray:
    """``chunk_ids (...)`` (-1: none) -> int64 ``(..., 2 * chunk_size)``: each chunk and its continuation.

    ``chunks (num_chunks, chunk_size + 1)``; document boundaries from ``doc_ids (num_chunks,)``, or from
    ``eos_id`` for files without document ids (module docstring).
    """
    chunk_ids = np.asarray(chunk_ids, dtype=np.int64)
    n, c = chunks.shape[0], chunks.shape[1] - 1
    out = np.full((*chunk_ids.shape, 2 * c), pad_id, dtype=np.int64)
    if n == 0:
        return out
    flat = chunk_ids.reshape(-1)
    valid = flat >= 0
    if np.any(flat >= n):
        raise IndexError(f"chunk ids must be in -1..{n - 1}, got {int(flat.max())}")
    safe = np.where(valid, flat, 0)
    continues = valid & next_in_document(chunks, safe, doc_ids=doc_ids, eos_id=eos_id)
    rows = out.reshape(-1, 2 * c)
    rows[:, :c] = np.where(valid[:, None], chunks[safe, :c], pad_id)
    rows[:, c:] = np.where(continues[:, None], chunks[np.minimum(safe + 1, n - 1), :c], pad_id)
    return out


def open_at_least(path: str | os.PathLike, shape: tuple[int, ...], what: str) -> np.ndarray:
    """Read-only int32 memmap of ``shape`` at the start of ``path``; refuses a file too small for it.

    retro-pytorch grows its files (it opens them ``r+``), so a larger file is accepted.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist")
    needed = math.prod(shape) * 4
    if path.stat().st_size < needed:
        raise ValueError(
            f"{what} file {path} holds {path.stat().st_size} bytes, fewer than the {needed} of an int32 "
            f"array of shape {shape}; check num_chunks / chunk_size / num_neighbors / num_sequences"
        )
    if needed == 0:
        return np.empty(shape, dtype=np.int32)
    return np.memmap(path, dtype=np.int32, mode="r", shape=shape)


class ChunkStore:
    """The arrays of a database that training reads, opened read-only and lazily (so that DataLoader
    workers reopen them instead of pickling them).

    ``chunks (num_chunks, chunk_size + 1)``, ``knn (num_chunks, num_neighbors)``, ``seqs
    (num_sequences,)`` and, when the files have them, ``doc_ids (num_chunks,)``.
    """

    def __init__(
        self,
        files: dict[str, tuple[Path, tuple[int, ...]]],
        *,
        pad_id: int,
        eos_id: int,
        arrays: dict[str, np.ndarray] | None = None,
    ) -> None:
        self.files = files
        self.pad_id, self.eos_id = int(pad_id), int(eos_id)
        self._arrays = arrays
        self._open()  # fail early on missing or short files

    @classmethod
    def from_files(
        cls,
        *,
        num_chunks: int,
        chunk_size: int,
        num_sequences: int,
        num_neighbors: int,
        chunks: str | os.PathLike,
        knn: str | os.PathLike,
        seqs: str | os.PathLike,
        pad_id: int,
        eos_id: int,
    ) -> ChunkStore:
        """retro-pytorch's three files (no document ids: boundaries come from ``eos_id``)."""
        shape = partial(format.array_shape, chunk_size=chunk_size, num_neighbors=num_neighbors)
        files = {
            "chunks": (Path(chunks), shape(CHUNKS_FILE, num_chunks)),
            "knn": (Path(knn), shape(KNN_FILE, num_chunks)),
            "seqs": (Path(seqs), shape(SEQS_FILE, num_sequences)),
        }
        return cls(files, pad_id=pad_id, eos_id=eos_id)

    @classmethod
    def from_directory(cls, path: str | os.PathLike) -> ChunkStore:
        """The files of the database directory ``path``, shapes and ids from its ``manifest.json``, read
        as ``RetrievalDatabase.open`` reads it (format version, seal) and its counts checked."""
        path = Path(path)
        manifest_path = path / MANIFEST_FILE
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{path} is not a retrieval database: {manifest_path} is missing")
        manifest = format.read_manifest(path)
        format.check_counts(manifest, path)
        shapes = format.array_shapes(
            num_chunks=manifest["num_chunks"],
            chunk_size=manifest["chunk_size"],
            num_neighbors=manifest["num_neighbors"],
            num_seqs=manifest["num_seqs"],
        )
        files = {
            name: (format.resolve(path, manifest, file), tuple(shapes[file]))
            for name, file in (("chunks", CHUNKS_FILE), ("knn", KNN_FILE), ("seqs", SEQS_FILE))
        }
        doc_ids = format.resolve(path, manifest, DOC_IDS_FILE)
        if doc_ids.is_file():
            files["doc_ids"] = (doc_ids, tuple(shapes[DOC_IDS_FILE]))
        store = cls(files, pad_id=manifest["pad_id"], eos_id=manifest["eos_id"])
        store.manifest = manifest
        return store

    @classmethod
    def of_database(cls, db: Any) -> ChunkStore:
        """The arrays of an open ``RetrievalDatabase``, shared with it (reopened from files if pickled)."""
        files = {
            "chunks": (db.file(CHUNKS_FILE), tuple(db.chunks.shape)),
            "knn": (db.file(KNN_FILE), tuple(db.knn.shape)),
            "seqs": (db.file(SEQS_FILE), tuple(db.seqs.shape)),
            "doc_ids": (db.file(DOC_IDS_FILE), tuple(db.doc_ids.shape)),
        }
        arrays = {"chunks": db.chunks, "knn": db.knn, "seqs": db.seqs, "doc_ids": db.doc_ids}
        store = cls(files, pad_id=db.pad_id, eos_id=db.eos_id, arrays=arrays)
        store.manifest = db.manifest
        return store

    def _open(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            self._arrays = {name: open_at_least(p, shape, name) for name, (p, shape) in self.files.items()}
        return self._arrays

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_arrays": None}

    chunks = property(lambda self: self._open()["chunks"])
    knn = property(lambda self: self._open()["knn"])
    seqs = property(lambda self: self._open()["seqs"])
    doc_ids = property(lambda self: self._open().get("doc_ids"))
    num_chunks = property(lambda self: int(self.files["chunks"][1][0]))
    chunk_size = property(lambda self: int(self.files["chunks"][1][1]) - 1)
    num_neighbors = property(lambda self: int(self.files["knn"][1][1]))

    def retrieved_tokens(self, chunk_ids: np.ndarray) -> np.ndarray:
        """``(...)`` chunk ids -> ``(..., 2 * chunk_size)`` int64 (:func:`neighbor_tokens`)."""
        return neighbor_tokens(
            self.chunks, chunk_ids, pad_id=self.pad_id, doc_ids=self.doc_ids, eos_id=self.eos_id
        )
