"""``RetrievalDatabase``: build, open, extend and search the on-disk retrieval database.

A build runs five stages, each resumable and each leaving its files complete or absent:

    chunk      documents -> chunks.dat, doc_ids.dat, seqs.dat, doc_names.jsonl
               (+ tokenizer/, the LM tokenizer)                                 one job
    embed      chunk rows -> embeddings.dat                                     shardable (--shard i/n)
    index      embeddings (merging the shards) -> index.faiss, nprobe tuned    one job
    neighbors  every chunk's k neighbours -> knn.dat                            shardable (--shard i/n)
    finalize   merge knn shards, checksums -> manifest.json                     one job

``stage="all"`` runs them in order in one process. ``manifest.json`` is written last: a directory with
a manifest is a complete database.

Two tokenizers are involved, and the manifest records both (name, vocabulary size, vocabulary sha256):
the LM tokenizer, whose ids the chunks hold (GPT-2's byte-level BPE by default; ``tokenizer="bert"``: the
embedder's WordPiece, the seed's way), and the embedder's own tokenizer, which re-tokenizes each chunk's
text before embedding (``embedder_input="text"``). When both are the same vocabulary the embedder reads
the ids directly (``embedder_input="tokens"``), as the seed does.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from retlm.errors import OptionError
from retlm.integrity import seal
from retlm.locking import writer_lock
from retlm.retrieval import integrity, preflight
from retlm.retrieval._storage import (
    CorruptDatabaseError,
    is_complete,
    open_memmap,
    read_json,
    sha256_file,
    write_json,
)
from retlm.retrieval.chunking import Document, SkipReport, iter_documents, validate_sizes, write_chunks
from retlm.retrieval.embedding import _DEFAULT_ALIASES as DEFAULT_ALIASES
from retlm.retrieval.embedding import (
    DEFAULT_EMBEDDER,
    POOLINGS,
    Embedder,
    chunk_texts,
    embed_rows,
    embed_token_chunks,
    embedder_max_length,
    load_tokenizer,
    resolve_model_path,
)
from retlm.retrieval.index import (
    EXACT_THRESHOLD,
    Tuning,
    build_index,
    choose_factory,
    read_index,
    tune_search,
    write_index,
)
from retlm.retrieval.layout import neighbour_tokens
from retlm.retrieval.neighbors import compute_neighbors, merge_new_neighbors, search_excluding
from retlm.tokenization import GPT2, describe, special_ids, vocabulary_sha256
from retlm.tokenization import load_tokenizer as load_lm_tokenizer

FORMAT_VERSION = 2  # 2: LM tokenizer and embedder tokenizer recorded apart, document names
STAGES = ("chunk", "embed", "index", "neighbors", "finalize")
SHARDED_STAGES = ("embed", "neighbors")
ENGINES = ("local", "ray")
EMBEDDING_DTYPES = ("float16", "float32")
DATA_FILES = (
    "chunks.dat",
    "doc_ids.dat",
    "seqs.dat",
    "doc_names.jsonl",
    "embeddings.dat",
    "knn.dat",
    "index.faiss",
)
CHUNK_FILES = ("chunks.dat", "doc_ids.dat", "seqs.dat", "doc_names.jsonl")
LOCK_FILE = ".lock"  # held by every writer of the database (build stages, add); see retlm.locking


@dataclass(frozen=True)
class BuildConfig:
    """Every build option that changes the database's content."""

    chunk_size: int = 64
    num_neighbors: int = 2
    seq_len: int = 512
    tokenizer: str = GPT2  # the LM tokenizer: "gpt2", "bert" (the embedder's WordPiece) or a folder
    embedder: str = DEFAULT_EMBEDDER
    pooling: str = "mean"
    embedding_dtype: str = "float16"
    batch_size: int = 128
    index_factory: str | None = None
    exact_threshold: int = EXACT_THRESHOLD
    target_recall: float = 0.95
    extra_neighbors: int = 10

    def validate(self) -> None:
        validate_sizes(self.chunk_size, self.seq_len)
        if not isinstance(self.tokenizer, str) or not self.tokenizer:
            raise ValueError(
                f"tokenizer must be 'gpt2', 'bert' or a tokenizer folder, got {self.tokenizer!r}"
            )
        if not isinstance(self.num_neighbors, int) or self.num_neighbors <= 0:
            raise ValueError(f"num_neighbors must be a positive integer, got {self.num_neighbors!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.embedding_dtype not in EMBEDDING_DTYPES:
            raise ValueError(
                f"embedding_dtype must be one of {EMBEDDING_DTYPES}, got {self.embedding_dtype!r}"
            )
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size!r}")
        if not 0 < self.target_recall <= 1:
            raise ValueError(f"target_recall must be in (0, 1], got {self.target_recall!r}")
        if self.extra_neighbors < 0:
            raise ValueError(f"extra_neighbors must be >= 0, got {self.extra_neighbors!r}")


