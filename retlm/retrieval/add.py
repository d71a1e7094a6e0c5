"""Adding documents to a built database (``add_documents``, ``RetrievalDatabase.add``): only the new
chunks are embedded, the index is extended in place, the neighbors are updated, and one rename of
``manifest.json`` publishes the new files. A writer on top of the reader: it reads the database through
``RetrievalDatabase`` and returns it reopened."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from retlm.locking import writer_lock
from retlm.retrieval import format
from retlm.retrieval._storage import file_dtype, open_memmap
from retlm.retrieval.chunking import SkipReport, write_chunks
from retlm.retrieval.embedding import count_truncated_chunks, embed_rows
from retlm.retrieval.format import (
    ADD_DIR,
    BM25_FILES,
    CHUNK_FILES,
    CHUNKS_FILE,
    DATA_FILES,
    DOC_IDS_FILE,
    EMBEDDINGS_FILE,
    INDEX_FILE,
    KNN_FILE,
    LOCK_FILE,
    NAMES_FILE,
    SEQS_FILE,
    TOKEN_DTYPE,
    array_shape,
    data_files,
    has_dense,
    has_sparse,
)
from retlm.retrieval.index import Tuning, tune_search, write_index
from retlm.retrieval.manifest import tuning_info, write_manifest
from retlm.retrieval.neighbors import compute_neighbors, merge_new_neighbors
from retlm.retrieval.sources import Source, SourceOptions, open_source, provenance
from retlm.retrieval.sparse import ChunkQueries, build_bm25, make_searcher

if TYPE_CHECKING:  # the class comes in with ``db``: the reader does not import its writers back
    from retlm.retrieval.database import RetrievalDatabase


def add_documents(
    db: RetrievalDatabase,
    docs: str | os.PathLike | Iterable[str],
    *,
    glob: str | None = None,
    text_field: str = "text",
    id_field: str | None = None,
    split: str | None = None,
    skip_bad_records: bool = False,
    progress: bool = False,
    wait: bool = True,
) -> RetrievalDatabase:
    """Append documents to the database ``db`` (``RetrievalDatabase.add``): embed only their chunks, add
    them to the index, update the neighbors; ``db`` itself, reopened on the new state.

    ``docs``: any source ``build`` reads (a folder, a JSONL, Parquet or CSV file, a Hugging Face
    dataset, strings), with the same options (``retlm.retrieval.sources``); the source is checked
    before the lock is taken, and recorded in the manifest's ``sources``.

    With an exact index the result equals a full rebuild; with an IVF index the existing lists are
    kept (no retraining), ``nprobe`` is re-tuned and every chunk's neighbors are recomputed.

    The database's lock is held throughout: a second writer waits (``wait=False``: ``LockedError``
    naming the holder's PID). The new files get new names and one atomic rename of
    ``manifest.json`` publishes them, so a reader (or a kill at any step) sees the old database or
    the new one, never a mix.
    """
    options = SourceOptions(
        glob=glob,
        text_field=text_field,
        id_field=id_field,
        split=split,
        skip_bad_records=skip_bad_records,
    )
    source = open_source(docs, options)
    source.check()  # before the lock: a missing field or an empty source writes nothing
    reader = type(db)
    with writer_lock(db.path / LOCK_FILE, what=f"database {db.path}", wait=wait):
        current = reader.open(db.path, verify=False)  # another writer may have added
        _Adder(current, progress).run(source)
    db.__dict__.update(reader.open(db.path, verify=False).__dict__)
    return db


class _Adder:
    """``RetrievalDatabase.add``: files are staged in ``.add/``, moved in, the manifest written last."""

    def __init__(self, db: RetrievalDatabase, progress: bool):
        self.db, self.progress = db, progress
        self.stage = db.path / ADD_DIR

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
        k, dim, dtype = db.num_neighbors, m["embedding_dim"], m["embedding_dtype"]
        shape = partial(array_shape, chunk_size=db.chunk_size, num_neighbors=k, embedding_dim=dim)
        chunks = open_memmap(self.stage / CHUNKS_FILE, TOKEN_DTYPE, shape(CHUNKS_FILE, n))
        doc_ids = open_memmap(self.stage / DOC_IDS_FILE, TOKEN_DTYPE, shape(DOC_IDS_FILE, n))
        retriever, extra = db.retriever, m["extra_neighbors"]
        truncated, index, embeddings = m["embedder_truncated_chunks"], None, None
        tuning = Tuning(None, 1.0, 0)
        if has_dense(retriever):
            truncated += self._embed_new(chunks, old_n, n)
            embeddings = open_memmap(self.stage / EMBEDDINGS_FILE, dtype, shape(EMBEDDINGS_FILE, n))
            index = db.index
            index.add(np.ascontiguousarray(embeddings[old_n:], dtype=np.float32))
            tuning = tune_search(index, embeddings, k, m["target_recall"], fetch=k + extra)
            write_index(index, self.stage / INDEX_FILE)
        if has_sparse(retriever):  # BM25's statistics cover every chunk: rebuilt whole
            build_bm25(chunks, db.tokenizer, db.pad_id, self.stage)

        knn = np.memmap(self.stage / KNN_FILE, file_dtype(TOKEN_DTYPE), mode="w+", shape=shape(KNN_FILE, n))
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
            knn[old_n:] = open_memmap(self.stage / "knn_new.dat", TOKEN_DTYPE, shape(KNN_FILE, n - old_n))
        else:  # approximate lists, or BM25 scores that every new chunk changes: all recomputed
            searcher = make_searcher(retriever, index, self.stage)
            queries = ChunkQueries(retriever, chunks, db.tokenizer, db.pad_id, embeddings)
            all_knn = self.stage / "knn_all.dat"
            compute_neighbors(searcher, queries, doc_ids, k, all_knn, extra=extra, progress=self.progress)
            knn[:] = open_memmap(all_knn, TOKEN_DTYPE, shape(KNN_FILE, n))
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
        _concat_files(db.file(EMBEDDINGS_FILE), new_embeddings, self.stage / EMBEDDINGS_FILE)
        if lm_tokenizer is None:
            return 0
        return count_truncated_chunks(db.embedder, lm_tokenizer, chunks, db.pad_id, rows=(old_n, n))

    def _append_chunks(self, docs, report: SkipReport):
        db = self.db
        files = {name: self.stage / name for name in CHUNK_FILES}
        for name, file in files.items():
            shutil.copyfile(db.file(name), file)
        with (
            open(files[CHUNKS_FILE], "ab") as chunks,
            open(files[DOC_IDS_FILE], "ab") as doc_ids,
            open(files[SEQS_FILE], "ab") as seqs,
            open(files[NAMES_FILE], "a", encoding="utf-8") as names,
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
    keep = set(format.file_map(manifest).values())
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
