"""The on-disk format of a retrieval database, in one place: its file names, the shape and dtype of
every array file, which files a database of each retriever holds, and the schema of ``manifest.json``
(``check_manifest``) with the one reader of it (``read_manifest``: format version, seal, fields).

Everything that names a database file takes the name from here: the reader
(``retlm.retrieval.database``, ``retlm.retrieval.layout.ChunkStore``), the checks on open
(``retlm.retrieval.integrity``) and the writers (``build``, ``stages``, ``add``, ``ray_build``,
``manifest``).

A folder holds (``n`` chunks of ``chunk_size`` tokens, ``k`` neighbors each, ``d``-dimensional
embeddings):

    chunks.dat       int32 (n, chunk_size + 1)   each chunk's tokens and the next chunk's first token
    doc_ids.dat      int32 (n,)                  the document of each chunk
    seqs.dat         int32 (num_seqs,)           the first chunk of each training sequence
    knn.dat          int32 (n, k)                each chunk's neighbors (-1: none)
    embeddings.dat   float16 | float32 (n, d)    dense and hybrid retrievers only
    index.faiss      the faiss index over the embeddings (dense, hybrid)
    bm25_*.npy/json  the BM25 index (bm25, hybrid)
    doc_names.jsonl  one json string per document
    tokenizer/       the LM tokenizer, whose ids the chunks hold
    manifest.json    written last: counts, settings, checksums (sealed with its own digest)

``manifest["files"]`` maps each logical name above to the file that holds it now (``add()`` writes
new generations under new names, ``chunks.g000001.dat``); a manifest without it uses the logical names.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from retlm.checksums import CorruptFileError, check_seal, inside
from retlm.retrieval._storage import CorruptDatabaseError, read_json
from retlm.retrieval.config import EMBED_BACKENDS, EMBEDDING_DTYPES, POOLINGS, RETRIEVERS

FORMAT_VERSION = 2  # 2: LM tokenizer and embedder tokenizer recorded apart, document names

# ---- file names ----
MANIFEST_FILE = "manifest.json"
LOCK_FILE = ".lock"  # held by every writer of the database (build stages, add); see retlm.locking
CHUNKS_FILE = "chunks.dat"
DOC_IDS_FILE = "doc_ids.dat"
SEQS_FILE = "seqs.dat"
NAMES_FILE = "doc_names.jsonl"  # read whole when a document's name is first asked for
EMBEDDINGS_FILE = "embeddings.dat"
KNN_FILE = "knn.dat"
INDEX_FILE = "index.faiss"
TOKENIZER_DIR = "tokenizer"
BM25_ARRAYS = ("bm25_data.npy", "bm25_indices.npy", "bm25_indptr.npy")  # memory-mapped, sampled on open
BM25_FILES = (*BM25_ARRAYS, "bm25_vocab.json", "bm25_params.json")
BM25_WHOLE = ("bm25_vocab.json", "bm25_params.json")  # read whole, hashed before they are parsed

# the work files of an unfinished build (deleted by its finalize stage) and of an unfinished add()
BUILD_FILE = "build.json"  # the build's settings
CHUNKING_FILE = "chunking.json"  # the chunk stage's counts and tokenizers
INDEX_INFO_FILE = "index.json"  # the index stage's type and tuned search
BM25_DONE_FILE = "bm25.json"
SHARDS_DIR = "shards"
ADD_DIR = ".add"

CHUNK_FILES = (CHUNKS_FILE, DOC_IDS_FILE, SEQS_FILE, NAMES_FILE)  # written by the chunk stage
DENSE_FILES = (EMBEDDINGS_FILE, INDEX_FILE)
DATA_FILES = (*CHUNK_FILES, EMBEDDINGS_FILE, KNN_FILE, INDEX_FILE)
ARRAY_FILES = (CHUNKS_FILE, DOC_IDS_FILE, SEQS_FILE, EMBEDDINGS_FILE, KNN_FILE)  # memory-mapped

# ---- the manifest's choices ----
EMBEDDER_INPUTS = ("text", "tokens")
TOKEN_DTYPE = "int32"  # chunks, doc_ids, seqs and knn
_HEX = set("0123456789abcdef")


def has_dense(retriever: str) -> bool:
    return retriever in ("dense", "hybrid")


def has_sparse(retriever: str) -> bool:
    return retriever in ("bm25", "hybrid")


def retriever_of(manifest: dict[str, Any]) -> str:
    """The manifest's retriever (``dense`` for databases built before sparse retrieval existed)."""
    return manifest.get("retriever", "dense")


