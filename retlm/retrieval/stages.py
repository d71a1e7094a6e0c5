"""The stages of a database build over one database folder (``Builder``): ``retlm.retrieval.build``
runs them (its docstring describes them), and so do the Ray tasks of ``retlm.retrieval.ray_build``.

Each stage leaves its files complete or absent: the work files of ``retlm.retrieval.format``
(``build.json``, ``chunking.json``, ``index.json``, ``shards/``) record what is done, and ``finalize``
writes ``manifest.json`` last and deletes them.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from retlm.retrieval import preflight
from retlm.retrieval._storage import is_complete, open_memmap, read_json
from retlm.retrieval.chunking import Document, SkipReport, write_chunks
from retlm.retrieval.config import SHARDED_STAGES, STAGES, BuildConfig
from retlm.retrieval.embedding import (
    Embedder,
    count_truncated_chunks,
    embed_block,
    embed_rows,
    embedder_max_length,
    load_tokenizer,
    resolve_model_path,
)
from retlm.retrieval.format import (
    BM25_DONE_FILE,
    BUILD_FILE,
    CHUNK_FILES,
    CHUNKING_FILE,
    CHUNKS_FILE,
    DOC_IDS_FILE,
    EMBEDDINGS_FILE,
    INDEX_FILE,
    INDEX_INFO_FILE,
    KNN_FILE,
    MANIFEST_FILE,
    NAMES_FILE,
    SEQS_FILE,
    SHARDS_DIR,
    TOKEN_DTYPE,
    TOKENIZER_DIR,
    array_shape,
    has_dense,
    has_sparse,
)
from retlm.retrieval.index import Tuning, build_index, choose_factory, read_index, tune_search, write_index
from retlm.retrieval.manifest import tuning_info, write_manifest
from retlm.retrieval.neighbors import compute_neighbors
from retlm.retrieval.shards import merge_shards, shard_file, shard_rows
from retlm.retrieval.sources import Source, empty_error, provenance
from retlm.retrieval.sparse import ChunkQueries, build_bm25, make_searcher
from retlm.tokenization import describe, special_ids
from retlm.tokenization import load_tokenizer as load_lm_tokenizer
from retlm.utils import write_json

__all__ = ["Builder", "SHARDED_STAGES", "STAGES"]


class Builder:
    """The build stages over one database directory (see the module docstring)."""

    def __init__(self, path: Path, config: BuildConfig, progress: bool):
        self.path, self.config, self.progress = path, config, progress
        self.settings = asdict(config)
        self._lm_tokenizer = None
        path.mkdir(parents=True, exist_ok=True)
        self._check_settings()

    def _check_settings(self) -> None:
        for name in (MANIFEST_FILE, BUILD_FILE):
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
        write_json(self.path / BUILD_FILE, {"build": self.settings})

    def finished(self) -> bool:
        return (self.path / MANIFEST_FILE).is_file()

    def chunking(self) -> dict[str, Any]:
        file = self.path / CHUNKING_FILE
        if not file.is_file():
            raise RuntimeError(f"{self.path}: run the 'chunk' stage first (no chunking.json)")
        return read_json(file)

    def chunk_arrays(self):
        n = self.chunking()["num_chunks"]
        chunks_shape = array_shape(CHUNKS_FILE, n, chunk_size=self.config.chunk_size)
        return (
            open_memmap(self.path / CHUNKS_FILE, TOKEN_DTYPE, chunks_shape),
            open_memmap(self.path / DOC_IDS_FILE, TOKEN_DTYPE, array_shape(DOC_IDS_FILE, n)),
        )

    # ---- stage 1
    def chunk(self, source: Source | None) -> None:
        if (self.path / CHUNKING_FILE).is_file():
            return
        if source is None:
            raise ValueError("the chunk stage needs a source (a folder, a file or an iterable of strings)")
        report = SkipReport()
        self.write_chunk_files(source.documents(report), report, source)

    def write_chunk_files(
        self, docs: Iterable[Document], report: SkipReport, source: Source | None = None
    ) -> None:
        """Tokenize and chunk ``docs`` into chunks.dat, doc_ids.dat, seqs.dat, doc_names.jsonl, tokenizer/
        and chunking.json (with ``source``'s record, when given: a Ray shard's chunks have none)."""
        tokenizer = load_lm_tokenizer(self.config.tokenizer, embedder=self.config.embedder)
        tokenizers = tokenizers_entry(self.config, tokenizer)
        self._lm_tokenizer = tokenizer
        pad_id, eos_id = special_ids(tokenizer)
        tmp = {name: self.path / f".{name}.tmp" for name in CHUNK_FILES}
        with (
            open(tmp[CHUNKS_FILE], "wb") as chunks,
            open(tmp[DOC_IDS_FILE], "wb") as doc_ids,
            open(tmp[SEQS_FILE], "wb") as seqs,
            open(tmp[NAMES_FILE], "w", encoding="utf-8") as names,
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
        save_tokenizer(tokenizer, self.path / TOKENIZER_DIR)
        for name, file in tmp.items():
            os.replace(file, self.path / name)
        write_json(
            self.path / CHUNKING_FILE,
            {
                **asdict(counts),
                **tokenizers,
                "pad_id": int(pad_id),
                "eos_id": int(eos_id),
                **report.recorded(),
                "sources": [] if source is None else [provenance(source, report, counts.num_docs)],
            },
        )

    def check_chunked(self, source: Source | None) -> None:
        """After chunking: a source that gave no chunk is an error (naming what was skipped), and an IVF
        factory must have enough chunks to train on -- both before any embedding."""
        info = self.chunking()
        if info["num_chunks"] == 0 and source is not None and source.kind != "python":
            raise empty_error(source, SkipReport.from_record(info))
        preflight.check_index_fits(self.config.index_factory, info["num_chunks"], self.config.num_neighbors)

    # ---- stage 2
    def embed(self, shard: tuple[int, int] | None) -> None:
        chunks, _ = self.chunk_arrays()
        if is_complete(self.path / EMBEDDINGS_FILE) or not has_dense(self.config.retriever):
            return
        embedder = self.embedder()
        out = self.path / EMBEDDINGS_FILE if shard is None else shard_file(self.path, "embeddings", shard)
        embed_rows(
            embedder,
            chunks,
            out,
            dtype=self.config.embedding_dtype,
            batch_size=self.config.batch_size,
            pad_id=self.chunking()["pad_id"],
            rows=shard_rows(len(chunks), shard, embed_block(self.config.batch_size)),
            lm_tokenizer=self.lm_tokenizer(),
            progress=self.progress,
            desc="embed" if shard is None else f"embed {shard[0]}/{shard[1]}",
        )

    def embedder(self) -> Embedder:
        return Embedder(self.config.embedder, self.config.pooling, backend=self.config.embed_backend)

    def lm_tokenizer(self):
        """The saved LM tokenizer when the embedder reads text, else None (it reads the ids)."""
        if self.chunking()["embedder_input"] != "text":
            return None
        return self.saved_tokenizer()

    def saved_tokenizer(self):
        """The LM tokenizer saved by the chunk stage (BM25 reads the chunks' text through it)."""
        if self._lm_tokenizer is None:
            self._lm_tokenizer = load_lm_tokenizer(str(self.path / TOKENIZER_DIR))
        return self._lm_tokenizer

    def embedding_dim(self) -> int:
        from transformers import AutoConfig

        return int(AutoConfig.from_pretrained(resolve_model_path(self.config.embedder)).hidden_size)

    def embeddings(self) -> np.ndarray:
        n = self.chunking()["num_chunks"]
        shape = array_shape(EMBEDDINGS_FILE, n, embedding_dim=self.embedding_dim())
        return open_memmap(self.path / EMBEDDINGS_FILE, self.config.embedding_dtype, shape)

    # ---- stage 3
    def index(self) -> None:
        if (self.path / INDEX_INFO_FILE).is_file():
            return
        if has_sparse(self.config.retriever) and not (self.path / BM25_DONE_FILE).is_file():
            chunks, _ = self.chunk_arrays()
            build_bm25(chunks, self.saved_tokenizer(), self.chunking()["pad_id"], self.path)
            write_json(self.path / BM25_DONE_FILE, {"done": True})
        if not has_dense(self.config.retriever):
            write_json(
                self.path / INDEX_INFO_FILE, {"index_type": "BM25", **tuning_info(Tuning(None, 1.0, 0))}
            )
            return
        merge_shards(self.path, "embeddings")
        embeddings = self.embeddings()
        factory = self.factory(embeddings)
        index = build_index(embeddings, factory, progress=self.progress)
        self.tune_and_write_index(index, factory)

    def factory(self, embeddings: np.ndarray) -> str:
        """The index type: the one asked for, or the default for this many embeddings."""
        n, dim = embeddings.shape
        return self.config.index_factory or choose_factory(n, self.config.exact_threshold, dim)

    def tune_and_write_index(self, index, factory: str) -> None:
        """Tune the search of a filled index for the neighbor stage, then write it and index.json."""
        k = self.config.num_neighbors
        tuning = tune_search(
            index, self.embeddings(), k, self.config.target_recall, fetch=k + self.config.extra_neighbors
        )
        write_index(index, self.path / INDEX_FILE)
        write_json(self.path / INDEX_INFO_FILE, {"index_type": factory, **tuning_info(tuning)})

    # ---- stage 4
    def neighbors(self, shard: tuple[int, int] | None) -> None:
        if not (self.path / INDEX_INFO_FILE).is_file():
            raise RuntimeError(f"{self.path}: run the 'index' stage first (no index.json)")
        if is_complete(self.path / KNN_FILE):
            return
        chunks, doc_ids = self.chunk_arrays()
        out = self.path / KNN_FILE if shard is None else shard_file(self.path, "knn", shard)
        compute_neighbors(
            self.searcher(),
            self.queries(chunks),
            doc_ids,
            self.config.num_neighbors,
            out,
            rows=shard_rows(len(doc_ids), shard),
            extra=self.config.extra_neighbors,
            progress=self.progress,
            desc="neighbors" if shard is None else f"neighbors {shard[0]}/{shard[1]}",
        )

    def searcher(self):
        """The index the neighbor stage searches: faiss (dense), BM25, or both fused (hybrid)."""
        index = None
        if has_dense(self.config.retriever):
            info = read_json(self.path / INDEX_INFO_FILE)
            index = read_index(self.path / INDEX_FILE, info["nprobe"], info.get("k_factor"))
        return make_searcher(self.config.retriever, index, self.path)

    def queries(self, chunks: np.ndarray) -> ChunkQueries:
        embeddings = self.embeddings() if has_dense(self.config.retriever) else None
        pad_id = self.chunking()["pad_id"]
        return ChunkQueries(self.config.retriever, chunks, self.saved_tokenizer(), pad_id, embeddings)

    # ---- stage 5
    def finalize(self) -> None:
        merge_shards(self.path, "knn")
        chunking, index_info = self.chunking(), read_json(self.path / INDEX_INFO_FILE)
        chunks, _ = self.chunk_arrays()
        lm_tokenizer = self.lm_tokenizer()
        chunking["embedder_truncated_chunks"] = (
            0
            if lm_tokenizer is None or not has_dense(self.config.retriever)
            else count_truncated_chunks(self.embedder(), lm_tokenizer, chunks, chunking["pad_id"])
        )
        write_manifest(self.path, self.settings, chunking, index_info, self.embedding_dim())
        for name in (BUILD_FILE, CHUNKING_FILE, INDEX_INFO_FILE, BM25_DONE_FILE):
            (self.path / name).unlink(missing_ok=True)
        shutil.rmtree(self.path / SHARDS_DIR, ignore_errors=True)


def tokenizers_entry(config: BuildConfig, lm_tokenizer) -> dict[str, Any]:
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


def save_tokenizer(tokenizer, folder: Path) -> None:
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
