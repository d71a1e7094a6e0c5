"""What the integrity checks of ``RetrievalDatabase.open`` cost on a 1M-chunk database.

Writes (once, then reuses) a synthetic database of ``--chunks`` chunks in the real layout: chunk_size 64,
MiniLM's tokenizer, 384-d float16 embeddings, 2 neighbors, an ``IVF1024,SQ8`` index (1M x 384 SQ8 codes,
the size the default ``IVF4096,SQ8`` index has) and a manifest written by ``write_manifest``. Then times,
warm page cache, median of ``--repeat``:

- ``open``: ``RetrievalDatabase.open(verify=False)``, everything it does on every open (the manifest's
  seal and fields, the arrays' sizes and sampled digests, the index read into memory while hashed,
  then parsed by faiss);
- ``open before issue 14``: read the manifest, map the arrays, check their sizes, and
  ``faiss.read_index`` (the peer: faiss reading its own file, unchecked);
- ``sampled array check``: ``integrity.check_samples`` (size + 64 blocks of 4 KiB per array file);
- ``streamed array hash``: the alternative, sha256 of every array file (what ``--verify`` adds);
- ``first search``: open and one query, ours vs before;

and prints the share of the open that the array check takes (the issue's bound: < 5%).

    python bench/integrity.py [--chunks 1000000] [--db-dir /tmp/retlm-bench-1m] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

C, K, DIM = 64, 2, 384
BLOCK = 131_072


def write_database(path: Path, n: int, factory: str) -> None:
    import json

    import faiss

    from retlm.retrieval.config import BuildConfig
    from retlm.retrieval.index import write_index
    from retlm.retrieval.manifest import write_manifest
    from retlm.retrieval.stages import save_tokenizer, tokenizers_entry
    from retlm.tokenization import load_tokenizer

    rng = np.random.default_rng(0)
    path.mkdir(parents=True, exist_ok=True)
    docs = n // 16  # 16 chunks per document
    with open(path / "chunks.dat", "wb") as chunks, open(path / "embeddings.dat", "wb") as embeddings:
        for start in range(0, n, BLOCK):
            rows = min(BLOCK, n - start)
            chunks.write(rng.integers(1000, 30000, (rows, C + 1), dtype="<i4").tobytes())
            x = rng.standard_normal((rows, DIM), dtype=np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            embeddings.write(x.astype("<f2").tobytes())
    np.repeat(np.arange(docs, dtype="<i4"), 16).tofile(path / "doc_ids.dat")
    np.arange(0, n, 8, dtype="<i4").tofile(path / "seqs.dat")
    rng.integers(0, n, (n, K), dtype="<i4").tofile(path / "knn.dat")
    config = BuildConfig(chunk_size=C, num_neighbors=K, seq_len=512, index_factory=factory, tokenizer="bert")
    lm_tokenizer = load_tokenizer("bert")  # the seed's vocabulary: ids 1000..30000 are words in it
    save_tokenizer(lm_tokenizer, path / "tokenizer")
    (path / "doc_names.jsonl").write_text("".join(json.dumps(f"doc-{d}.txt") + "\n" for d in range(docs)))

    vectors = np.memmap(path / "embeddings.dat", dtype="<f2", mode="r", shape=(n, DIM))
    index = faiss.index_factory(DIM, factory, faiss.METRIC_INNER_PRODUCT)
    index.train(np.ascontiguousarray(vectors[: 32 * 1024], dtype=np.float32))
    for start in range(0, n, BLOCK):
        index.add(np.ascontiguousarray(vectors[start : start + BLOCK], dtype=np.float32))
    write_index(index, path / "index.faiss")

    settings = asdict(config)
    chunking = {
        **tokenizers_entry(config, lm_tokenizer),  # the manifest's tokenizer fields, as a build writes them
        "embedder_truncated_chunks": 0,
        "num_chunks": n,
        "num_docs": docs,
        "num_seqs": len(range(0, n, 8)),
        "pad_id": 0,
        "eos_id": 102,
        "vocab_size": 30522,
    }
    index_info = {"index_type": factory, "nprobe": 8, "recall_at_k": 0.95, "recall_queries": 1000}
    write_manifest(path, settings, chunking, index_info, DIM)


def median_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=1_000_000)
    parser.add_argument("--db-dir", type=Path, default=Path("/tmp/retlm-bench-1m"))
    parser.add_argument("--factory", default="IVF1024,SQ8")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    import faiss

    from retlm import RetrievalDatabase
    from retlm.checksums import sha256_file
    from retlm.retrieval import format, integrity
    from retlm.retrieval._storage import read_json

    path = args.db_dir
    manifest_file = path / "manifest.json"
    if not manifest_file.is_file() or read_json(manifest_file)["num_chunks"] != args.chunks:
        start = time.perf_counter()
        write_database(path, args.chunks, args.factory)
        print(f"wrote {path} in {time.perf_counter() - start:.0f} s")
    manifest = read_json(path / "manifest.json")
    sizes = {name: (path / name).stat().st_size for name in (*format.ARRAY_FILES, "index.faiss")}
    print(
        f"database: {manifest['num_chunks']:,} chunks; "
        + ", ".join(f"{name} {size / 2**20:.0f} MiB" for name, size in sizes.items())
    )
    for name in sizes:  # warm the page cache
        sha256_file(path / name)

    query = np.random.default_rng(1).standard_normal((1, DIM), dtype=np.float32)
    query /= np.linalg.norm(query)

    def before_open():  # the pre-issue-14 open: manifest, mapped arrays, sizes; the index parsed unchecked
        db = RetrievalDatabase(path, read_json(path / "manifest.json"))
        index = faiss.read_index(str(path / "index.faiss"))
        index.nprobe = 8
        return db, index

    def ours_search():
        RetrievalDatabase.open(path, verify=False).index.search(query, K)

    def before_search():
        before_open()[1].search(query, K)

    times = {
        "open: all checks, index read + hashed + parsed": median_time(
            lambda: RetrievalDatabase.open(path, verify=False), args.repeat
        ),
        "open before issue 14 (+ faiss.read_index, unchecked)": median_time(before_open, args.repeat),
        "  sampled array check (part of open)": median_time(
            lambda: integrity.check_samples(path, manifest), args.repeat
        ),
        "  index sha256 alone": median_time(lambda: sha256_file(path / "index.faiss"), args.repeat),
        "streamed array hash (the alternative; --verify)": median_time(
            lambda: [sha256_file(path / name) for name in format.ARRAY_FILES], max(1, args.repeat // 2)
        ),
        "open + first search, ours": median_time(ours_search, args.repeat),
        "open + first search, before issue 14": median_time(before_search, args.repeat),
    }
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs; python {platform.python_version()}, "
        f"faiss {faiss.__version__}; warm page cache, median of {args.repeat}"
    )
    width = max(map(len, times))
    for name, seconds in times.items():
        print(f"  {name:<{width}}  {seconds * 1000:9.1f} ms")
    opened = times["open: all checks, index read + hashed + parsed"]
    sampled = times["  sampled array check (part of open)"]
    streamed = times["streamed array hash (the alternative; --verify)"]
    print(f"sampled array check / open:  {sampled / opened:.2%}  (the issue's bound: < 5%)")
    print(f"streamed array hash / open:  {streamed / opened:.2%}")
    before = times["open before issue 14 (+ faiss.read_index, unchecked)"]
    print(f"open, ours / before:         {opened / before:.2f}x")
    search = times["open + first search, ours"] / times["open + first search, before issue 14"]
    print(f"first search, ours / before: {search:.2f}x")


if __name__ == "__main__":
    main()