def data_files(retriever: str) -> tuple[str, ...]:
    """The data files of a database with ``retriever``: the chunk files and knn.dat, the embeddings and
    the faiss index (dense, hybrid), the BM25 index (bm25, hybrid)."""
    files = tuple(name for name in DATA_FILES if has_dense(retriever) or name not in DENSE_FILES)
    return files + (BM25_FILES if has_sparse(retriever) else ())


def array_files(retriever: str) -> tuple[str, ...]:
    """The files a database with ``retriever`` memory-maps: their sampled digests are checked on open."""
    dense = ARRAY_FILES if has_dense(retriever) else tuple(f for f in ARRAY_FILES if f != EMBEDDINGS_FILE)
    return dense + (BM25_ARRAYS if has_sparse(retriever) else ())


def required_files(retriever: str) -> tuple[str, ...]:
    """The files (besides the chunk files) whose checksums a manifest with ``retriever`` must hold."""
    index = (INDEX_FILE,) if has_dense(retriever) else ()
    return array_files(retriever) + index + (BM25_FILES if has_sparse(retriever) else ())


# ---- shapes and dtypes ----


def array_shape(
    name: str,
    num_rows: int,
    *,
    chunk_size: int | None = None,
    num_neighbors: int | None = None,
    embedding_dim: int | None = None,
) -> tuple[int, ...]:
    """The shape of array file ``name`` (of ``ARRAY_FILES``) with ``num_rows`` rows: chunks ``(rows,
    chunk_size + 1)``, doc_ids and seqs ``(rows,)``, knn ``(rows, num_neighbors)``, embeddings ``(rows,
    embedding_dim)``; of the widths, only ``name``'s is needed."""
    if name in (DOC_IDS_FILE, SEQS_FILE):
        return (num_rows,)
    given = {CHUNKS_FILE: chunk_size, KNN_FILE: num_neighbors, EMBEDDINGS_FILE: embedding_dim}
    if name not in given:
        raise ValueError(f"{name!r} is not an array file of a database ({', '.join(ARRAY_FILES)})")
    if given[name] is None:
        raise TypeError(f"the shape of {name} needs its width (chunk_size, num_neighbors or embedding_dim)")
    return (num_rows, given[name] + 1 if name == CHUNKS_FILE else given[name])


def array_shapes(
    *,
    num_chunks: int,
    chunk_size: int,
    num_neighbors: int,
    num_seqs: int,
    embedding_dim: int | None = None,
) -> dict[str, list[int]]:
    """Each array file's shape (``array_shape``); ``embeddings.dat``'s only with an ``embedding_dim``
    (dense, hybrid)."""
    rows = {CHUNKS_FILE: num_chunks, DOC_IDS_FILE: num_chunks, SEQS_FILE: num_seqs, KNN_FILE: num_chunks}
    if embedding_dim is not None:
        rows[EMBEDDINGS_FILE] = num_chunks
    widths = {"chunk_size": chunk_size, "num_neighbors": num_neighbors, "embedding_dim": embedding_dim}
    return {name: list(array_shape(name, n, **widths)) for name, n in rows.items()}


def manifest_shapes(manifest: dict[str, Any]) -> dict[str, list[int]]:
    """``array_shapes`` of the database that ``manifest`` describes."""
    return array_shapes(
        num_chunks=manifest["num_chunks"],
        chunk_size=manifest["chunk_size"],
        num_neighbors=manifest["num_neighbors"],
        num_seqs=manifest["num_seqs"],
        embedding_dim=manifest["embedding_dim"] if has_dense(retriever_of(manifest)) else None,
    )


def array_dtype(name: str, manifest: dict[str, Any]) -> str:
    """The dtype of array file ``name``: int32, or the manifest's ``embedding_dtype`` for the embeddings."""
    return manifest["embedding_dtype"] if name == EMBEDDINGS_FILE else TOKEN_DTYPE


# ---- where each file lives ----


def file_map(manifest: dict[str, Any]) -> dict[str, str]:
    """Logical file name -> the relative path that holds it (identity without a ``files`` entry)."""
    files = manifest.get("files") or {}
    return {name: files.get(name, name) for name in (*ARRAY_FILES, INDEX_FILE, NAMES_FILE, *files)}


