"""`retlm build-db`, `retlm add`, `retlm search`, `retlm db-info`: the retrieval database from the command
line."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from retlm.errors import OptionError, check_int
from retlm.options import add_dataclass_arguments, option, options_from
from retlm.retrieval.config import EMBED_BACKENDS, BuildOptions
from retlm.retrieval.sources import SourceOptions
from retlm.utils import quoted

SOURCE_HELP = (
    "where the documents are: a folder of text files (see --glob), a .jsonl file (plain, .gz or .zst), a "
    ".parquet or .csv file, a folder of such files, a Hugging Face dataset folder (save_to_disk) or a Hub "
    "dataset name owner/name (online; see --split)"
)
WAIT_HELP = "fail at once if another build or add holds the database's lock (default: wait for it)"


@dataclass(frozen=True, kw_only=True)
class BuildCommandOptions(BuildOptions):
    """The options of `retlm build-db`: SOURCE, DB and every option of ``RetrievalDatabase.build``
    (``retlm.retrieval.config.BuildOptions``)."""

    source: str = option(positional=True, metavar="SOURCE", help=SOURCE_HELP)
    out: Path = option(metavar="DB", help="database folder to write")

    def build_options(self) -> BuildOptions:
        """The options of ``RetrievalDatabase.build(source, out, options)``."""
        return BuildOptions(**{f.name: getattr(self, f.name) for f in fields(BuildOptions)})


@dataclass(frozen=True, kw_only=True)
class AddOptions(SourceOptions):
    """The options of `retlm add`: ``RetrievalDatabase.open(db).add(source, **kwargs)``."""

    db: Path = option(positional=True, metavar="DB", help="the database folder to add to")
    source: str = option(positional=True, metavar="SOURCE", help=SOURCE_HELP)
    progress: bool = option(True, negate=True, help="hide progress bars")
    wait: bool = option(True, negate=True, help=WAIT_HELP)

    def validate(self) -> None:
        SourceOptions.validate(self)
        if not (self.db / "manifest.json").is_file():
            raise OptionError(f"DB: no retrieval database at {self.db} (build one with `retlm build-db`)")

    def add_kwargs(self) -> dict[str, Any]:
        names = [f.name for f in fields(SourceOptions)] + ["progress", "wait"]
        return {name: getattr(self, name) for name in names}


@dataclass(frozen=True, kw_only=True)
class InfoOptions:
    """The options of `retlm db-info`."""

    db: Path = option(positional=True, metavar="DB", help="database folder")
    verify: bool = option(False, help="check file checksums (reads every file)")
    json: bool = option(False, help="print the whole manifest as json")


@dataclass(frozen=True, kw_only=True)
class SearchOptions:
    """The options of `retlm search`."""

    db: Path = option(positional=True, metavar="DB", help="database folder")
    query: list[str] = option(
        positional=True, nargs="+", metavar="QUERY", help="query text(s); each is searched"
    )
    k: int = option(4, flag="-k", metavar="K", help="neighbors per query")
    exclude_doc: int | None = option(None, metavar="DOC_ID", help="skip the chunks of this document")
    json: bool = option(False, help="print json instead of text")
    embed_backend: str | None = option(
        None,
        choices=EMBED_BACKENDS,
        help="embed the queries with this backend instead of the database's own (a warning: vectors "
        "then differ slightly from the database's)",
    )

    def validate(self) -> None:
        """The checks that need no database (``-k`` against its size and --exclude-doc: ``run_search``)."""
        check_int("-k", self.k)
        for query in self.query:
            if not query.strip():
                raise OptionError("QUERY is empty: give some text to search for")


def register(subparsers: argparse._SubParsersAction) -> None:
    build = subparsers.add_parser(
        "build-db",
        help="build a retrieval database from a folder of text, JSONL, Parquet, CSV or a HF dataset",
        description="Read the documents of SOURCE (a folder's files matching --glob, or the records of a "
        "JSONL, Parquet or CSV file or a Hugging Face dataset, streamed), cut them into chunks, embed "
        "them with a frozen encoder, index them with faiss and precompute each chunk's nearest neighbors "
        "from other documents. Re-running a killed build resumes it. For builds spread over many jobs, "
        "run --stage chunk, then --stage embed --shard i/n for every i, --stage index, --stage neighbors "
        "--shard i/n for every i, and --stage finalize (see docs/retrieval.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_dataclass_arguments(build, BuildCommandOptions)
    build.set_defaults(func=run_build)

    add = subparsers.add_parser(
        "add",
        help="add the documents of a source to a database",
        description="Append the documents of SOURCE (any source build-db reads, with the same options) to "
        "the database DB: only the new chunks are embedded, the index is extended and the neighbors "
        "updated; one rename of manifest.json publishes the result, so a reader (or a kill) sees the old "
        "database or the new one. A second writer waits for the first (--no-wait: fails naming its PID).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_dataclass_arguments(add, AddOptions)
    add.set_defaults(func=run_add)

    search = subparsers.add_parser(
        "search",
        help="find the chunks of a database nearest to a query text",
        description="Embed the query (its first chunk_size tokens, as a chunk) and print the k nearest "
        "chunks with their score, chunk id, document id and text.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_dataclass_arguments(search, SearchOptions)
    search.set_defaults(func=run_search)

    info = subparsers.add_parser(
        "db-info",
        help="describe a retrieval database",
        description="Print a database's manifest: sizes, tokenizer, embedder, index and its measured "
        "recall. --verify also checks every file against its sha256 checksum.",
    )
    add_dataclass_arguments(info, InfoOptions)
    info.set_defaults(func=run_info)


def run_build(args: argparse.Namespace) -> int:
    from retlm.retrieval import RetrievalDatabase
    from retlm.retrieval.chunking import EmptySourceError

    opts = options_from(args, BuildCommandOptions)
    try:
        db = RetrievalDatabase.build(opts.source, opts.out, opts.build_options())
    except (EmptySourceError, FileNotFoundError) as err:
        raise OptionError(str(err)) from None
    except ValueError as err:
        if "must" in str(err):  # an option with a bad value
            raise OptionError(str(err)) from None
        raise
    if db is None:
        print(f"stage {opts.stage}{' shard ' + opts.shard if opts.shard else ''} done: {opts.out}")
    else:
        print(f"built {db!r}")
    return 0


def run_add(args: argparse.Namespace) -> int:
    from retlm.retrieval import RetrievalDatabase
    from retlm.retrieval.chunking import EmptySourceError

    opts = options_from(args, AddOptions)
    opts.validate()
    db = RetrievalDatabase.open(opts.db, verify=False)
    before = (db.num_docs, db.num_chunks)
    try:
        db.add(opts.source, **opts.add_kwargs())
    except (EmptySourceError, FileNotFoundError) as err:
        raise OptionError(str(err)) from None
    print(
        f"added {db.num_docs - before[0]} documents ({db.num_chunks - before[1]} chunks) to {opts.db}: "
        f"now {db.num_docs} documents, {db.num_chunks} chunks"
    )
    return 0


def run_search(args: argparse.Namespace) -> int:
    from retlm.retrieval import RetrievalDatabase

    opts = options_from(args, SearchOptions)
    opts.validate()
    db = RetrievalDatabase.open(opts.db, verify=False, embed_backend=opts.embed_backend)
    db.check_k(opts.k, "-k")  # before any embedding: a huge -k is refused, not allocated
    if opts.exclude_doc is not None and not 0 <= opts.exclude_doc < db.num_docs:
        raise OptionError(
            f"--exclude-doc must be a document id in 0..{db.num_docs - 1}, got {opts.exclude_doc}"
        )
    result = db.search(opts.query, opts.k, exclude_doc_ids=opts.exclude_doc)
    rows = []
    for query, ids, docs, scores, texts in zip(
        opts.query, result.chunk_ids, result.doc_ids, result.scores, result.texts, strict=True
    ):
        found = [
            {
                "chunk_id": int(i),
                "doc_id": int(d),
                "doc_name": db.doc_name(int(d)),
                "score": float(s),
                "text": t,
            }
            for i, d, s, t in zip(ids[ids >= 0], docs[ids >= 0], scores[ids >= 0], texts, strict=True)
        ]
        rows.append({"query": query, "neighbors": found})
    if opts.json:
        json.dump(rows, sys.stdout, indent=2)
        print()
        return 0
    for row in rows:
        print(f"query: {row['query']}")
        if not row["neighbors"]:
            print("  (no neighbors: the database is empty)")
        for rank, hit in enumerate(row["neighbors"], 1):
            print(
                f"  {rank}. {hit['doc_name']}  score {hit['score']:.4f}  chunk {hit['chunk_id']}  "
                f"doc {hit['doc_id']}"
            )
            print(quoted(hit["text"], "     | "))
    return 0


def run_info(args: argparse.Namespace) -> int:
    from retlm.retrieval import RetrievalDatabase

    opts = options_from(args, InfoOptions)
    db = RetrievalDatabase.open(opts.db, verify=opts.verify)
    m = db.manifest
    if opts.json:
        print(json.dumps(m, indent=2, sort_keys=True))
        return 0
    size = sum(f.stat().st_size for f in Path(opts.db).iterdir() if f.is_file())
    lines = [
        ("path", str(db.path)),
        ("chunks", f"{m['num_chunks']} of {m['chunk_size']} tokens, from {m['num_docs']} documents"),
        ("sequences", f"{m['num_seqs']} of {m['seq_len']} tokens"),
        ("neighbors", f"{m['num_neighbors']} per chunk (same document excluded)"),
        (
            "tokenizer",
            f"{m['tokenizer']['name']} ({m['tokenizer']['vocab_size']} tokens, pad {m['pad_id']}, "
            f"eos {m['eos_id']}, vocabulary sha256 {m['tokenizer']['sha256'][:12]}...)",
        ),
        ("retriever", m.get("retriever", "dense")),
        (
            "embedder",
            f"{m['embedder']} ({m['pooling']} pooling, {m['embedding_dim']}-d {m['embedding_dtype']}, "
            f"embed backend {m.get('embed_backend', 'torch')})",
        ),
        (
            "embedder input",
            f"each chunk's text, re-tokenized by the embedder ({m['embedder_tokenizer']['vocab_size']} "
            f"tokens, at most {m['embedder_tokenizer']['max_length']}; "
            f"{m['embedder_truncated_chunks']} chunks truncated)"
            if m["embedder_input"] == "text"
            else "the chunks' ids (the LM tokenizer is the embedder's)",
        ),
        (
            "index",
            f"{m['index_type']}"
            + (f", nprobe {m['nprobe']}" if m["nprobe"] else "")
            + (f", k_factor {m['k_factor']:g}" if m.get("k_factor") else ""),
        ),
        (
            "recall@k",
            f"{m['recall_at_k']:.4f} vs exact search ({m['recall_queries']} held-out queries)"
            if m["recall_queries"]
            else "1.0 (exact index)",
        ),
        *source_lines(m),
        ("size on disk", f"{size / 2**20:.1f} MiB"),
        (
            "checksums",
            "every file verified"
            if opts.verify
            else "manifest, index and sampled array blocks checked (every byte: --verify)",
        ),
    ]
    width = max(len(name) for name, _ in lines)
    for name, value in lines:
        print(f"{name:<{width}}  {value}")
    return 0


def source_lines(manifest: dict[str, Any]) -> list[tuple[str, str]]:
    """db-info's lines on where the documents came from (the manifest's ``sources``, one per build or
    add): the source, its format and fields, its documents and what was skipped."""
    sources = manifest.get("sources")
    if not sources:
        return [("sources", "not recorded (built by an older retlm)")]
    lines = []
    for i, entry in enumerate(sources, 1):
        how = [entry.get("format", "?")]
        if entry.get("glob"):
            how.append(f"glob {entry['glob']}, {entry.get('files', '?')} files")
        if entry.get("file_formats") and entry["file_formats"] != ["txt"]:
            how.append("formats " + "/".join(entry["file_formats"]))
        if entry.get("text_field"):
            how.append(f"text field {entry['text_field']!r}")
            how.append(f"id field {entry['id_field']!r}" if entry.get("id_field") else "named file:line/row")
        if entry.get("split"):
            how.append(f"split {entry['split']}")
        counts = [f"{entry.get('documents', 0)} documents"]
        for key, what in (
            ("bad_records", "bad records skipped"),
            ("empty_documents", "empty skipped"),
            ("unreadable_files", "unreadable files skipped"),
        ):
            if entry.get(key):
                counts.append(f"{entry[key]} {what}")
        name = "sources" if i == 1 else ""
        lines.append((name, f"{i}. {entry.get('source', '?')} ({'; '.join(how)}): {', '.join(counts)}"))
    return lines