def parse_shard(shard: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """``"i/n"`` or ``(i, n)`` -> ``(i, n)`` with ``0 <= i < n``."""
    if shard is None:
        return None
    try:
        i, n = (
            (int(x) for x in shard.split("/")) if isinstance(shard, str) else (int(shard[0]), int(shard[1]))
        )
    except (ValueError, TypeError, IndexError):
        raise ValueError(f"shard must look like 'i/n' (e.g. '0/4'), got {shard!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"shard i/n needs 0 <= i < n, got {i}/{n}")
    return i, n


def shard_rows(num_rows: int, shard: tuple[int, int] | None, align: int = 1) -> tuple[int, int]:
    """Rows ``lo:hi`` of shard ``(i, n)``; inner boundaries are multiples of ``align`` (a batch size), so a
    sharded stage runs the same batches as an unsharded one and writes the same bytes."""
    if shard is None:
        return 0, num_rows
    i, n = shard

    def boundary(j: int) -> int:
        return num_rows if j == n else j * num_rows // n // align * align

    return boundary(i), boundary(i + 1)


@dataclass
class SearchResult:
    """Neighbours of ``n`` queries: numpy ``chunk_ids, doc_ids (n, k)`` (-1: none), ``scores (n, k)``
    (cosine similarity, -inf: none), ``tokens (n, k, 2 * chunk_size)`` (neighbour + continuation, pad where
    none); ``n`` is the query batch shape. ``retrieved`` is ``tokens`` as a LongTensor; ``texts`` the
    decoded neighbours, a list per query (flattened batch)."""

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
        """The source document name of each neighbour, a list per query (flattened batch), as ``texts``."""
        rows = self.doc_ids.reshape(-1, self.doc_ids.shape[-1])
        return [[self.database.doc_name(int(d)) for d in row if d >= 0] for row in rows]

    def __len__(self) -> int:
        return len(self.chunk_ids)


class RetrievalDatabase:
    """A directory of memmaps, a faiss index and ``manifest.json`` (layout in docs/retrieval.md)."""

    def __init__(self, path: str | os.PathLike, manifest: dict[str, Any]):
        self.path = Path(path)
        self.manifest = manifest
        c, k = manifest["chunk_size"], manifest["num_neighbors"]
        n = manifest["num_chunks"]
        self.chunks = open_memmap(self.file("chunks.dat"), "int32", (n, c + 1))
        self.doc_ids = open_memmap(self.file("doc_ids.dat"), "int32", (n,))
        self.seqs = open_memmap(self.file("seqs.dat"), "int32", (manifest["num_seqs"],))
        self.knn = open_memmap(self.file("knn.dat"), "int32", (n, k))
        self.embeddings = open_memmap(
            self.file("embeddings.dat"), manifest["embedding_dtype"], (n, manifest["embedding_dim"])
        )
        self._index_handle = None  # the open index file, read (and checked) by open() or at first use
        self._names_handle = None  # doc_names.jsonl, opened by open(), read and checked at first use
        self._index = None
        self._embedder = None
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

    def __len__(self) -> int:
        return self.num_chunks

    def file(self, name: str) -> Path:
        """The file that holds logical file ``name`` (``chunks.dat``, ...) now; ``add()`` renames them."""
        return integrity.resolve(self.path, self.manifest, name)

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
            tokenizer = load_lm_tokenizer(str(self.path / "tokenizer"))
            expected = self.manifest["tokenizer"]["sha256"]
            if vocabulary_sha256(tokenizer) != expected:
                raise CorruptDatabaseError(
                    f"{self.path / 'tokenizer'} does not hold the vocabulary recorded in manifest.json "
                    f"(sha256 {expected[:12]}...); the database's tokenizer folder was modified"
                )
            self._tokenizer = tokenizer
        return self._tokenizer

    def doc_name(self, doc_id: int) -> str:
        """The name of document ``doc_id``: its file's path relative to the source folder, or ``doc-<i>``."""
        if self._doc_names is None:  # read whole, so checked whole (through the handle open() kept)
            if self._names_handle is None:
                self._names_handle = integrity.open_handle(self.path, self.manifest, integrity.NAMES_FILE)
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
            self._embedder = Embedder(name if local else folder, self.manifest["pooling"])
        return self._embedder

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
    ) -> RetrievalDatabase:
        """Open a built database, checking its manifest, file sizes and (``verify``) sha256 checksums.

        Every open checks the manifest's seal and fields, the size and sampled digest of every array
        file, and reads ``index.faiss`` into memory, comparing its sha256 before faiss parses it (see
        ``retlm.retrieval.integrity``); ``verify`` also hashes every array file whole. ``read_index=False``
        (training, which reads only the precomputed neighbours) leaves the index to its first use, where
        it is read and checked the same way. ``tokenizer`` / ``embedder``: names the caller expects; a
        database built with others is refused. A reader racing an ``add()`` of another process sees the
        old or the new state: it retries when the manifest it read was replaced under it.
        """
        path = Path(path)
        manifest_file = path / "manifest.json"
        for attempt in range(5):
            if not manifest_file.is_file():
                hint = (
                    " (its build has not finished: re-run build-db)" if (path / "build.json").exists() else ""
                )
                raise CorruptDatabaseError(f"not a retrieval database: {manifest_file} is missing{hint}")
            before = os.stat(manifest_file)
            try:
                return cls._open_once(path, read_json(manifest_file), tokenizer, embedder, verify, read_index)
            except CorruptDatabaseError:
                changed = not manifest_file.is_file() or not integrity.same_file(
                    before, os.stat(manifest_file)
                )
                if not changed or attempt == 4:
                    raise
        raise AssertionError("unreachable")

    @classmethod
    def _open_once(
        cls,
        path: Path,
        manifest: Any,
        tokenizer: str | None,
        embedder: str | None,
        verify: bool,
        read_index: bool,
    ) -> RetrievalDatabase:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        if version == 1:
            raise CorruptDatabaseError(
                f"{path} was built by an older retlm (format_version 1: one WordPiece vocabulary, no "
                "document names); rebuild it with `retlm build-db` (`--tokenizer bert` for the same tokens)"
            )
        if version != FORMAT_VERSION:
            raise CorruptDatabaseError(
                f"{path / 'manifest.json'}: format_version {version!r}"
                f" is not supported (expected {FORMAT_VERSION})"
            )
        integrity.check_manifest(manifest, path)
        for what, wanted, stored in (
            ("tokenizer", tokenizer, manifest["tokenizer"]["name"]),
            ("embedder", embedder, manifest["embedder"]),
        ):
            if wanted is not None and str(wanted) != str(stored):
                raise ValueError(f"{path} was built with {what} {stored!r}, not {wanted!r}")
        db = cls(path, manifest)  # checks every file's size
        integrity.check_samples(path, manifest)
        db._index_handle = integrity.open_index_handle(path, manifest)  # kept: an add() may replace it
        db._names_handle = integrity.open_handle(path, manifest, "doc_names.jsonl")
        if read_index:
            db.index  # noqa: B018  (read, checked against its sha256, parsed)
        if verify:
            integrity.check_full(path, manifest)
        return db

    @classmethod
    def build(
        cls,
        source: str | os.PathLike | Iterable[str] | None,
        path: str | os.PathLike,
        *,
        chunk_size: int = 64,
        num_neighbors: int = 2,
        seq_len: int = 512,
        tokenizer: str = GPT2,
        embedder: str | None = None,
        pooling: str = "mean",
        batch_size: int = 128,
        embedding_dtype: str = "float16",
        index_factory: str | None = None,
        exact_threshold: int = EXACT_THRESHOLD,
        target_recall: float = 0.95,
        extra_neighbors: int = 10,
        glob: str = "**/*.txt",
        stage: str = "all",
        shard: str | tuple[int, int] | None = None,
        progress: bool = True,
        wait: bool = True,
        engine: str = "local",
        address: str | None = None,
        num_shards: int | None = None,
    ) -> RetrievalDatabase | None:
        """Build a database at ``path`` from ``source`` (a folder read with ``glob``, or strings).

        ``tokenizer``: the LM tokenizer, ``"gpt2"`` (GPT-2's byte-level BPE, the default), ``"bert"`` (the
        embedder's WordPiece for both, the seed's way) or a tokenizer folder. ``embedder``: the encoder
        that embeds each chunk (the bundled all-MiniLM-L6-v2 by default).

        Re-running a killed build resumes it, with byte-identical results. ``stage`` and ``shard`` run one
        stage (of ``STAGES``) over one shard ``"i/n"`` of the chunk range, for builds spread over jobs;
        the database is returned once ``finalize`` has run, else ``None``. ``engine="ray"`` runs every
        stage as Ray tasks over ``num_shards`` shards (default: the cluster's CPUs) on the cluster at
        ``address`` (default: the initialised or a new local one), with the same result
        (``retlm.retrieval.ray_build``; needs ``pip install 'retlm[ray]'``).

        Every option is checked before anything is written (``retlm.retrieval.preflight``: option ranges,
        the embedder's position limit, the faiss factory string, a source with some text, and the disk
        and memory the build needs). A build holds the database's lock (a sharded stage: its shard's);
        a second writer waits for it (``wait=False``: raises ``LockedError`` naming the holder's PID).
        A stage that fails with an exception removes what it wrote; a fresh build that fails in its first
        stage removes the folder (the Ray engine keeps what it wrote instead: re-running resumes it).
        """
        config = BuildConfig(
            chunk_size=chunk_size,
            num_neighbors=num_neighbors,
            seq_len=seq_len,
            tokenizer=tokenizer,
            embedder=embedder or DEFAULT_EMBEDDER,
            pooling=pooling,
            embedding_dtype=embedding_dtype,
            batch_size=batch_size,
            index_factory=index_factory,
            exact_threshold=exact_threshold,
            target_recall=target_recall,
            extra_neighbors=extra_neighbors,
        )
        try:
            shard = parse_shard(shard)
        except ValueError as err:
            raise OptionError(str(err)) from None
        if engine not in ENGINES:
            raise OptionError(f"engine must be one of {ENGINES}, got {engine!r}")
        if engine == "ray":
            if stage != "all" or shard is not None:
                raise OptionError("engine 'ray' runs every stage itself: it takes no stage or shard")
            if num_shards is not None and (not isinstance(num_shards, int) or num_shards <= 0):
                raise OptionError(f"num_shards must be a positive integer, got {num_shards!r}")
            from retlm.retrieval.ray_build import require_ray

            require_ray()  # the missing extra is named before anything is written
        elif address is not None or num_shards is not None:
            raise OptionError("address and num_shards apply to engine 'ray' only")
        if stage not in ("all", *STAGES):
            raise OptionError(f"stage must be 'all' or one of {STAGES}, got {stage!r}")
        if shard is not None and stage not in SHARDED_STAGES:
            raise OptionError(f"--shard applies to the stages {SHARDED_STAGES}, not {stage!r}")
        path = Path(path)
        preflight.check_build(source, path, config, stage, glob)  # before anything is written
        fresh = not path.exists() or not any(path.iterdir())
        if shard is None:
            lock, what = path / LOCK_FILE, f"database {path}"
        else:
            lock = path / "shards" / f".{stage}-{shard[0]:05d}-of-{shard[1]:05d}.lock"
            what = f"shard {shard[0]}/{shard[1]} of the {stage} stage of {path}"
        with writer_lock(lock, what=what, wait=wait):
            if engine == "ray":
                from retlm.retrieval.ray_build import build_with_ray

                return build_with_ray(
                    source, path, config, glob=glob, address=address, num_shards=num_shards, progress=progress
                )
            builder = _Builder(path, config, progress)
            if builder.finished():
                return cls.open(path, verify=False)
            stages = STAGES if stage == "all" else (stage,)
            for name in stages:
                chunked_before = (path / "chunking.json").is_file()
                try:
                    if name == "chunk":
                        builder.chunk(source, glob)
                        builder.check_chunked(source, glob)
                    elif name in SHARDED_STAGES:
                        getattr(builder, name)(shard)
                    else:
                        getattr(builder, name)()
                except Exception:
                    _remove_failed_stage(path, name, shard, fresh and not chunked_before, chunked_before)
                    raise
        return cls.open(path, verify=False) if "finalize" in stages else None

    # ------------------------------------------------------------------ reading
    def chunk_tokens(self, chunk_id: int) -> np.ndarray:
        """The real (unpadded) tokens of one chunk."""
        row = np.asarray(self.chunks[chunk_id, : self.chunk_size])
        return row[row != self.pad_id]

    def chunk_text(self, chunk_id: int) -> str:
        """The decoded text of chunk ``chunk_id`` (special tokens removed)."""
        return self.tokenizer.decode(self.chunk_tokens(chunk_id).tolist(), skip_special_tokens=True)

    decode = chunk_text

    def retrieved_tokens(self, chunk_ids: np.ndarray) -> np.ndarray:
        """``(...)`` chunk ids -> ``(..., 2 * chunk_size)`` int64: each chunk and its continuation.

        The continuation is the next chunk of the same document, or padding after a document's last
        chunk; an id of -1 gives all padding (:func:`retlm.retrieval.layout.neighbour_tokens`, the one
        implementation that training and generation share).
        """
        return neighbour_tokens(self.chunks, chunk_ids, pad_id=self.pad_id, doc_ids=self.doc_ids)

    def retrieved_for_chunks(self, chunk_ids: np.ndarray) -> np.ndarray:
        """``(...)`` training chunk ids -> ``(..., num_neighbors, 2 * chunk_size)``, from knn.dat."""
        chunk_ids = np.asarray(chunk_ids, dtype=np.int64)
        return self.retrieved_tokens(
            np.asarray(self.knn[chunk_ids.reshape(-1)]).reshape(*chunk_ids.shape, self.num_neighbors)
        )

    neighbours_for = retrieved_for_chunks

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
            vectors = self.embed_chunks(tokens)
            ids, scores = search_excluding(
                self.index, vectors, k, self.doc_ids, exclude, self.manifest.get("extra_neighbors", 10)
            )
        doc_ids = np.full(ids.shape, -1, dtype=np.int64)
        if self.num_chunks:
            doc_ids = np.where(ids >= 0, np.asarray(self.doc_ids)[np.maximum(ids, 0)], -1).astype(np.int64)
        ids, doc_ids, scores = (a.reshape(*lead, k) for a in (ids, doc_ids, scores))
        return SearchResult(ids, doc_ids, scores, self.retrieved_tokens(ids), self)

    def check_k(self, k: Any, what: str = "k") -> None:
        """Refuse a neighbour count the database cannot serve: ``1 <= k <= max(num_chunks,
        num_neighbors)`` (a larger ``k`` would only allocate room for ``-1`` entries)."""
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k <= 0:
            raise OptionError(f"{what} must be a positive integer, got {k!r}")
        limit = max(self.num_chunks, self.num_neighbors)
        if k > limit:
            raise OptionError(
                f"{what} must be at most {limit}: the database {self.path} holds {self.num_chunks} chunks, "
                f"got {k}"
            )

    # ------------------------------------------------------------------ add
    def add(
        self,
        docs: str | os.PathLike | Iterable[str],
        *,
        glob: str = "**/*.txt",
        progress: bool = False,
        wait: bool = True,
    ) -> RetrievalDatabase:
        """Append documents: embed only their chunks, add them to the index, update the neighbours.

        With an exact index the result equals a full rebuild; with an IVF index the existing lists are
        kept (no retraining), ``nprobe`` is re-tuned and every chunk's neighbours are recomputed.

        The database's lock is held throughout: a second writer waits (``wait=False``: ``LockedError``
        naming the holder's PID). The new files get new names and one atomic rename of
        ``manifest.json`` publishes them, so a reader (or a kill at any step) sees the old database or
        the new one, never a mix.
        """
        with writer_lock(self.path / LOCK_FILE, what=f"database {self.path}", wait=wait):
            current = RetrievalDatabase.open(self.path, verify=False)  # another writer may have added
            _Adder(current, progress).run(docs, glob)
        fresh = RetrievalDatabase.open(self.path, verify=False)
        self.__dict__.update(fresh.__dict__)
        return self


class _Builder:
    """The build stages over one database directory (see the module docstring)."""

    def __init__(self, path: Path, config: BuildConfig, progress: bool):
        self.path, self.config, self.progress = path, config, progress
        self.settings = asdict(config)
        self._lm_tokenizer = None
        path.mkdir(parents=True, exist_ok=True)
        self._check_settings()

    def _check_settings(self) -> None:
        for name in ("manifest.json", "build.json"):
            file = self.path / name
            if file.is_file():
                stored = read_json(file).get("build", {})
                changed = {
                    key: (stored.get(key), value)
                    for key, value in self.settings.items()
                    if stored.get(key) != value
                }
                if changed:
                    shown = ", ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changed.items())
                    raise ValueError(
                        f"{self.path} holds a database built with other settings ({shown}); "
                        "delete it or choose another path"
                    )
                return
        write_json(self.path / "build.json", {"build": self.settings})

    def finished(self) -> bool:
        return (self.path / "manifest.json").is_file()

    def chunking(self) -> dict[str, Any]:
        file = self.path / "chunking.json"
        if not file.is_file():
            raise RuntimeError(f"{self.path}: run the 'chunk' stage first (no chunking.json)")
        return read_json(file)

    def chunk_arrays(self):
        info = self.chunking()
        n, c = info["num_chunks"], self.config.chunk_size
        return (
            open_memmap(self.path / "chunks.dat", "int32", (n, c + 1)),
            open_memmap(self.path / "doc_ids.dat", "int32", (n,)),
        )

    # ---- stage 1
    def chunk(self, source, glob: str) -> None:
        if (self.path / "chunking.json").is_file():
            return
        if source is None:
            raise ValueError("the chunk stage needs a source (a folder or an iterable of strings)")
        report = SkipReport()
        docs = iter_documents(source, glob, report)  # raises on an empty folder before any work
        self.write_chunk_files(docs, report)

    def write_chunk_files(self, docs: Iterable[Document], report: SkipReport) -> None:
        """Tokenize and chunk ``docs`` into chunks.dat, doc_ids.dat, seqs.dat, doc_names.jsonl, tokenizer/
        and chunking.json."""
        tokenizer = load_lm_tokenizer(self.config.tokenizer, embedder=self.config.embedder)
        tokenizers = _tokenizers_entry(self.config, tokenizer)
        self._lm_tokenizer = tokenizer
        pad_id, eos_id = special_ids(tokenizer)
        tmp = {name: self.path / f".{name}.tmp" for name in CHUNK_FILES}
        with (
            open(tmp["chunks.dat"], "wb") as chunks,
            open(tmp["doc_ids.dat"], "wb") as doc_ids,
            open(tmp["seqs.dat"], "wb") as seqs,
            open(tmp["doc_names.jsonl"], "w", encoding="utf-8") as names,
            tqdm(desc="chunk", unit="chunk", disable=not self.progress) as bar,
        ):
            counts = write_chunks(
                docs,
                tokenizer,
                chunk_size=self.config.chunk_size,
                seq_len=self.config.seq_len,
                pad_id=pad_id,
                eos_id=eos_id,
                chunks_file=chunks,
                doc_ids_file=doc_ids,
                seqs_file=seqs,
                names_file=names,
                report=report,
                progress=bar,
            )
        report.warn()
        _save_tokenizer(tokenizer, self.path / "tokenizer")
        for name, file in tmp.items():
            os.replace(file, self.path / name)
        write_json(
            self.path / "chunking.json",
            {
                **asdict(counts),
                **tokenizers,
                "pad_id": int(pad_id),
                "eos_id": int(eos_id),
                "skipped_files": report.unreadable,
                "skipped_empty_docs": report.empty,
            },
        )

    def check_chunked(self, source, glob: str) -> None:
        """After chunking: a folder that gave no chunk is an error (naming what was skipped), and an IVF
        factory must have enough chunks to train on -- both before any embedding."""
        info = self.chunking()
        if info["num_chunks"] == 0 and isinstance(source, str | os.PathLike):
            raise preflight.empty_build_error(
                Path(source), glob, info.get("skipped_files", []), info.get("skipped_empty_docs", 0)
            )
        preflight.check_index_fits(self.config.index_factory, info["num_chunks"], self.config.num_neighbors)

    # ---- stage 2
    def embed(self, shard: tuple[int, int] | None) -> None:
        chunks, _ = self.chunk_arrays()
        if is_complete(self.path / "embeddings.dat"):
            return
        embedder = Embedder(self.config.embedder, self.config.pooling)
        out = self.path / "embeddings.dat" if shard is None else _shard_file(self.path, "embeddings", shard)
        embed_rows(
            embedder,
            chunks,
            out,
            dtype=self.config.embedding_dtype,
            batch_size=self.config.batch_size,
            pad_id=self.chunking()["pad_id"],
            rows=shard_rows(len(chunks), shard, self.config.batch_size),
            lm_tokenizer=self.lm_tokenizer(),
            progress=self.progress,
            desc="embed" if shard is None else f"embed {shard[0]}/{shard[1]}",
        )

    def lm_tokenizer(self):
        """The saved LM tokenizer when the embedder reads text, else None (it reads the ids)."""
        if self.chunking()["embedder_input"] != "text":
            return None
        if self._lm_tokenizer is None:
            self._lm_tokenizer = load_lm_tokenizer(str(self.path / "tokenizer"))
        return self._lm_tokenizer

    def embedding_dim(self) -> int:
        from transformers import AutoConfig

        return int(AutoConfig.from_pretrained(resolve_model_path(self.config.embedder)).hidden_size)

    def embeddings(self) -> np.ndarray:
        n = self.chunking()["num_chunks"]
        return open_memmap(
            self.path / "embeddings.dat", self.config.embedding_dtype, (n, self.embedding_dim())
        )

    # ---- stage 3
    def index(self) -> None:
        if (self.path / "index.json").is_file():
            return
        _merge_shards(self.path, "embeddings")
        embeddings = self.embeddings()
        factory = self.factory(embeddings)
        index = build_index(embeddings, factory, progress=self.progress)
        self.tune_and_write_index(index, factory)

    def factory(self, embeddings: np.ndarray) -> str:
        """The index type: the one asked for, or the default for this many embeddings."""
        n, dim = embeddings.shape
        return self.config.index_factory or choose_factory(n, self.config.exact_threshold, dim)

    def tune_and_write_index(self, index, factory: str) -> None:
        """Tune the search of a filled index for the neighbour stage, then write it and index.json."""
        k = self.config.num_neighbors
        tuning = tune_search(
            index, self.embeddings(), k, self.config.target_recall, fetch=k + self.config.extra_neighbors
        )
        write_index(index, self.path / "index.faiss")
        write_json(self.path / "index.json", {"index_type": factory, **tuning_info(tuning)})

    # ---- stage 4
    def neighbors(self, shard: tuple[int, int] | None) -> None:
        if not (self.path / "index.json").is_file():
            raise RuntimeError(f"{self.path}: run the 'index' stage first (no index.json)")
        if is_complete(self.path / "knn.dat"):
            return
        _, doc_ids = self.chunk_arrays()
        info = read_json(self.path / "index.json")
        index = read_index(self.path / "index.faiss", info["nprobe"], info.get("k_factor"))
        out = self.path / "knn.dat" if shard is None else _shard_file(self.path, "knn", shard)
        compute_neighbors(
            index,
            self.embeddings(),
            doc_ids,
            self.config.num_neighbors,
            out,
            rows=shard_rows(len(doc_ids), shard),
            extra=self.config.extra_neighbors,
            progress=self.progress,
            desc="neighbours" if shard is None else f"neighbours {shard[0]}/{shard[1]}",
        )

    # ---- stage 5
    def finalize(self) -> None:
        _merge_shards(self.path, "knn")
        chunking, index_info = self.chunking(), read_json(self.path / "index.json")
        chunks, _ = self.chunk_arrays()
        lm_tokenizer = self.lm_tokenizer()
        chunking["embedder_truncated_chunks"] = (
            0
            if lm_tokenizer is None
            else count_truncated_chunks(
                Embedder(self.config.embedder, self.config.pooling), lm_tokenizer, chunks, chunking["pad_id"]
            )
        )
        write_manifest(self.path, self.settings, chunking, index_info, self.embedding_dim())
        for name in ("build.json", "chunking.json", "index.json"):
            (self.path / name).unlink(missing_ok=True)
        shutil.rmtree(self.path / "shards", ignore_errors=True)


def tuning_info(tuning: Tuning) -> dict[str, Any]:
    """The tuned search settings as stored in index.json and the manifest."""
    return {
        "nprobe": tuning.nprobe,
        "k_factor": tuning.k_factor,
        "recall_at_k": tuning.recall,
        "recall_queries": tuning.num_queries,
    }


def write_manifest(
    path: Path,
    settings: dict[str, Any],
    chunking: dict[str, Any],
    index_info: dict[str, Any],
    embedding_dim: int,
    *,
    files: dict[str, str] | None = None,
    generation: int = 0,
) -> dict[str, Any]:
    """Write ``manifest.json`` (atomically, sealed with its own digest, see ``integrity``); ``files``
    maps each logical data file name to the file holding it (default: the same name)."""
    files = {name: name for name in DATA_FILES} | (files or {})
    c, k, n = settings["chunk_size"], settings["num_neighbors"], chunking["num_chunks"]
    manifest = {
        "format_version": FORMAT_VERSION,
        "tokenizer": {**chunking["tokenizer"], "path": "tokenizer"},
        "embedder": settings["embedder"],
        "embedder_tokenizer": chunking["embedder_tokenizer"],
        "embedder_input": chunking["embedder_input"],
        "embedder_truncated_chunks": chunking["embedder_truncated_chunks"],
        "pooling": settings["pooling"],
        "chunk_size": c,
        "num_chunks": n,
        "num_docs": chunking["num_docs"],
        "num_seqs": chunking["num_seqs"],
        "num_neighbors": k,
        "seq_len": settings["seq_len"],
        "pad_id": chunking["pad_id"],
        "eos_id": chunking["eos_id"],
        "embedding_dim": embedding_dim,
        "embedding_dtype": settings["embedding_dtype"],
        "index_type": index_info["index_type"],
        "nprobe": index_info["nprobe"],
        "k_factor": index_info.get("k_factor"),
        "extra_neighbors": settings["extra_neighbors"],
        "recall_at_k": index_info["recall_at_k"],
        "recall_queries": index_info["recall_queries"],
        "target_recall": settings["target_recall"],
        "shapes": {
            "chunks.dat": [n, c + 1],
            "doc_ids.dat": [n],
            "seqs.dat": [chunking["num_seqs"]],
            "knn.dat": [n, k],
            "embeddings.dat": [n, embedding_dim],
        },
        "skipped_files": chunking.get("skipped_files", []),
        "build": settings,
        "checksums": {name: sha256_file(path / files[name]) for name in DATA_FILES},
        "files": files,
        "generation": generation,
        "integrity": integrity.describe(path, files),
    }
    manifest = seal(manifest)
    write_json(path / "manifest.json", manifest)
    return manifest


def _generation_name(name: str, generation: int) -> str:
    """``chunks.dat`` -> ``chunks.g000003.dat``: the file of a data file written by the 3rd ``add()``."""
    stem, _, suffix = name.partition(".")
    return f"{stem}.g{generation:06d}.{suffix}"


def _remove_unreferenced(path: Path, manifest: dict[str, Any]) -> None:
    """Delete data files of other generations than the manifest's (a killed ``add()`` leaves some)."""
    keep = set(integrity.file_map(manifest).values())
    patterns = {
        name: re.compile(
            rf"{re.escape(name.partition('.')[0])}(\.g\d+)?\.{re.escape(name.partition('.')[2])}"
        )
        for name in DATA_FILES
    }
    for entry in path.iterdir():
        if entry.name not in keep and any(p.fullmatch(entry.name) for p in patterns.values()):
            entry.unlink(missing_ok=True)


def _tokenizers_entry(config: BuildConfig, lm_tokenizer) -> dict[str, Any]:
    """Both tokenizers' manifest entries, and how the embedder reads a chunk: ``"tokens"`` when the LM
    tokenizer is the embedder's own vocabulary (the ids are fed to it), else ``"text"``."""
    from transformers import AutoConfig

    lm = describe(lm_tokenizer, config.tokenizer)
    embedder_tokenizer = load_tokenizer(config.embedder)
    limit = embedder_max_length(
        config.embedder, AutoConfig.from_pretrained(resolve_model_path(config.embedder)), embedder_tokenizer
    )
    entry = {**describe(embedder_tokenizer, config.embedder), "max_length": limit}
    mode = "tokens" if lm["sha256"] == entry["sha256"] else "text"
    if mode == "tokens" and config.chunk_size + 2 > limit:
        raise ValueError(
            f"chunk_size must be at most {limit - 2} when the embedder reads the LM ids "
            f"(--tokenizer bert): {config.embedder} reads {limit} tokens with [CLS] and [SEP]"
        )
    return {"tokenizer": lm, "embedder_tokenizer": entry, "embedder_input": mode}


def count_truncated_chunks(
    embedder: Embedder,
    lm_tokenizer,
    chunks: np.ndarray,
    pad_id: int,
    rows: tuple[int, int] | None = None,
    block: int = 4096,
) -> int:
    """How many chunks of ``chunks[lo:hi]`` have a text longer than the embedder reads (it keeps their
    first ``max_length - 2`` WordPiece tokens)."""
    lo, hi = rows if rows is not None else (0, len(chunks))
    c = chunks.shape[1] - 1
    return sum(
        embedder.count_truncated(
            chunk_texts(lm_tokenizer, np.asarray(chunks[start : min(start + block, hi), :c]), pad_id)
        )
        for start in range(lo, hi, block)
    )


def _save_tokenizer(tokenizer, folder: Path) -> None:
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def _shard_file(path: Path, kind: str, shard: tuple[int, int]) -> Path:
    return path / "shards" / f"{kind}-{shard[0]:05d}-of-{shard[1]:05d}.dat"


def _remove_failed_stage(
    path: Path, stage: str, shard: tuple[int, int] | None, fresh: bool, chunked_before: bool
) -> None:
    """Delete what a stage that raised has written (its temporary, partial and progress files); a fresh
    build that fails while chunking leaves no folder."""
    if stage == "chunk" and fresh:
        shutil.rmtree(path, ignore_errors=True)
        return
    if shard is None:
        for tmp in path.glob(".*.tmp"):
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
    outputs = {"embed": "embeddings", "neighbors": "knn"}
    if stage in outputs:
        out = path / f"{outputs[stage]}.dat" if shard is None else _shard_file(path, outputs[stage], shard)
        for suffix in (".partial", ".progress"):
            out.with_name(out.name + suffix).unlink(missing_ok=True)
    elif stage == "chunk" and not chunked_before:
        for name in ("chunking.json", *CHUNK_FILES):
            (path / name).unlink(missing_ok=True)
        shutil.rmtree(path / "tokenizer", ignore_errors=True)


def _merge_shards(path: Path, kind: str) -> None:
    """Concatenate complete shard files ``shards/{kind}-i-of-n.dat`` into ``{kind}.dat`` (atomically)."""
    target = path / f"{kind}.dat"
    if is_complete(target):
        return
    files = sorted((path / "shards").glob(f"{kind}-*-of-*.dat"))
    if not files:
        raise RuntimeError(
            f"{path}: no {kind} found: run the '{'embed' if kind == 'embeddings' else 'neighbors'}' "
            "stage (for every shard) first"
        )
    counts = {f.stem.split("-of-")[1] for f in files}
    if len(counts) != 1:
        raise RuntimeError(f"{path / 'shards'}: {kind} shards of different shard counts: {sorted(counts)}")
    n = int(counts.pop())
    missing = [i for i in range(n) if not is_complete(_shard_file(path, kind, (i, n)))]
    if missing:
        raise RuntimeError(f"{path}: {kind} shards {missing} of {n} are not finished")
    tmp = path / f".{kind}.dat.tmp"
    with open(tmp, "wb") as out:
        for i in range(n):
            with open(_shard_file(path, kind, (i, n)), "rb") as part:
                shutil.copyfileobj(part, out, 1 << 24)
    os.replace(tmp, target)


class _Adder:
    """``RetrievalDatabase.add``: files are staged in ``.add/``, moved in, the manifest written last."""

    def __init__(self, db: RetrievalDatabase, progress: bool):
        self.db, self.progress = db, progress
        self.stage = db.path / ".add"

    def run(self, docs, glob: str) -> None:
        db, m = self.db, self.db.manifest
        shutil.rmtree(self.stage, ignore_errors=True)
        _remove_unreferenced(db.path, m)  # what an add() killed before or after its manifest swap left
        self.stage.mkdir()
        old_n = db.num_chunks
        report = SkipReport()
        counts = self._append_chunks(iter_documents(docs, glob, report, first_index=db.num_docs), report)
        report.warn()
        if counts.num_chunks == 0:
            shutil.rmtree(self.stage)
            return
        n = old_n + counts.num_chunks
        c, k, dim, dtype = db.chunk_size, db.num_neighbors, m["embedding_dim"], m["embedding_dtype"]
        chunks = open_memmap(self.stage / "chunks.dat", "int32", (n, c + 1))
        doc_ids = open_memmap(self.stage / "doc_ids.dat", "int32", (n,))
        new_embeddings = self.stage / "new_embeddings.dat"
        lm_tokenizer = db.tokenizer if db.embedder_input == "text" else None
        embed_rows(
            db.embedder,
            chunks,
            new_embeddings,
            dtype=dtype,
            batch_size=m["build"]["batch_size"],
            pad_id=db.pad_id,
            rows=(old_n, n),
            lm_tokenizer=lm_tokenizer,
            progress=self.progress,
        )
        truncated = m["embedder_truncated_chunks"]
        if lm_tokenizer is not None:
            truncated += count_truncated_chunks(db.embedder, lm_tokenizer, chunks, db.pad_id, rows=(old_n, n))
        _concat_files(db.file("embeddings.dat"), new_embeddings, self.stage / "embeddings.dat")
        embeddings = open_memmap(self.stage / "embeddings.dat", dtype, (n, dim))

        index = db.index
        index.add(np.ascontiguousarray(embeddings[old_n:], dtype=np.float32))
        exact = m["nprobe"] is None
        tuning = tune_search(index, embeddings, k, m["target_recall"], fetch=k + m["extra_neighbors"])
        write_index(index, self.stage / "index.faiss")

        knn = np.memmap(self.stage / "knn.dat", dtype="<i4", mode="w+", shape=(n, k))
        extra = m["extra_neighbors"]
        if exact:  # exact lists: only entries beaten by a new chunk change
            knn[:old_n] = merge_new_neighbors(db.knn, embeddings, old_n, k)
            compute_neighbors(
                index,
                embeddings,
                doc_ids,
                k,
                self.stage / "knn_new.dat",
                rows=(old_n, n),
                extra=extra,
                progress=self.progress,
            )
            knn[old_n:] = open_memmap(self.stage / "knn_new.dat", "int32", (n - old_n, k))
        else:
            compute_neighbors(
                index, embeddings, doc_ids, k, self.stage / "knn_all.dat", extra=extra, progress=self.progress
            )
            knn[:] = open_memmap(self.stage / "knn_all.dat", "int32", (n, k))
        knn.flush()
        del knn

        generation = int(m.get("generation", 0)) + 1
        files = {name: _generation_name(name, generation) for name in DATA_FILES}
        for name, target in files.items():
            os.replace(self.stage / name, db.path / target)
        settings = dict(m["build"])
        chunking = {
            "num_chunks": n,
            "num_docs": db.num_docs + counts.num_docs,
            "num_seqs": m["num_seqs"] + counts.num_seqs,
            "pad_id": db.pad_id,
            "eos_id": db.eos_id,
            "tokenizer": {key: value for key, value in m["tokenizer"].items() if key != "path"},
            "embedder_tokenizer": m["embedder_tokenizer"],
            "embedder_input": m["embedder_input"],
            "embedder_truncated_chunks": truncated,
            "skipped_files": m.get("skipped_files", []) + report.unreadable,
        }
        new = write_manifest(
            db.path,
            settings,
            chunking,
            {"index_type": m["index_type"], **tuning_info(tuning)},
            dim,
            files=files,
            generation=generation,
        )
        _remove_unreferenced(db.path, new)
        shutil.rmtree(self.stage, ignore_errors=True)

    def _append_chunks(self, docs, report: SkipReport):
        db = self.db
        files = {name: self.stage / name for name in CHUNK_FILES}
        for name, file in files.items():
            shutil.copyfile(db.file(name), file)
        with (
            open(files["chunks.dat"], "ab") as chunks,
            open(files["doc_ids.dat"], "ab") as doc_ids,
            open(files["seqs.dat"], "ab") as seqs,
            open(files["doc_names.jsonl"], "a", encoding="utf-8") as names,
        ):
            return write_chunks(
                docs,
                db.tokenizer,
                chunk_size=db.chunk_size,
                seq_len=db.seq_len,
                pad_id=db.pad_id,
                eos_id=db.eos_id,
                chunks_file=chunks,
                doc_ids_file=doc_ids,
                seqs_file=seqs,
                names_file=names,
                first_doc_id=db.num_docs,
                first_chunk=db.num_chunks,
                report=report,
            )


def _check_query_texts(queries: list[Any]) -> None:
    for i, query in enumerate(queries):
        if not isinstance(query, str):
            raise OptionError(f"query {i} must be a string, got {type(query).__name__}")
        try:
            query.encode("utf-8")
        except UnicodeEncodeError:
            raise OptionError(f"query {i} is not valid UTF-8 text") from None


def _concat_files(first: Path, second: Path, out: Path) -> None:
    with open(out, "wb") as dst:
        for src in (first, second):
            with open(src, "rb") as f:
                shutil.copyfileobj(f, dst, 1 << 24)
