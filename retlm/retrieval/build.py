"""The staged build of a retrieval database (``RetrievalDatabase.build``).

A build runs five stages, each resumable and each leaving its files complete or absent:

    chunk      documents -> chunks.dat, doc_ids.dat, seqs.dat, doc_names.jsonl
               (+ tokenizer/, the LM tokenizer)                                 one job
    embed      chunk rows -> embeddings.dat                                     shardable (--shard i/n)
    index      embeddings (merging the shards) -> index.faiss, nprobe tuned    one job
    neighbors  every chunk's k neighbors -> knn.dat                            shardable (--shard i/n)
    finalize   merge knn shards, checksums -> manifest.json                     one job

``stage="all"`` runs them in order in one process. ``manifest.json`` is written last: a directory with
a manifest is a complete database.

The build writes the files ``RetrievalDatabase`` reads (``retlm.retrieval.database``) and the manifest
(``retlm.retrieval.manifest``); ``add()`` extends a finished one (``retlm.retrieval.add``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from retlm.errors import OptionError
from retlm.locking import writer_lock
from retlm.retrieval import preflight
from retlm.retrieval._storage import is_complete, open_memmap, read_json, write_json
from retlm.retrieval.chunking import Document, SkipReport, write_chunks
from retlm.retrieval.config import SHARDED_STAGES, STAGES, BuildConfig, BuildOptions
from retlm.retrieval.embedding import (
    Embedder,
    count_truncated_chunks,
    embed_block,
    embed_rows,
    embedder_max_length,
    load_tokenizer,
    resolve_model_path,
)
from retlm.retrieval.index import (
    Tuning,
    build_index,
    choose_factory,
    read_index,
    tune_search,
    write_index,
)
from retlm.retrieval.manifest import CHUNK_FILES, LOCK_FILE, tuning_info, write_manifest
from retlm.retrieval.neighbors import compute_neighbors
from retlm.retrieval.shards import _merge_shards, _shard_file, parse_shard, shard_rows
from retlm.retrieval.sources import Source, empty_error, provenance
from retlm.retrieval.sparse import ChunkQueries, build_bm25, has_dense, has_sparse, make_searcher
from retlm.tokenization import describe, special_ids
from retlm.tokenization import load_tokenizer as load_lm_tokenizer

if TYPE_CHECKING:
    from retlm.retrieval.database import RetrievalDatabase


def build_database(
    cls: type[RetrievalDatabase],
    source: str | os.PathLike | Iterable[str] | None,
    path: str | os.PathLike,
    options: BuildConfig | None = None,
    **changes: Any,
) -> RetrievalDatabase | None:
    """Build a database at ``path`` from ``source``: a folder (its files matching ``glob``), a JSONL,
    Parquet or CSV file, a Hugging Face dataset, or strings, read with ``text_field``, ``id_field``,
    ``split`` and ``skip_bad_records`` (see ``retlm.retrieval.sources``).

    ``options``: a ``BuildOptions`` (``retlm.retrieval.config``; a ``BuildConfig`` gives the content
    options and leaves the others at their defaults); ``changes``: any of its fields as keywords, which
    win (``RetrievalDatabase.build(texts, out, chunk_size=32, progress=False)``).

    ``tokenizer``: the LM tokenizer, ``"gpt2"`` (GPT-2's byte-level BPE, the default), ``"bert"`` (the
    embedder's WordPiece for both, retro-pytorch's way), a pretrained model's (``"smollm2-135m"``, a .gguf
    file, a model folder) or a tokenizer folder. ``embedder``: the encoder
    that embeds each chunk (the bundled all-MiniLM-L6-v2 by default). ``embed_backend``: what runs it
    (``retlm.retrieval.encoders``; default ``openvino`` on a CPU, ``torch`` on a GPU); the manifest records it
    and queries go through it. ``retriever``: ``dense`` (the faiss index over the embeddings), ``bm25``
    (a BM25 index over the chunks' text: no embedding at all) or ``hybrid`` (both, rankings fused;
    ``retlm.retrieval.sparse``); neighbors, search, generation and evaluation all use it.

    Re-running a killed build resumes it, with byte-identical results. ``stage`` and ``shard`` run one
    stage (of ``STAGES``) over one shard ``"i/n"`` of the chunk range, for builds spread over jobs;
    the database is returned once ``finalize`` has run, else ``None``. ``engine="ray"`` runs every
    stage as Ray tasks over ``num_shards`` shards (default: the cluster's CPUs) on the cluster at
    ``address`` (default: the initialised or a new local one), with the same result
    (``retlm.retrieval.ray_build``; needs ``pip install 'retlm[ray]'``).

    Every option is checked before anything is written (``BuildOptions.validate`` and
    ``retlm.retrieval.preflight``: option ranges, the embedder's position limit, the faiss factory
    string, a source with some text, and the disk and memory the build needs). A build holds the
    database's lock (a sharded stage: its shard's); a second writer waits for it (``wait=False``: raises
    ``LockedError`` naming the holder's PID). A stage that fails with an exception removes what it
    wrote; a fresh build that fails in its first stage removes the folder (the Ray engine keeps what it
    wrote instead: re-running resumes it).
    """
    opts = options if isinstance(options, BuildOptions) else BuildOptions()
    if options is not None and not isinstance(options, BuildOptions):
        opts = BuildOptions(**asdict(options))
    opts = replace(opts, **changes)  # an unknown keyword is a TypeError, as for any function
    try:
        shard = parse_shard(opts.shard)
    except ValueError as err:
        raise OptionError(str(err)) from None
    opts.validate()
    stage, engine, progress, wait = opts.stage, opts.engine, opts.progress, opts.wait
    address, num_shards = opts.address, opts.num_shards
    config = opts.content()
    if engine == "ray":
        from retlm.retrieval.ray_build import require_ray

        require_ray()  # the missing extra is named before anything is written
    path = Path(path)  # then the checks that read the source and the embedder, before anything is written
    source = preflight.check_build(source, path, config, stage, opts.source_options())
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
                source, path, config, address=address, num_shards=num_shards, progress=progress
            )
        builder = _Builder(path, config, progress)
        if builder.finished():
            return cls.open(path, verify=False)
        stages = STAGES if stage == "all" else (stage,)
        for name in stages:
            chunked_before = (path / "chunking.json").is_file()
            try:
                if name == "chunk":
                    builder.chunk(source)
                    builder.check_chunked(source)
                elif name in SHARDED_STAGES:
                    getattr(builder, name)(shard)
                else:
                    getattr(builder, name)()
            except Exception:
                _remove_failed_stage(path, name, shard, fresh and not chunked_before, chunked_before)
                raise
    return cls.open(path, verify=False) if "finalize" in stages else None


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
    def chunk(self, source: Source | None) -> None:
        if (self.path / "chunking.json").is_file():
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
        if is_complete(self.path / "embeddings.dat") or not has_dense(self.config.retriever):
            return
        embedder = self.embedder()
        out = self.path / "embeddings.dat" if shard is None else _shard_file(self.path, "embeddings", shard)
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
        if has_sparse(self.config.retriever) and not (self.path / "bm25.json").is_file():
            chunks, _ = self.chunk_arrays()
            build_bm25(chunks, self.saved_tokenizer(), self.chunking()["pad_id"], self.path)
            write_json(self.path / "bm25.json", {"done": True})
        if not has_dense(self.config.retriever):
            write_json(self.path / "index.json", {"index_type": "BM25", **tuning_info(Tuning(None, 1.0, 0))})
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
        """Tune the search of a filled index for the neighbor stage, then write it and index.json."""
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
        chunks, doc_ids = self.chunk_arrays()
        out = self.path / "knn.dat" if shard is None else _shard_file(self.path, "knn", shard)
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
            info = read_json(self.path / "index.json")
            index = read_index(self.path / "index.faiss", info["nprobe"], info.get("k_factor"))
        return make_searcher(self.config.retriever, index, self.path)

    def queries(self, chunks: np.ndarray) -> ChunkQueries:
        embeddings = self.embeddings() if has_dense(self.config.retriever) else None
        pad_id = self.chunking()["pad_id"]
        return ChunkQueries(self.config.retriever, chunks, self.saved_tokenizer(), pad_id, embeddings)

    # ---- stage 5
    def finalize(self) -> None:
        _merge_shards(self.path, "knn")
        chunking, index_info = self.chunking(), read_json(self.path / "index.json")
        chunks, _ = self.chunk_arrays()
        lm_tokenizer = self.lm_tokenizer()
        chunking["embedder_truncated_chunks"] = (
            0
            if lm_tokenizer is None or not has_dense(self.config.retriever)
            else count_truncated_chunks(self.embedder(), lm_tokenizer, chunks, chunking["pad_id"])
        )
        write_manifest(self.path, self.settings, chunking, index_info, self.embedding_dim())
        for name in ("build.json", "chunking.json", "index.json", "bm25.json"):
            (self.path / name).unlink(missing_ok=True)
        shutil.rmtree(self.path / "shards", ignore_errors=True)


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


def _save_tokenizer(tokenizer, folder: Path) -> None:
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


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
