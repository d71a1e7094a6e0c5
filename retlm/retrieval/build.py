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

This module checks the options and runs the stages (``retlm.retrieval.stages``), locally or with Ray
(``retlm.retrieval.ray_build``); they write the files of ``retlm.retrieval.format``. It returns the
reader, ``RetrievalDatabase`` (``retlm.retrieval.database``), given as ``cls``: the reader does not
import its writers back. ``add()`` extends a finished database (``retlm.retrieval.add``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from retlm.errors import OptionError
from retlm.locking import writer_lock
from retlm.retrieval import preflight
from retlm.retrieval.config import BuildConfig
from retlm.retrieval.embedding import DEFAULT_EMBEDDER
from retlm.retrieval.encoders import default_backend
from retlm.retrieval.format import CHUNK_FILES, CHUNKING_FILE, LOCK_FILE, SHARDS_DIR, TOKENIZER_DIR
from retlm.retrieval.index import EXACT_THRESHOLD
from retlm.retrieval.shards import parse_shard, shard_file
from retlm.retrieval.sources import SourceOptions
from retlm.retrieval.stages import SHARDED_STAGES, STAGES, Builder
from retlm.tokenization import GPT2

if TYPE_CHECKING:
    from retlm.retrieval.database import RetrievalDatabase

ENGINES = ("local", "ray")


def build_database(
    cls: type[RetrievalDatabase],
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
    glob: str | None = None,
    text_field: str = "text",
    id_field: str | None = None,
    split: str | None = None,
    skip_bad_records: bool = False,
    stage: str = "all",
    shard: str | tuple[int, int] | None = None,
    progress: bool = True,
    wait: bool = True,
    engine: str = "local",
    address: str | None = None,
    num_shards: int | None = None,
    retriever: str = "dense",
    embed_backend: str | None = None,
) -> RetrievalDatabase | None:
    """Build a database at ``path`` from ``source``: a folder (its files matching ``glob``), a JSONL,
    Parquet or CSV file, a Hugging Face dataset, or strings, read with ``text_field``, ``id_field``,
    ``split`` and ``skip_bad_records`` (see ``retlm.retrieval.sources``).

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
        retriever=retriever,
        embed_backend=embed_backend or default_backend(),
    )
    try:
        shard = parse_shard(shard)
    except ValueError as err:
        raise OptionError(str(err)) from None
    if engine not in ENGINES:
        raise OptionError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "ray":
        if retriever != "dense":
            raise OptionError(f"engine 'ray' builds dense databases only, not retriever {retriever!r}")
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
    options = SourceOptions(
        glob=glob, text_field=text_field, id_field=id_field, split=split, skip_bad_records=skip_bad_records
    )
    source = preflight.check_build(source, path, config, stage, options)  # before anything is written
    fresh = not path.exists() or not any(path.iterdir())
    if shard is None:
        lock, what = path / LOCK_FILE, f"database {path}"
    else:
        lock = path / SHARDS_DIR / f".{stage}-{shard[0]:05d}-of-{shard[1]:05d}.lock"
        what = f"shard {shard[0]}/{shard[1]} of the {stage} stage of {path}"
    with writer_lock(lock, what=what, wait=wait):
        if engine == "ray":
            from retlm.retrieval.ray_build import build_with_ray

            built = build_with_ray(
                source, path, config, address=address, num_shards=num_shards, progress=progress
            )
            return cls.open(built, verify=False)
        builder = Builder(path, config, progress)
        if builder.finished():
            return cls.open(path, verify=False)
        stages = STAGES if stage == "all" else (stage,)
        for name in stages:
            chunked_before = (path / CHUNKING_FILE).is_file()
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
        out = path / f"{outputs[stage]}.dat" if shard is None else shard_file(path, outputs[stage], shard)
        for suffix in (".partial", ".progress"):
            out.with_name(out.name + suffix).unlink(missing_ok=True)
    elif stage == "chunk" and not chunked_before:
        for name in (CHUNKING_FILE, *CHUNK_FILES):
            (path / name).unlink(missing_ok=True)
        shutil.rmtree(path / TOKENIZER_DIR, ignore_errors=True)
