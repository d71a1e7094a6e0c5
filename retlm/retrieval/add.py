"""Adding documents to a built database (``RetrievalDatabase.add``): only the new chunks are embedded,
the index is extended in place, the neighbors are updated, and one rename of ``manifest.json``
publishes the new files."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from retlm.retrieval import integrity
from retlm.retrieval._storage import open_memmap
from retlm.retrieval.chunking import SkipReport, write_chunks
from retlm.retrieval.embedding import count_truncated_chunks, embed_rows
from retlm.retrieval.index import Tuning, tune_search, write_index
from retlm.retrieval.manifest import CHUNK_FILES, DATA_FILES, data_files, tuning_info, write_manifest
from retlm.retrieval.neighbors import compute_neighbors, merge_new_neighbors
from retlm.retrieval.sources import Source, provenance
from retlm.retrieval.sparse import BM25_FILES, ChunkQueries, build_bm25, has_dense, has_sparse, make_searcher

if TYPE_CHECKING:
    from retlm.retrieval.database import RetrievalDatabase


class _Adder:
    """``RetrievalDatabase.add``: files are staged in ``.add/``, moved in, the manifest written last."""

    def __init__(self, db: RetrievalDatabase, progress: bool):
        self.db, self.progress = db, progress
        self.stage = db.path / ".add"

    def run(self, source: Source) -> None:
        db, m = self.db, self.db.manifest
        shutil.rmtree(self.stage, ignore_errors=True)
        _remove_unreferenced(db.path, m)  # what an add() killed before or after its manifest swap left
        self.stage.mkdir()
        old_n = db.num_chunks
        report = SkipReport()
        counts = self._append_chunks(source.documents(report, first_index=db.num_docs), report)
        report.warn()
        if counts.num_chunks == 0:
            shutil.rmtree(self.stage)
            return
        n = old_n + counts.num_chunks
        c, k, dim, dtype = db.chunk_size, db.num_neighbors, m["embedding_dim"], m["embedding_dtype"]
        chunks = open_memmap(self.stage / "chunks.dat", "int32", (n, c + 1))
        doc_ids = open_memmap(self.stage / "doc_ids.dat", "int32", (n,))
        retriever, extra = db.retriever, m["extra_neighbors"]
        truncated, index, embeddings = m["embedder_truncated_chunks"], None, None
        tuning = Tuning(None, 1.0, 0)
        if has_dense(retriever):
            truncated += self._embed_new(chunks, old_n, n)
            embeddings = open_memmap(self.stage / "embeddings.dat", dtype, (n, dim))
            index = db.index
            index.add(np.ascontiguousarray(embeddings[old_n:], dtype=np.float32))
            tuning = tune_search(index, embeddings, k, m["target_recall"], fetch=k + extra)
            write_index(index, self.stage / "index.faiss")
        if has_sparse(retriever):  # BM25's statistics cover every chunk: rebuilt whole
            build_bm25(chunks, db.tokenizer, db.pad_id, self.stage)

        knn = np.memmap(self.stage / "knn.dat", dtype="<i4", mode="w+", shape=(n, k))
        if retriever == "dense" and m["nprobe"] is None:  # exact lists: only entries beaten by a new chunk
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
        else:  # approximate lists, or BM25 scores that every new chunk changes: all recomputed
            searcher = make_searcher(retriever, index, self.stage)
            queries = ChunkQueries(retriever, chunks, db.tokenizer, db.pad_id, embeddings)
            all_knn = self.stage / "knn_all.dat"
            compute_neighbors(searcher, queries, doc_ids, k, all_knn, extra=extra, progress=self.progress)
            knn[:] = open_memmap(all_knn, "int32", (n, k))
        knn.flush()
        del knn

        generation = int(m.get("generation", 0)) + 1
        files = {name: _generation_name(name, generation) for name in data_files(retriever)}
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
            "sources": m.get("sources", []) + [provenance(source, report, counts.num_docs)],
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

    def _embed_new(self, chunks: np.ndarray, old_n: int, n: int) -> int:
        """Embed rows ``old_n:n`` and stage embeddings.dat (old + new); the new chunks' truncated count."""
        db, m = self.db, self.db.manifest
        lm_tokenizer = db.tokenizer if db.embedder_input == "text" else None
        new_embeddings = self.stage / "new_embeddings.dat"
        embed_rows(
            db.embedder,
            chunks,
            new_embeddings,
            dtype=m["embedding_dtype"],
            batch_size=m["build"]["batch_size"],
            pad_id=db.pad_id,
            rows=(old_n, n),
            lm_tokenizer=lm_tokenizer,
            progress=self.progress,
        )
        _concat_files(db.file("embeddings.dat"), new_embeddings, self.stage / "embeddings.dat")
        if lm_tokenizer is None:
            return 0
        return count_truncated_chunks(db.embedder, lm_tokenizer, chunks, db.pad_id, rows=(old_n, n))

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
        for name in (*DATA_FILES, *BM25_FILES)
    }
    for entry in path.iterdir():
        if entry.name not in keep and any(p.fullmatch(entry.name) for p in patterns.values()):
            entry.unlink(missing_ok=True)


def _concat_files(first: Path, second: Path, out: Path) -> None:
    with open(out, "wb") as dst:
        for src in (first, second):
            with open(src, "rb") as f:
                shutil.copyfileobj(f, dst, 1 << 24)
