"""Writing ``manifest.json``, last, by a build (``retlm.retrieval.stages``) and by every ``add()``
(``retlm.retrieval.add``); its schema and reader are ``retlm.retrieval.format``'s."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from retlm.checksums import seal
from retlm.retrieval import integrity
from retlm.retrieval._storage import sha256_file
from retlm.retrieval.format import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    TOKENIZER_DIR,
    array_shapes,
    data_files,
    has_dense,
)
from retlm.retrieval.index import Tuning
from retlm.utils import deprecated_aliases, write_json

# names that moved to format.py (issue #20), for one release
__getattr__ = deprecated_aliases(
    __name__,
    {
        "CHUNK_FILES": "retlm.retrieval.format.CHUNK_FILES",
        "DATA_FILES": "retlm.retrieval.format.DATA_FILES",
        "DENSE_FILES": "retlm.retrieval.format.DENSE_FILES",
        "LOCK_FILE": "retlm.retrieval.format.LOCK_FILE",
    },
)


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
    retriever = settings.get("retriever", "dense")
    names = data_files(retriever)
    files = {name: name for name in names} | (files or {})
    c, k, n = settings["chunk_size"], settings["num_neighbors"], chunking["num_chunks"]
    shapes = array_shapes(
        num_chunks=n,
        chunk_size=c,
        num_neighbors=k,
        num_seqs=chunking["num_seqs"],
        embedding_dim=embedding_dim if has_dense(retriever) else None,
    )
    manifest = {
        "retriever": retriever,
        "embed_backend": settings.get("embed_backend", "torch"),
        "format_version": FORMAT_VERSION,
        "tokenizer": {**chunking["tokenizer"], "path": TOKENIZER_DIR},
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
        "shapes": shapes,
        "skipped_files": chunking.get("skipped_files", []),
        "sources": chunking.get("sources", []),  # where the documents came from (retrieval.sources)
        "build": settings,
        "checksums": {name: sha256_file(path / files[name]) for name in names},
        "files": {name: files[name] for name in names},
        "generation": generation,
        "integrity": integrity.describe(path, files, retriever),
    }
    manifest = seal(manifest)
    write_json(path / MANIFEST_FILE, manifest)
    return manifest
