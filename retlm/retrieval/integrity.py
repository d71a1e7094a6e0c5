"""What ``RetrievalDatabase.open`` checks before it trusts a database folder, and on every later read.

On every open (cheap):
- ``manifest.json`` has the current format version and matches its own seal (``manifest_sha256``),
  every field it holds has the type and range the reader needs, the shapes agree with the counts, and
  every path it names stays inside the folder (``format.read_manifest``, ``format.check_manifest``);
- every array file has exactly the size its shape needs, and its sampled digest (``sample_digest``: the
  size and 64 blocks of 4 KiB; a small file whole) matches the one recorded at build time
  (``check_samples``; cost measured by ``bench/integrity.py``);
- ``index.faiss`` is hashed through the descriptor the database keeps and compared with its full sha256
  before faiss parses a byte of the same file (``read_index_verified``; ``open(read_index=False)`` defers
  this to the index's first use).

On every read of another file that is read whole anyway: the tokenizer files are hashed before the
tokenizer is loaded (``verify_tokenizer``).

``db-info --verify`` (``open(verify=True)``) also compares every array file's full sha256.

The file names, shapes and the manifest's schema are ``retlm.retrieval.format``'s.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from retlm.checksums import CorruptFileError, inside, sample_digest, sha256_file, sha256_handle
from retlm.retrieval._storage import CorruptDatabaseError
from retlm.retrieval.format import (
    INDEX_FILE,
    MANIFEST_FILE,
    NAMES_FILE,
    TOKENIZER_DIR,
    array_files,
    resolve,
)
from retlm.utils import deprecated_aliases

# names that moved to format.py (issue #20), for one release
__getattr__ = deprecated_aliases(
    __name__,
    {
        "ARRAY_FILES": "retlm.retrieval.format.ARRAY_FILES",
        "POOLINGS": "retlm.retrieval.format.POOLINGS",
        "EMBEDDING_DTYPES": "retlm.retrieval.format.EMBEDDING_DTYPES",
        "EMBEDDER_INPUTS": "retlm.retrieval.format.EMBEDDER_INPUTS",
        "retriever_of": "retlm.retrieval.format.retriever_of",
        "required_files": "retlm.retrieval.format.required_files",
        "file_map": "retlm.retrieval.format.file_map",
        "check_manifest": "retlm.retrieval.format.check_manifest",
    },
)

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
            raise CorruptDatabaseError(f"{path / MANIFEST_FILE}: {err}") from None
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
