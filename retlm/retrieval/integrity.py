"""What ``RetrievalDatabase.open`` checks before it trusts a database folder, and on every later read.

On every open (cheap):
- ``manifest.json`` matches its own seal (``manifest_sha256``), every field it holds has the type and
  range the reader needs, the shapes agree with the counts, and every path it names stays inside the
  folder (``check_manifest``);
- every array file has exactly the size its shape needs, and its sampled digest (``sample_digest``: the
  size and 64 blocks of 4 KiB; a small file whole) matches the one recorded at build time
  (``check_samples``; cost measured by ``bench/integrity.py``);
- ``index.faiss`` is hashed through the descriptor the database keeps and compared with its full sha256
  before faiss parses a byte of the same file (``read_index_verified``; ``open(read_index=False)`` defers
  this to the index's first use).

On every read of another file that is read whole anyway: the tokenizer files are hashed before the
tokenizer is loaded (``verify_tokenizer``).

``db-info --verify`` (``open(verify=True)``) also compares every array file's full sha256.

Paths: ``manifest["files"]`` maps each logical file name (``chunks.dat``) to the file that holds it now
(``add()`` writes new files under new names and swaps the manifest, see ``retlm.retrieval.add``); a
manifest without it uses the logical names.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from retlm.integrity import (
    CorruptFileError,
    check_seal,
    inside,
    sample_digest,
    sha256_file,
    sha256_handle,
)
from retlm.retrieval._storage import CorruptDatabaseError
from retlm.retrieval.config import EMBED_BACKENDS, EMBEDDING_DTYPES, POOLINGS, RETRIEVERS
from retlm.retrieval.sparse import BM25_ARRAYS, BM25_FILES, has_dense, has_sparse

ARRAY_FILES = ("chunks.dat", "doc_ids.dat", "seqs.dat", "embeddings.dat", "knn.dat")
INDEX_FILE = "index.faiss"
NAMES_FILE = "doc_names.jsonl"  # read whole when a document's name is first asked for
TOKENIZER_DIR = "tokenizer"
EMBEDDER_INPUTS = ("text", "tokens")
_HEX = set("0123456789abcdef")


def _is_digest(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX


def _fail(path: Path, message: str) -> CorruptDatabaseError:
    return CorruptDatabaseError(f"{path / 'manifest.json'}: {message}")


def retriever_of(manifest: dict[str, Any]) -> str:
    """The manifest's retriever (``dense`` for databases built before sparse retrieval existed)."""
    return manifest.get("retriever", "dense")


def array_files(retriever: str) -> tuple[str, ...]:
    """The files a database with ``retriever`` memory-maps: their sampled digests are checked on open."""
    dense = ARRAY_FILES if has_dense(retriever) else tuple(f for f in ARRAY_FILES if f != "embeddings.dat")
    return dense + (BM25_ARRAYS if has_sparse(retriever) else ())


def required_files(retriever: str) -> tuple[str, ...]:
    """The files (besides the chunk files) whose checksums a manifest with ``retriever`` must hold."""
    index = (INDEX_FILE,) if has_dense(retriever) else ()
    return array_files(retriever) + index + (tuple(BM25_FILES) if has_sparse(retriever) else ())


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


# ---- the manifest's fields ----


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


