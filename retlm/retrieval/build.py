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
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retlm.errors import OptionError
from retlm.locking import writer_lock
from retlm.retrieval import preflight
from retlm.retrieval.config import SHARDED_STAGES, STAGES, BuildConfig, BuildOptions
from retlm.retrieval.encoders import default_backend
from retlm.retrieval.format import CHUNK_FILES, CHUNKING_FILE, LOCK_FILE, SHARDS_DIR, TOKENIZER_DIR
from retlm.retrieval.shards import parse_shard, shard_file
from retlm.retrieval.stages import Builder

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
    config = opts.content(default_backend())
    if engine == "ray":
        from retlm.retrieval.ray_build import require_ray

        require_ray()  # the missing extra is named before anything is written
    path = Path(path)  # then the checks that read the source and the embedder, before anything is written
    source = preflight.check_build(source, path, config, stage, opts.source_options())
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
