"""``RetrievalDatabase.build(..., engine="ray")`` / ``retlm build-db --engine ray``: every stage as Ray tasks.

The stages and their tasks (``S`` shards; every task calls the stage functions of the single-process
build, so both write the same database):

    chunk      S tasks, each reading and tokenizing a contiguous group of the source (in reading order:
               whole files, or row ranges of Parquet files and datasets and line-aligned byte ranges of
               plain JSONL files, read by ``retlm.retrieval.sources`` as the local build reads them)
               into shards/chunk-i-of-S/; one task concatenates them, renumbering documents, chunks and
               training sequences                      -> chunks, doc_ids, seqs, doc_names.jsonl
    embed      S tasks over row shards whose boundaries are multiples of the embed block (16
               batches), so each runs the batches the single-process build runs -> shards/embeddings-i
    index      1 task trains the index once, on the same random sample; S tasks each add their rows to
               a copy of the trained (empty) index; 1 task merges the copies (``merge_indexes``: the
               same bytes as one ``add``), tunes the search and writes index.faiss
    neighbors  S tasks over row shards, each searching the whole index with all of a node's CPUs (so a
               node holds one copy of the index)                            -> shards/knn-i
    finalize   1 task: concatenates the neighbor shards, checksums, manifest.json

Result: chunks, document ids and embeddings identical to the single-process build with the same
options, the same index file, and so the same neighbors (faiss's searches here are deterministic: a
query's results do not depend on its batch or on the thread count).

Failures: Ray retries a task whose worker died (``max_retries``). The embed and neighbor shards resume
from their progress markers, the other tasks redo their (bounded) piece; finished pieces are kept, so
re-running the build after a crash of the driver resumes too.

Memory per worker, for ``n`` chunks of ``dim`` dimensions (``B`` = batch_size):
- chunk: one piece of text (about 1M characters) and its tokens;
- embed: the encoder and one batch (``B x (chunk_size + 2)`` tokens);
- index, train: the training sample, 64 vectors per IVF list (``64 * nlist * dim * 4`` bytes: 100 MB
  at 1M chunks x 384, ``nlist`` 1024);
- index, add: one block of 65,536 float32 vectors (100 MB at 384-d) and the shard's codes
  (``n / S * bytes per vector``, about 830 for the default index at 384-d);
- index, merge + tune: the whole index (``n * bytes per vector``), one shard file, 1000 query vectors
  and a 131,072-row block of the exact search;
- neighbors: the whole index and one block of 4,096 queries, one such task per node at a time;
- finalize: buffers of 16 MB.
No task holds all the vectors: the embedding file is read through a memmap, block by block. Every
worker needs the database folder on a filesystem shared by all nodes (and the source's files for the
chunk stage; a Hub dataset is streamed by one task).

Ray Data's readers (``read_json``, ``read_parquet``) are not used: a record's name, its line or row
number in errors, ``skip_bad_records`` and the order of documents must be the local build's, which
holds only when both engines read through ``retlm.retrieval.sources``.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from retlm.retrieval._storage import file_dtype, read_json
from retlm.retrieval.chunking import Document, SkipReport
from retlm.retrieval.config import BuildConfig
from retlm.retrieval.format import (
    CHUNK_FILES,
    CHUNKING_FILE,
    CHUNKS_FILE,
    DOC_IDS_FILE,
    INDEX_INFO_FILE,
    NAMES_FILE,
    SEQS_FILE,
    SHARDS_DIR,
    TOKEN_DTYPE,
    TOKENIZER_DIR,
)
from retlm.retrieval.index import (
    add_rows,
    merge_indexes,
    mergeable_empty,
    read_index,
    train_index,
    write_index,
)
from retlm.retrieval.shards import merge_shards, shard_rows
from retlm.retrieval.sources import Part, Source, SourceOptions, provenance, read_parts, split_part
from retlm.retrieval.stages import Builder
from retlm.utils import write_json

RAY_EXTRA = "pip install 'retlm[ray]'"
MAX_RETRIES = 3
SUMMED = ("num_chunks", "num_docs", "num_seqs", "skipped_empty_docs", "bad_records")


class MissingExtraError(ImportError):
    """An optional dependency of the requested feature is not installed."""


def require_ray():
    """The ``ray`` module, or a ``MissingExtraError`` naming the extra to install."""
    try:
        import ray
    except ImportError:
        raise MissingExtraError(f"the Ray engine needs Ray, which is not installed: {RAY_EXTRA}") from None
    return ray


def build_with_ray(
    source: Source | None,
    path: str | os.PathLike,
    config: BuildConfig,
    *,
    address: str | None = None,
    num_shards: int | None = None,
    progress: bool = True,
) -> Path:
    """Build the database of ``source`` (resolved by ``retlm.retrieval.sources``; None once chunked) at
    ``path`` with Ray; the finished database's folder (resolved), which ``build_database`` opens with the
    reader. The chunk stage's tasks read the source's files, or row and byte ranges of them
    (``_document_groups``).

    ``address``: a running cluster (``ray.init(address=...)``); without it, an already initialised Ray
    is used, else a local one is started (and stopped at the end). ``num_shards`` defaults to the
    cluster's CPU count.
    """
    ray = require_ray()
    config.validate()  # num_shards: checked by BuildOptions.validate (build_database is the caller)
    path = Path(path).resolve()
    builder = Builder(path, config, progress)  # checks the options against an unfinished build
    if builder.finished():
        return path
    started = not ray.is_initialized()
    if started and address is None:  # a local Ray for this build
        ray.init(include_dashboard=False, log_to_driver=False)
    elif started:
        ray.init(address=address, log_to_driver=False)
    try:
        shards = num_shards or max(1, int(ray.cluster_resources().get("CPU", 1)))
        _Driver(ray, path, config, shards, progress).run(source)
    finally:
        if started:
            ray.shutdown()
    return path


class _Driver:
    """Submits each stage's tasks and waits for them."""

    def __init__(self, ray, path: Path, config: BuildConfig, shards: int, progress: bool):
        self.ray, self.path, self.config, self.shards, self.progress = ray, path, config, shards, progress
        self.options = asdict(config)
        cpus = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
        self.node_cpus = max(1, int(min((c for c in cpus if c > 0), default=1)))  # the smallest worker node
        self.gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        self.tasks: dict = {}

    def submit(self, function, *args, name: str, whole_node: bool = False, gpu: bool = False):
        """Run ``function(*args)`` as a Ray task on one CPU (a shard), or on a node's CPUs (a stage run
        once, which then uses them all through its threads); retried if its worker dies."""
        key = (function, whole_node, gpu)
        if key not in self.tasks:
            self.tasks[key] = self.ray.remote(
                num_cpus=self.node_cpus if whole_node else 1,
                num_gpus=self.gpus if gpu else 0,
                max_retries=MAX_RETRIES,
            )(function)
        return self.tasks[key].options(name=name).remote(*args)

    def wait(self, refs: list, desc: str) -> list:
        results = [None] * len(refs)
        pending = {ref: i for i, ref in enumerate(refs)}
        with tqdm(total=len(refs), desc=f"ray {desc}", unit="task", disable=not self.progress) as bar:
            while pending:
                done, _ = self.ray.wait(list(pending), num_returns=1)
                for ref in done:
                    try:
                        results[pending.pop(ref)] = self.ray.get(ref)
                    except self.ray.exceptions.RayTaskError as err:  # re-raise the task's own error
                        cause = getattr(err, "cause", None)
                        raise (cause if isinstance(cause, BaseException) else err) from None
                    bar.update(1)
        return results

    def run(self, source: Source | None) -> None:
        path, opts, s = str(self.path), self.options, self.shards
        if not (self.path / CHUNKING_FILE).is_file():
            if source is None:
                raise ValueError("the chunk stage needs a source (a folder, a file or a sequence of strings)")
            groups = _document_groups(source, s)
            g, reading = len(groups), (source.options, source.dataset)
            refs = [
                self.submit(_chunk_task, path, opts, i, g, x, reading, name=f"chunk {i}/{g}")
                for i, x in enumerate(groups)
            ]
            self.wait(refs, "chunk")
            entry = source.describe()
            refs = [
                self.submit(_merge_chunks_task, path, opts, g, entry, name="chunk merge", whole_node=True)
            ]
            SkipReport(*self.wait(refs, "chunk merge")[0]).warn()
        # as the single-process build: no chunk from a source, or too few for an IVF factory, stops here
        Builder(self.path, self.config, progress=False).check_chunked(source)
        refs = [
            self.submit(_stage_task, path, opts, "embed", (i, s), name=f"embed {i}/{s}", gpu=True)
            for i in range(s)
        ]
        self.wait(refs, "embed")
        if not (self.path / INDEX_INFO_FILE).is_file():
            refs = [self.submit(_train_task, path, opts, name="index train", whole_node=True)]
            factory = self.wait(refs, "index train")[0]
            refs = [
                self.submit(_add_task, path, opts, factory, (i, s), name=f"index add {i}/{s}")
                for i in range(s)
            ]
            self.wait(refs, "index add")
            refs = [
                self.submit(_merge_index_task, path, opts, factory, s, name="index merge", whole_node=True)
            ]
            self.wait(refs, "index merge + tune")
        refs = [
            self.submit(
                _stage_task, path, opts, "neighbors", (i, s), name=f"neighbors {i}/{s}", whole_node=True
            )
            for i in range(s)
        ]
        self.wait(refs, "neighbors")
        refs = [self.submit(_stage_task, path, opts, "finalize", None, name="finalize", whole_node=True)]
        self.wait(refs, "finalize")