def resolve(path: Path, manifest: dict[str, Any], name: str) -> Path:
    """The file holding logical file ``name`` of the database at ``path`` (kept inside ``path``)."""
    relative = file_map(manifest).get(name, name)
    try:
        file = inside(path, relative, f"file of {name!r}")
    except CorruptFileError as err:
        raise _fail(path, str(err)) from None
    if relative != name and not file.exists():  # name the field that points nowhere, not just the path
        raise CorruptDatabaseError(f"missing database file: {file} (manifest.json's file of {name})")
    return file


# ---- reading the manifest ----


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """``manifest.json`` of the database at ``path``, after checking its format version and its seal
    (``check_manifest`` checks every field; ``check_counts`` the ones a dataset reads)."""
    path = Path(path)
    manifest = read_json(path / MANIFEST_FILE)
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version == 1:
        raise CorruptDatabaseError(
            f"{path} was built by an older retlm (format_version 1: one WordPiece vocabulary, no "
            "document names); rebuild it with `retlm build-db` (`--tokenizer bert` for the same tokens)"
        )
    if version != FORMAT_VERSION:
        raise CorruptDatabaseError(
            f"{path / MANIFEST_FILE}: format_version {version!r} is not supported (expected {FORMAT_VERSION})"
        )
    try:
        check_seal(manifest, path / MANIFEST_FILE)
    except CorruptFileError as err:
        raise CorruptDatabaseError(str(err)) from None
    return manifest


