"""``RetrievalDatabase``: open, read and search the on-disk retrieval database.

This module only opens and reads. The writers sit on top of it: the staged build
(``retlm.retrieval.build``, ``RetrievalDatabase.build``) and adding documents (``retlm.retrieval.add``,
``RetrievalDatabase.add``), both imported when called. The file names, shapes and the manifest's
schema are ``retlm.retrieval.format``'s.

Two tokenizers are involved, and the manifest records both (name, vocabulary size, vocabulary sha256):
the LM tokenizer, whose ids the chunks hold (GPT-2's byte-level BPE by default; ``tokenizer="bert"``: the
embedder's WordPiece, retro-pytorch's way), and the embedder's own tokenizer, which re-tokenizes each chunk's
text before embedding (``embedder_input="text"``). When both are the same vocabulary the embedder reads
the ids directly (``embedder_input="tokens"``), as retro-pytorch does.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MethodType
from typing import Any

import numpy as np
import torch

from retlm.errors import OptionError, check_int
from retlm.retrieval import format, integrity, preflight
from retlm.retrieval._storage import CorruptDatabaseError, open_memmap
from retlm.retrieval.embedding import Embedder, embed_token_chunks
from retlm.retrieval.format import BM25_FILES, BM25_WHOLE, TOKENIZER_DIR, has_dense
from retlm.retrieval.layout import neighbor_tokens
from retlm.retrieval.neighbors import search_excluding
from retlm.retrieval.sparse import make_searcher, query_inputs
from retlm.tokenization import DEFAULT_ALIASES, vocabulary_sha256
from retlm.tokenization import load_tokenizer as load_lm_tokenizer


class _BuildEntry:
    """``RetrievalDatabase.build``: ``classmethod(build_database)``, imported at first use. The writers
    sit on top of this reader, so it imports them only when one is called; the signature and docstring
    are the writer's."""

    def __get__(self, instance: Any, owner: type) -> Callable[..., Any]:
        from retlm.retrieval.build import build_database

        return MethodType(build_database, owner)


class _AddEntry:
    """``RetrievalDatabase.add``: ``add_documents`` as a method, imported at first use (as ``build``)."""

    def __get__(self, instance: Any, owner: type) -> Callable[..., Any]:
        from retlm.retrieval.add import add_documents

        return add_documents if instance is None else MethodType(add_documents, instance)


@dataclass
class SearchResult:
    """Neighbors of ``n`` queries: numpy ``chunk_ids, doc_ids (n, k)`` (-1: none), ``scores (n, k)``
    (the retriever's: cosine similarity for dense, BM25 score for bm25, fused reciprocal-rank score for
    hybrid; -inf: none), ``tokens (n, k, 2 * chunk_size)`` (neighbor + continuation, pad where
    none); ``n`` is the query batch shape. ``retrieved`` is ``tokens`` as a LongTensor; ``texts`` the
    decoded neighbors, a list per query (flattened batch)."""

    chunk_ids: np.ndarray
    doc_ids: np.ndarray
    scores: np.ndarray
    tokens: np.ndarray
    database: RetrievalDatabase

    @property
    def retrieved(self) -> torch.Tensor:
        return torch.from_numpy(self.tokens).long()

    @property
    def texts(self) -> list[list[str]]:
        rows = self.chunk_ids.reshape(-1, self.chunk_ids.shape[-1])
        return [[self.database.chunk_text(int(i)) for i in row if i >= 0] for row in rows]

    @property
    def doc_names(self) -> list[list[str]]:
        """The source document name of each neighbor, a list per query (flattened batch), as ``texts``."""
        rows = self.doc_ids.reshape(-1, self.doc_ids.shape[-1])
        return [[self.database.doc_name(int(d)) for d in row if d >= 0] for row in rows]

    def __len__(self) -> int:
        return len(self.chunk_ids)