# ---------------------------------------------------------------------------------------------- chunk
def _document_groups(source: Source, shards: int) -> list[tuple[str, list]]:
    """At most ``shards`` contiguous groups of the source, of about equal size in bytes (characters for
    strings): ``("parts", [Part, ...])``, a file larger than a group's share cut into row or byte ranges
    (``sources.split_part``), or ``("texts", [(index, text), ...])``."""
    if source.strings is not None:
        items: list = list(enumerate(source.strings))
        sizes = [len(text) for _, text in items]
        kind = "texts"
    else:
        share = max(1, sum(p.size for p in source.parts) // shards)
        items = [piece for part in source.parts for piece in split_part(part, -(-part.size // share))]
        sizes = [max(p.size, 1) for p in items]
        kind = "parts"
    ends = np.cumsum(sizes, dtype=np.float64)
    total = ends[-1] if len(ends) else 0.0
    cuts = [0] + [int(np.searchsorted(ends, total * j / shards, side="left")) + 1 for j in range(1, shards)]
    cuts = sorted({min(c, len(items)) for c in cuts} | {len(items)})
    groups = [(kind, items[a:b]) for a, b in zip(cuts[:-1], cuts[1:], strict=True) if b > a]
    return groups or [(kind, [])]


def _chunk_dir(path: Path, shard: int, shards: int) -> Path:
    return path / SHARDS_DIR / f"chunk-{shard:05d}-of-{shards:05d}"


def _chunk_task(
    path: str,
    options: dict[str, Any],
    shard: int,
    shards: int,
    group: tuple[str, list],
    reading: tuple[SourceOptions, Any],
) -> None:
    """Chunk one group of documents into its own folder, exactly as the single-process chunk stage."""
    folder = _chunk_dir(Path(path), shard, shards)
    if (folder / CHUNKING_FILE).is_file():
        return
    builder = Builder(folder, BuildConfig(**options), progress=False)
    report = SkipReport()
    kind, items = group
    if kind == "parts":  # read as the single-process build reads them (retlm.retrieval.sources)
        source_options, dataset = reading
        parts: list[Part] = items
        docs: Iterable[Document] = read_parts(parts, source_options, report, dataset=dataset)
    else:
        docs = (Document(name=f"doc-{i}", text=text) for i, text in items)
    with warnings.catch_warnings():  # the driver warns once for all shards
        warnings.simplefilter("ignore")
        builder.write_chunk_files(docs, report)


def _merge_chunks_task(
    path: str, options: dict[str, Any], shards: int, entry: dict[str, Any]
) -> tuple[list[str], int, int, list[str]]:
    """Concatenate the chunk shards into the database's chunk files (documents, chunks and sequences
    renumbered after the shards before), atomically, with the source's ``entry`` and counts; returns what
    was skipped (the fields of a ``SkipReport``)."""
    root = Path(path)
    if (root / CHUNKING_FILE).is_file():
        return _skipped(read_json(root / CHUNKING_FILE))
    folders = [_chunk_dir(root, i, shards) for i in range(shards)]
    infos = [read_json(f / CHUNKING_FILE) for f in folders]
    tmp = {name: root / f".{name}.tmp" for name in CHUNK_FILES}
    docs = chunks = 0
    with (
        open(tmp[CHUNKS_FILE], "wb") as chunks_out,
        open(tmp[DOC_IDS_FILE], "wb") as doc_ids_out,
        open(tmp[SEQS_FILE], "wb") as seqs_out,
        open(tmp[NAMES_FILE], "wb") as names_out,
    ):
        for folder, info in zip(folders, infos, strict=True):
            for name, out in ((CHUNKS_FILE, chunks_out), (NAMES_FILE, names_out)):
                with open(folder / name, "rb") as part:
                    shutil.copyfileobj(part, out, 1 << 24)
            _copy_offset(folder / DOC_IDS_FILE, doc_ids_out, docs)
            _copy_offset(folder / SEQS_FILE, seqs_out, chunks)
            docs, chunks = docs + info["num_docs"], chunks + info["num_chunks"]
    _save_tokenizer_folder(folders[0] / TOKENIZER_DIR, root / TOKENIZER_DIR)
    for name, file in tmp.items():
        os.replace(file, root / name)
    merged = _merge_infos(infos)
    report = SkipReport.from_record(merged)
    merged.update(report.recorded(), sources=[provenance(entry, report, merged["num_docs"])])
    write_json(root / CHUNKING_FILE, merged)
    return _skipped(merged)


def _skipped(info: dict[str, Any]) -> tuple[list[str], int, int, list[str]]:
    """What was skipped, as the fields of a ``SkipReport`` (a Ray task's picklable result)."""
    report = SkipReport.from_record(info)
    return report.unreadable, report.empty, report.bad_records, report.bad_examples


def _copy_offset(source: Path, out, offset: int, block: int = 1 << 22) -> None:
    """Append the int32 array file ``source`` to ``out`` with ``offset`` added, ``block`` values at a time."""
    dtype = file_dtype(TOKEN_DTYPE)
    values = np.memmap(source, dtype=dtype, mode="r") if source.stat().st_size else np.empty(0, dtype)
    for start in range(0, len(values), block):
        shifted = np.asarray(values[start : start + block], dtype=np.int64) + offset
        out.write(shifted.astype(dtype).tobytes())


def _save_tokenizer_folder(source: Path, folder: Path) -> None:
    """Copy a saved tokenizer folder in atomically (as the single-process stage saves it)."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def _merge_infos(infos: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """chunking.json of the whole from its shards': counts summed, lists concatenated, the rest equal."""
    merged: dict[str, Any] = {}
    for key in infos[0]:
        values = [info[key] for info in infos]
        if key in SUMMED:
            merged[key] = int(sum(values))
        elif isinstance(values[0], list):
            merged[key] = [v for value in values for v in value]
        elif any(v != values[0] for v in values):
            raise RuntimeError(f"chunk shards disagree on {key!r}: {values}")
        else:
            merged[key] = values[0]
    return merged


# ---------------------------------------------------------------------------------------------- stages
def _stage_task(path: str, options: dict[str, Any], stage: str, shard: tuple[int, int] | None) -> None:
    """One shard of a single-process stage (``embed`` / ``neighbors``), or ``finalize``."""
    builder = Builder(Path(path), BuildConfig(**options), progress=False)
    if stage == "finalize":
        if not builder.finished():
            builder.finalize()
    else:
        getattr(builder, stage)(shard)


def _index_files(path: Path, shards: int) -> tuple[Path, list[Path]]:
    folder = path / SHARDS_DIR
    parts = [folder / f"index-{i:05d}-of-{shards:05d}.faiss" for i in range(shards)]
    return folder / "index-trained.faiss", parts


def _train_task(path: str, options: dict[str, Any]) -> str:
    """Merge the embedding shards, train the index once (the single-process sample); its factory."""
    root, config = Path(path), BuildConfig(**options)
    builder = Builder(root, config, progress=False)
    merge_shards(root, "embeddings")
    embeddings = builder.embeddings()
    factory = builder.factory(embeddings)
    trained, _ = _index_files(root, 1)
    if not trained.is_file():
        write_index(train_index(embeddings, factory), trained)
    return factory


def _add_task(path: str, options: dict[str, Any], factory: str, shard: tuple[int, int]) -> None:
    """Add one row shard to a copy of the trained index and write it to its own file."""
    root = Path(path)
    trained, parts = _index_files(root, shard[1])
    if parts[shard[0]].is_file():
        return
    embeddings = Builder(root, BuildConfig(**options), progress=False).embeddings()
    part = mergeable_empty(read_index(trained))
    add_rows(part, embeddings, shard_rows(len(embeddings), shard), progress=False)
    write_index(part, parts[shard[0]])


def _merge_index_task(path: str, options: dict[str, Any], factory: str, shards: int) -> None:
    """Merge the shards' indexes in row order, tune the search, write index.faiss and index.json."""
    root = Path(path)
    builder = Builder(root, BuildConfig(**options), progress=False)
    if (root / INDEX_INFO_FILE).is_file():
        return
    trained, parts = _index_files(root, shards)
    index = merge_indexes(read_index(trained), (read_index(p) for p in parts))
    builder.tune_and_write_index(index, factory)