def _is_digest(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX


def _fail(path: Path, message: str) -> CorruptDatabaseError:
    return CorruptDatabaseError(f"{path / MANIFEST_FILE}: {message}")


def _int(path: Path, manifest: dict, key: str, low: int = 0, required: bool = True) -> None:
    if key not in manifest:
        if required:
            raise _fail(path, f"field {key!r} is missing")
        return
    value = manifest[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < low or value >= 2**62:
        raise _fail(path, f"field {key!r} must be an integer in {low}..2**62, got {value!r}")


def _number(path: Path, manifest: dict, key: str, low: float, high: float, required: bool = True) -> None:
    if key not in manifest:
        if required:
            raise _fail(path, f"field {key!r} is missing")
        return
    value = manifest[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise _fail(path, f"field {key!r} must be a number in [{low}, {high}], got {value!r}")


def _choice(path: Path, manifest: dict, key: str, choices: tuple[str, ...]) -> None:
    if manifest.get(key) not in choices:
        raise _fail(path, f"field {key!r} must be one of {choices}, got {manifest.get(key)!r}")


def _string(path: Path, manifest: dict, key: str) -> None:
    value = manifest.get(key)
    if not isinstance(value, str) or not value or "\x00" in value:
        raise _fail(path, f"field {key!r} must be a non-empty string, got {value!r}")


def check_counts(manifest: dict[str, Any], path: str | os.PathLike) -> None:
    """The counts and ids that give the arrays their shapes: what a dataset over the files reads."""
    path = Path(path)
    for key in ("chunk_size", "num_neighbors", "seq_len"):
        _int(path, manifest, key, low=1)
    for key in ("num_chunks", "num_seqs", "pad_id", "eos_id"):
        _int(path, manifest, key)
    c, n = manifest["chunk_size"], manifest["num_chunks"]
    if manifest["seq_len"] % c:
        raise _fail(path, f"seq_len {manifest['seq_len']} is not a multiple of chunk_size {c}")
    if manifest["num_seqs"] > n:
        raise _fail(path, f"num_seqs cannot exceed num_chunks ({n})")


def check_manifest(manifest: Any, path: str | os.PathLike) -> None:
    """Refuse a manifest that was corrupted, or whose fields a reader cannot use safely."""
    path = Path(path)
    if not isinstance(manifest, dict):
        raise _fail(path, f"must hold a json object, got {type(manifest).__name__}")
    try:
        check_seal(manifest, path / MANIFEST_FILE)
    except CorruptFileError as err:
        raise CorruptDatabaseError(str(err)) from None
    check_counts(manifest, path)
    _int(path, manifest, "embedding_dim", low=1)
    _int(path, manifest, "num_docs")
    _int(path, manifest, "extra_neighbors", required=False)
    _int(path, manifest, "recall_queries", required=False)
    _int(path, manifest, "generation", required=False)
    _number(path, manifest, "recall_at_k", 0.0, 1.0, required=False)
    _number(path, manifest, "target_recall", 0.0, 1.0, required=False)
    _choice(path, manifest, "pooling", POOLINGS)
    _choice(path, manifest, "embedding_dtype", EMBEDDING_DTYPES)
    _string(path, manifest, "embedder")
    if "retriever" in manifest:
        _choice(path, manifest, "retriever", RETRIEVERS)
    if "embed_backend" in manifest:
        _choice(path, manifest, "embed_backend", EMBED_BACKENDS)
    retriever = retriever_of(manifest)
    _string(path, manifest, "index_type")
    nprobe = manifest.get("nprobe")
    if nprobe is not None and (
        isinstance(nprobe, bool) or not isinstance(nprobe, int) or not 1 <= nprobe <= 2**31
    ):
        raise _fail(path, f"field 'nprobe' must be null or a positive integer, got {nprobe!r}")
    if manifest["num_docs"] > manifest["num_chunks"]:
        raise _fail(path, f"num_docs and num_seqs cannot exceed num_chunks ({manifest['num_chunks']})")
    _check_tokenizer(manifest, path)
    expected_shapes = manifest_shapes(manifest)
    shapes = manifest.get("shapes", expected_shapes)
    if not isinstance(shapes, dict) or any(shapes.get(k) != v for k, v in expected_shapes.items()):
        raise _fail(
            path,
            f"field 'shapes' {shapes!r} disagrees with the counts (expected {expected_shapes})",
        )
    if "embedder_input" in manifest:
        _choice(path, manifest, "embedder_input", EMBEDDER_INPUTS)
    _int(path, manifest, "embedder_truncated_chunks", required=False)
    entry = manifest.get("embedder_tokenizer", {})
    if not isinstance(entry, dict):
        raise _fail(path, f"field 'embedder_tokenizer' must be an object, got {entry!r}")
    for key in ("vocab_size", "max_length"):
        if key in entry:
            _int(path, entry, key, low=1)
    _check_files(manifest, path, retriever)
    if not math.isfinite(float(manifest.get("recall_at_k", 1.0))):
        raise _fail(path, "field 'recall_at_k' must be finite")


def _check_tokenizer(manifest: dict[str, Any], path: Path) -> None:
    tokenizer = manifest.get("tokenizer")
    if not isinstance(tokenizer, dict) or not isinstance(tokenizer.get("name"), str):
        raise _fail(path, f"field 'tokenizer' must be an object with a 'name', got {tokenizer!r}")
    _int(path, tokenizer, "vocab_size", low=1)
    for key in ("pad_id", "eos_id"):
        if manifest[key] >= tokenizer["vocab_size"]:
            raise _fail(path, f"{key} {manifest[key]} is outside the vocabulary of {tokenizer['vocab_size']}")
    if "path" in tokenizer:
        try:
            inside(path, tokenizer["path"], "tokenizer path")
        except CorruptFileError as err:
            raise _fail(path, str(err)) from None
    if "sha256" in tokenizer and not _is_digest(tokenizer["sha256"]):
        raise _fail(path, f"tokenizer.sha256 must be a sha256 hex digest, got {tokenizer['sha256']!r}")


def _check_files(manifest: dict[str, Any], path: Path, retriever: str) -> None:
    files = manifest.get("files", {})
    if not isinstance(files, dict):
        raise _fail(path, f"field 'files' must map file names to relative paths, got {files!r}")
    for name in file_map(manifest):
        resolve(path, manifest, name)
    checksums = manifest.get("checksums")
    if not isinstance(checksums, dict):
        raise _fail(path, f"field 'checksums' must be an object, got {type(checksums).__name__}")
    for name in (*required_files(retriever), *checksums):
        if not _is_digest(checksums.get(name)):
            raise _fail(path, f"checksums[{name!r}] must be a sha256 hex digest, got {checksums.get(name)!r}")
        resolve(path, manifest, name)
    integrity = manifest.get("integrity", {})
    if not isinstance(integrity, dict) or not all(isinstance(v, dict) for v in integrity.values()):
        raise _fail(path, "field 'integrity' must map 'samples' and 'tokenizer' to objects")
    for group in integrity.values():
        for name, digest in group.items():
            if not _is_digest(digest):
                raise _fail(path, f"integrity digest of {name!r} must be a sha256 hex digest, got {digest!r}")