def check_manifest(manifest: Any, path: Path) -> None:
    """Refuse a manifest that was corrupted, or whose fields a reader cannot use safely."""
    path = Path(path)
    if not isinstance(manifest, dict):
        raise _fail(path, f"must hold a json object, got {type(manifest).__name__}")
    try:
        check_seal(manifest, path / "manifest.json")
    except CorruptFileError as err:
        raise CorruptDatabaseError(str(err)) from None
    for key in ("chunk_size", "num_neighbors", "seq_len", "embedding_dim"):
        _int(path, manifest, key, low=1)
    for key in ("num_chunks", "num_docs", "num_seqs", "pad_id", "eos_id"):
        _int(path, manifest, key)
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
    c, n = manifest["chunk_size"], manifest["num_chunks"]
    if manifest["seq_len"] % c:
        raise _fail(path, f"seq_len {manifest['seq_len']} is not a multiple of chunk_size {c}")
    if manifest["num_docs"] > n or manifest["num_seqs"] > n:
        raise _fail(path, f"num_docs and num_seqs cannot exceed num_chunks ({n})")
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
    expected_shapes = {
        "chunks.dat": [n, c + 1],
        "doc_ids.dat": [n],
        "seqs.dat": [manifest["num_seqs"]],
        "knn.dat": [n, manifest["num_neighbors"]],
    }
    if has_dense(retriever):
        expected_shapes["embeddings.dat"] = [n, manifest["embedding_dim"]]
    shapes = manifest.get("shapes", expected_shapes)
    if not isinstance(shapes, dict) or any(shapes.get(k) != v for k, v in expected_shapes.items()):
        raise _fail(path, f"field 'shapes' {shapes!r} disagrees with the counts (expected {expected_shapes})")
    lm = manifest["tokenizer"]
    if "sha256" in lm and not _is_digest(lm["sha256"]):
        raise _fail(path, f"tokenizer.sha256 must be a sha256 hex digest, got {lm['sha256']!r}")
    if "embedder_input" in manifest:
        _choice(path, manifest, "embedder_input", EMBEDDER_INPUTS)
    _int(path, manifest, "embedder_truncated_chunks", required=False)
    entry = manifest.get("embedder_tokenizer", {})
    if not isinstance(entry, dict):
        raise _fail(path, f"field 'embedder_tokenizer' must be an object, got {entry!r}")
    for key in ("vocab_size", "max_length"):
        if key in entry:
            _int(path, entry, key, low=1)
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
            if not isinstance(digest, str) or len(digest) != 64 or not set(digest) <= _HEX:
                raise _fail(path, f"integrity digest of {name!r} must be a sha256 hex digest, got {digest!r}")
    if not math.isfinite(float(manifest.get("recall_at_k", 1.0))):
        raise _fail(path, "field 'recall_at_k' must be finite")


# ---- written at build time ----


def describe(path: Path, files: dict[str, str], retriever: str = "dense") -> dict[str, Any]:
    """The ``integrity`` entry of a manifest: the sampled digest of every array file of ``retriever``
    (``files`` maps logical names to the relative paths holding them) and the sha256 of every tokenizer
    file."""
    path = Path(path)
    tokenizer = path / TOKENIZER_DIR
    return {
        "samples": {name: sample_digest(path / files.get(name, name)) for name in array_files(retriever)},
        "tokenizer": {
            p.relative_to(path).as_posix(): sha256_file(p)
            for p in sorted(tokenizer.rglob("*"))
            if p.is_file()
        }
        if tokenizer.is_dir()
        else {},
    }


# ---- checked when reading ----


def check_samples(path: Path, manifest: dict[str, Any]) -> None:
    """Compare every array file's sampled digest with the manifest's (sizes are checked by the memmaps)."""
    samples = manifest.get("integrity", {}).get("samples", {})
    for name, digest in samples.items():
        file = resolve(path, manifest, name)
        if sample_digest(file) != digest:
            raise CorruptDatabaseError(
                f"{file} does not match the sampled checksum in manifest.json (corrupted or modified; "
                "`retlm db-info --verify` checks every byte)"
            )


def check_full(path: Path, manifest: dict[str, Any]) -> None:
    """Every data file against its full sha256 (``verify=True``)."""
    for name, digest in manifest["checksums"].items():
        file = resolve(path, manifest, name)
        if not file.is_file():
            raise CorruptDatabaseError(f"missing database file: {file}")
        if sha256_file(file) != digest:
            raise CorruptDatabaseError(
                f"{file} does not match the checksum in manifest.json (corrupted or modified)"
            )