class RetrievalDatabase:
    """A directory of memmaps, a faiss index and ``manifest.json`` (layout in docs/retrieval.md)."""

    def __init__(self, path: str | os.PathLike, manifest: dict[str, Any]):
        self.path = Path(path)
        self.manifest = manifest
        arrays = {
            name: open_memmap(self.file(name), format.array_dtype(name, manifest), tuple(shape))
            for name, shape in format.manifest_shapes(manifest).items()
        }
        self.chunks, self.doc_ids = arrays[format.CHUNKS_FILE], arrays[format.DOC_IDS_FILE]
        self.seqs, self.knn = arrays[format.SEQS_FILE], arrays[format.KNN_FILE]
        self.embeddings = arrays.get(format.EMBEDDINGS_FILE)  # dense and hybrid only
        self._index_handle = None  # the open index file, read (and checked) by open() or at first use
        self._names_handle = None  # doc_names.jsonl, opened by open(), read and checked at first use
        self._index = None
        self._searcher = None
        self._embedder = None
        self._embed_backend: str | None = None  # a backend the caller chose over the manifest's
        self._tokenizer = None
        self._doc_names: list[str] | None = None

    # ------------------------------------------------------------------ properties
    chunk_size = property(lambda self: int(self.manifest["chunk_size"]))
    num_chunks = property(lambda self: int(self.manifest["num_chunks"]))
    num_docs = property(lambda self: int(self.manifest["num_docs"]))
    num_neighbors = property(lambda self: int(self.manifest["num_neighbors"]))
    seq_len = property(lambda self: int(self.manifest["seq_len"]))
    pad_id = property(lambda self: int(self.manifest["pad_id"]))
    eos_id = property(lambda self: int(self.manifest["eos_id"]))
    tokenizer_name = property(lambda self: str(self.manifest["tokenizer"]["name"]))
    embedder_input = property(
        lambda self: str(self.manifest["embedder_input"]),
        doc="``'text'``: chunks are embedded from their text; ``'tokens'``: from ids.",
    )
    neighbors = property(lambda self: self.knn, doc="The precomputed ``(num_chunks, num_neighbors)`` array.")
    retriever = property(
        lambda self: format.retriever_of(self.manifest), doc="``'dense'``, ``'bm25'`` or ``'hybrid'``."
    )

    @property
    def embed_backend(self) -> str:
        """The embed backend queries go through: the one that embedded the chunks (the manifest's;
        ``torch`` for databases built before backends existed), unless ``open`` was given another."""
        return self._embed_backend or self.manifest.get("embed_backend", "torch")

    def __len__(self) -> int:
        return self.num_chunks

    def file(self, name: str) -> Path:
        """The file that holds logical file ``name`` (``chunks.dat``, ...) now; ``add()`` renames them."""
        return format.resolve(self.path, self.manifest, name)

    def __repr__(self) -> str:
        m = self.manifest
        return (
            f"RetrievalDatabase({str(self.path)!r}, chunks={m['num_chunks']}, docs={m['num_docs']}, "
            f"chunk_size={m['chunk_size']}, k={m['num_neighbors']}, index={m['index_type']!r})"
        )

    @property
    def tokenizer(self):
        """The LM tokenizer saved with the database (whose ids the chunks hold), checked against the
        vocabulary hash in the manifest."""
        if self._tokenizer is None:
            integrity.verify_tokenizer(self.path, self.manifest)  # its files, before they are parsed
            tokenizer = load_lm_tokenizer(str(self.path / TOKENIZER_DIR))
            expected = self.manifest["tokenizer"]["sha256"]
            if vocabulary_sha256(tokenizer) != expected:
                raise CorruptDatabaseError(
                    f"{self.path / TOKENIZER_DIR} does not hold the vocabulary recorded in manifest.json "
                    f"(sha256 {expected[:12]}...); the database's tokenizer folder was modified"
                )
            self._tokenizer = tokenizer
        return self._tokenizer

    def doc_name(self, doc_id: int) -> str:
        """The name of document ``doc_id``: its file's path relative to the source folder, or ``doc-<i>``."""
        if self._doc_names is None:  # read whole, so checked whole (through the handle open() kept)
            if self._names_handle is None:
                self._names_handle = integrity.open_handle(self.path, self.manifest, format.NAMES_FILE)
            self._doc_names = integrity.read_doc_names(self.path, self.manifest, self._names_handle)
            self._names_handle.close()
        return self._doc_names[doc_id]

    def embed_chunks(self, tokens: np.ndarray) -> np.ndarray:
        """``(n, chunk_size)`` LM token chunks -> unit-norm ``(n, dim)`` vectors, as the index's keys were
        made (re-tokenized text, or the ids themselves; see ``embedder_input``)."""
        lm_tokenizer = self.tokenizer if self.embedder_input == "text" else None
        return embed_token_chunks(self.embedder, tokens, self.pad_id, lm_tokenizer)

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:  # a name the manifest gives is looked up locally, never downloaded
            name = self.manifest["embedder"]
            folder = preflight.resolve_local_model(name, f"{self.path}: embedder")
            local = name in DEFAULT_ALIASES or Path(name).expanduser().is_dir()
            self._embedder = Embedder(
                name if local else folder, self.manifest["pooling"], backend=self.embed_backend
            )
        return self._embedder

    @property
    def searcher(self):
        """What ``search`` and the neighbor stage query: the faiss index (dense), the BM25 index (bm25) or
        both fused (hybrid); see ``retlm.retrieval.sparse``."""
        if self._searcher is None:
            if self.retriever == "dense":
                return self.index
            integrity.check_whole(self.path, self.manifest, BM25_WHOLE)
            files = {name: format.file_map(self.manifest)[name] for name in BM25_FILES}
            dense = self.index if has_dense(self.retriever) else None
            self._searcher = make_searcher(self.retriever, dense, self.path, files)
        return self._searcher

    @property
    def index(self):
        if self._index is None:
            if self._index_handle is None:
                self._index_handle = integrity.open_index_handle(self.path, self.manifest)
            m = self.manifest
            self._index = integrity.read_index_verified(
                self.path, m, self._index_handle, m.get("nprobe"), m.get("k_factor")
            )
            self._index_handle.close()
        return self._index

    # ------------------------------------------------------------------ open / build
    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        *,
        tokenizer: str | None = None,
        embedder: str | None = None,
        verify: bool = True,
        read_index: bool = True,
        embed_backend: str | None = None,
    ) -> RetrievalDatabase:
        """Open a built database, checking its manifest, file sizes and (``verify``) sha256 checksums.

        Every open checks the manifest's seal and fields, the size and sampled digest of every array
        file, and reads ``index.faiss`` into memory, comparing its sha256 before faiss parses it (see
        ``retlm.retrieval.integrity``); ``verify`` also hashes every array file whole. ``read_index=False``
        (training, which reads only the precomputed neighbors) leaves the index to its first use, where
        it is read and checked the same way. ``tokenizer`` / ``embedder``: names the caller expects; a
        database built with others is refused. ``embed_backend``: embed queries with this backend
        instead of the one that embedded the chunks (a ``UserWarning`` says so: the vectors then differ
        slightly from the database's). A reader racing an ``add()`` of another process sees the
        old or the new state: it retries when the manifest it read was replaced under it.
        """
        path = Path(path)
        manifest_file = path / format.MANIFEST_FILE
        for attempt in range(5):
            if not manifest_file.is_file():
                unfinished = (path / format.BUILD_FILE).exists()
                hint = " (its build has not finished: re-run build-db)" if unfinished else ""
                raise CorruptDatabaseError(f"not a retrieval database: {manifest_file} is missing{hint}")
            before = os.stat(manifest_file)
            try:
                manifest = format.read_manifest(path)  # format version and seal
                db = cls._open_once(path, manifest, tokenizer, embedder, verify, read_index)
                db._choose_backend(embed_backend)
                return db
            except (CorruptDatabaseError, FileNotFoundError) as err:
                # an add() that published a new manifest deletes the old generation's files, possibly
                # between our reading the manifest and opening (or hashing) one of its files
                changed = not manifest_file.is_file() or not integrity.same_file(
                    before, os.stat(manifest_file)
                )
                if changed and attempt < 4:
                    continue
                if isinstance(err, FileNotFoundError):
                    raise CorruptDatabaseError(f"{path}: {err.filename} is missing") from err
                raise
        raise AssertionError("unreachable")

    @classmethod
    def _open_once(
        cls,
        path: Path,
        manifest: dict[str, Any],
        tokenizer: str | None,
        embedder: str | None,
        verify: bool,
        read_index: bool,
    ) -> RetrievalDatabase:
        format.check_manifest(manifest, path)
        for what, wanted, stored in (
            ("tokenizer", tokenizer, manifest["tokenizer"]["name"]),
            ("embedder", embedder, manifest["embedder"]),
        ):
            if wanted is not None and str(wanted) != str(stored):
                raise ValueError(f"{path} was built with {what} {stored!r}, not {wanted!r}")
        db = cls(path, manifest)  # checks every file's size
        integrity.check_samples(path, manifest)
        if has_dense(db.retriever):  # kept: an add() may replace it
            db._index_handle = integrity.open_index_handle(path, manifest)
        db._names_handle = integrity.open_handle(path, manifest, format.NAMES_FILE)
        if read_index:
            db.searcher  # noqa: B018  (read, checked against its sha256, parsed)
        if verify:
            integrity.check_full(path, manifest)
        return db

    build = _BuildEntry()  # classmethod(retlm.retrieval.build.build_database), imported when used

    def _choose_backend(self, embed_backend: str | None) -> None:
        from retlm.retrieval.encoders import check_backend

        stored = self.manifest.get("embed_backend", "torch")
        if embed_backend is None or embed_backend == stored:
            return
        check_backend(embed_backend)
        if has_dense(self.retriever):
            warnings.warn(
                f"{self.path} was embedded with embed backend {stored!r}; its queries now go through "
                f"{embed_backend!r}, whose vectors differ slightly from the database's",
                UserWarning,
                stacklevel=3,
            )
        self._embed_backend = embed_backend

    # ------------------------------------------------------------------ reading
    def chunk_tokens(self, chunk_id: int) -> np.ndarray:
        """The real (unpadded) tokens of one chunk."""
        row = np.asarray(self.chunks[chunk_id, : self.chunk_size])
        return row[row != self.pad_id]

    def chunk_text(self, chunk_id: int) -> str:
        """The decoded text of chunk ``chunk_id`` (special tokens removed)."""
        return self.tokenizer.decode(self.chunk_tokens(chunk_id).tolist(), skip_special_tokens=True)

    def retrieved_tokens(self, chunk_ids: np.ndarray) -> np.ndarray:
        """``(...)`` chunk ids -> ``(..., 2 * chunk_size)`` int64: each chunk and its continuation.

        The continuation is the next chunk of the same document, or padding after a document's last
        chunk; an id of -1 gives all padding (:func:`retlm.retrieval.layout.neighbor_tokens`, the one
        implementation that training and generation share).
        """
        return neighbor_tokens(self.chunks, chunk_ids, pad_id=self.pad_id, doc_ids=self.doc_ids)

    def retrieved_for_chunks(self, chunk_ids: np.ndarray) -> np.ndarray:
        """``(...)`` training chunk ids -> ``(..., num_neighbors, 2 * chunk_size)``, from knn.dat."""
        chunk_ids = np.asarray(chunk_ids, dtype=np.int64)
        return self.retrieved_tokens(
            np.asarray(self.knn[chunk_ids.reshape(-1)]).reshape(*chunk_ids.shape, self.num_neighbors)
        )

    # ------------------------------------------------------------------ search
    def query_chunks(self, queries: Sequence[str] | np.ndarray | torch.Tensor) -> np.ndarray:
        """Texts (first ``chunk_size`` tokens of each) or token chunks ``(..., width <= chunk_size)`` ->
        int64 ``(..., chunk_size)`` (a list of texts gives ``(batch, chunk_size)``)."""
        c = self.chunk_size
        if isinstance(queries, str):
            queries = [queries]
        if isinstance(queries, torch.Tensor | np.ndarray):
            tokens = np.asarray(
                queries.cpu() if isinstance(queries, torch.Tensor) else queries, dtype=np.int64
            )
            if tokens.ndim < 2 or tokens.shape[-1] > c:
                raise ValueError(
                    f"token queries must be (..., chunk_size={c}), got shape {tuple(tokens.shape)}"
                )
            pad = [(0, 0)] * (tokens.ndim - 1) + [(0, c - tokens.shape[-1])]
            return np.pad(tokens, pad, constant_values=self.pad_id)
        ids = self.tokenizer(
            list(queries), add_special_tokens=False, return_attention_mask=False, verbose=False
        )["input_ids"]
        tokens = np.full((len(ids), c), self.pad_id, dtype=np.int64)
        for row, query in zip(tokens, ids, strict=True):
            row[: min(c, len(query))] = query[:c]
        return tokens

    def search(
        self,
        queries: Sequence[str] | np.ndarray | torch.Tensor,
        k: int,
        exclude_doc_ids: int | Sequence[int] | np.ndarray | None = None,
    ) -> SearchResult:
        """The ``k`` nearest chunks of each query: texts, or LM token chunks ``(..., chunk_size)`` (padded
        with ``pad_id``).

        A text query is cut to its first ``chunk_size`` LM tokens: queries are chunks, as in RETRO. Queries
        are embedded as the database's chunks were (``embed_chunks``). Token
        chunks ``(batch, n_chunks, chunk_size)`` give ``tokens (batch, n_chunks, k, 2 * chunk_size)``, the
        ``retrieved`` input of RETRO. ``exclude_doc_ids``: one document id for all queries, or one per
        query (shape of the query batch; -1: none), whose chunks are skipped.
        """
        self.check_k(k)
        texts = not isinstance(queries, torch.Tensor | np.ndarray)
        if texts:
            queries = [queries] if isinstance(queries, str) else list(queries)
            _check_query_texts(queries)
        tokens = self.query_chunks(queries)
        if texts and len(tokens) and (tokens == self.pad_id).all(axis=-1).any():
            empty = int(np.flatnonzero((tokens == self.pad_id).all(axis=-1))[0])
            raise OptionError(f"query {empty} holds no token (an empty or blank query): give some text")
        lead = tokens.shape[:-1]
        tokens = tokens.reshape(-1, self.chunk_size)
        nq = len(tokens)
        exclude = None
        if exclude_doc_ids is not None:
            exclude = np.broadcast_to(np.asarray(exclude_doc_ids, dtype=np.int64), lead).reshape(-1)
            bad = exclude[(exclude < -1) | (exclude >= max(self.num_docs, 1))]
            if len(bad):
                raise OptionError(
                    f"exclude_doc_ids must be document ids in 0..{self.num_docs - 1} (or -1: none), "
                    f"got {int(bad[0])}"
                )
        if self.num_chunks == 0 or nq == 0:
            ids = np.full((nq, k), -1, dtype=np.int64)
            scores = np.full((nq, k), -np.inf, dtype=np.float32)
        else:
            inputs = query_inputs(self.retriever, tokens, self.tokenizer, self.pad_id, self.embed_chunks)
            ids, scores = search_excluding(
                self.searcher, inputs, k, self.doc_ids, exclude, self.manifest.get("extra_neighbors", 10)
            )
        doc_ids = np.full(ids.shape, -1, dtype=np.int64)
        if self.num_chunks:
            doc_ids = np.where(ids >= 0, np.asarray(self.doc_ids)[np.maximum(ids, 0)], -1).astype(np.int64)
        ids, doc_ids, scores = (a.reshape(*lead, k) for a in (ids, doc_ids, scores))
        return SearchResult(ids, doc_ids, scores, self.retrieved_tokens(ids), self)

    def check_k(self, k: Any, what: str = "k") -> None:
        """Refuse a neighbor count the database cannot serve: ``1 <= k <= max(num_chunks,
        num_neighbors)`` (a larger ``k`` would only allocate room for ``-1`` entries)."""
        check_int(what, int(k) if isinstance(k, np.integer) else k)
        limit = max(self.num_chunks, self.num_neighbors)
        if k > limit:
            raise OptionError(
                f"{what} must be at most {limit}: the database {self.path} holds {self.num_chunks} chunks, "
                f"got {k}"
            )

    # ------------------------------------------------------------------ add
    add = _AddEntry()  # retlm.retrieval.add.add_documents as a method, imported when used


def _check_query_texts(queries: list[Any]) -> None:
    for i, query in enumerate(queries):
        if not isinstance(query, str):
            raise OptionError(f"query {i} must be a string, got {type(query).__name__}")
        try:
            query.encode("utf-8")
        except UnicodeEncodeError:
            raise OptionError(f"query {i} is not valid UTF-8 text") from None