def read_index_verified(
    path: Path, manifest: dict[str, Any], handle: Any, nprobe: int | None, k_factor: float | None = None
):
    """The faiss index, from the open file ``handle``: hashed first, compared with the manifest's sha256,
    and only then parsed by faiss, from the same file (``/proc/self/fd``: not a file an ``add()`` may have
    renamed onto the path since)."""
    import faiss

    from retlm.retrieval.index import set_search_params

    file = resolve(path, manifest, INDEX_FILE)
    if sha256_handle(handle) != manifest["checksums"][INDEX_FILE]:
        raise CorruptDatabaseError(
            f"{file} does not match the manifest's sha256 checksum (corrupted or modified)"
        )
    same_file = f"/proc/self/fd/{handle.fileno()}"
    try:
        index = faiss.read_index(same_file if os.path.exists(same_file) else str(file))
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CorruptDatabaseError(f"{file} is truncated or corrupted (faiss: {first})") from None
    if index.ntotal != manifest["num_chunks"] or index.d != manifest["embedding_dim"]:
        raise CorruptDatabaseError(
            f"{file} holds {index.ntotal} vectors of dimension {index.d}, but manifest.json describes "
            f"{manifest['num_chunks']} of dimension {manifest['embedding_dim']}"
        )
    set_search_params(index, nprobe, k_factor)
    return index


def verify_tokenizer(path: Path, manifest: dict[str, Any]) -> None:
    """Hash the tokenizer files recorded in the manifest before the tokenizer is loaded from them."""
    for relative, digest in manifest.get("integrity", {}).get("tokenizer", {}).items():
        try:
            file = inside(path, relative, "tokenizer file")
        except CorruptFileError as err:
            raise _fail(path, str(err)) from None
        if not file.is_file():
            raise CorruptDatabaseError(f"missing database file: {file}")
        if sha256_file(file) != digest:
            raise CorruptDatabaseError(
                f"{file} does not match the checksum in manifest.json (corrupted or modified)"
            )


def open_handle(path: Path, manifest: dict[str, Any], name: str):
    """An open binary handle on a file read later, kept by the database so that an ``add()`` by another
    process (which publishes new files under new names and deletes the old ones) cannot pull it away
    from an open reader."""
    file = resolve(path, manifest, name)
    if not file.is_file():
        raise CorruptDatabaseError(f"missing database file: {file}")
    return open(file, "rb")  # noqa: SIM115  (closed once read, or with the database object)


def open_index_handle(path: Path, manifest: dict[str, Any]):
    """``open_handle`` of the index file."""
    return open_handle(path, manifest, INDEX_FILE)


def read_doc_names(path: Path, manifest: dict[str, Any], handle: Any) -> list[str]:
    """The document names, from the open ``doc_names.jsonl`` handle, after checking its sha256."""
    import json

    file = resolve(path, manifest, NAMES_FILE)
    if sha256_handle(handle) != manifest["checksums"].get(NAMES_FILE):
        raise CorruptDatabaseError(
            f"{file} does not match the checksum in manifest.json (corrupted or modified)"
        )
    handle.seek(0)
    try:
        names = [json.loads(line) for line in handle.read().decode("utf-8").splitlines() if line]
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptDatabaseError(f"{file} is not valid json lines ({err})") from None
    if len(names) != manifest["num_docs"] or not all(isinstance(n, str) for n in names):
        raise CorruptDatabaseError(f"{file} does not hold {manifest['num_docs']} document names")
    return names


def same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_ino, a.st_dev, a.st_mtime_ns, a.st_size) == (b.st_ino, b.st_dev, b.st_mtime_ns, b.st_size)


def check_whole(path: Path, manifest: dict[str, Any], names: tuple[str, ...]) -> None:
    """Hash files read whole (the BM25 vocabulary and parameters) against the manifest before they are
    parsed."""
    for name in names:
        file = resolve(path, manifest, name)
        if not file.is_file():
            raise CorruptDatabaseError(f"missing database file: {file}")
        if sha256_file(file) != manifest["checksums"].get(name):
            raise CorruptDatabaseError(
                f"{file} does not match the checksum in manifest.json (corrupted or modified)"
            )
