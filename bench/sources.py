"""Reading a multi-GB corpus (issue #21): throughput and peak memory of ``retlm.retrieval.sources`` beside
a bare ``json.loads`` loop over the same lines and Hugging Face ``datasets``' streaming JSON reader, and
of the build's chunk stage (read + GPT-2 BPE + chunking) over the whole file.

    python bench/sources.py generate /tmp/corpus.jsonl --gib 2.5 --zst      # writes .jsonl and .jsonl.zst
    python bench/sources.py read /tmp/corpus.jsonl /tmp/corpus.jsonl.zst   # ours vs bare loop vs datasets
    python bench/sources.py chunk /tmp/corpus.jsonl --out /tmp/chunked     # the chunk stage, whole file
    python bench/sources.py build /tmp/corpus.jsonl --docs 2000 --out /tmp/db   # every stage, first docs

The documents are Python's own documentation (pydoc topics and standard-library docstrings, about 2 MB
of English), cut into records of 1-8 paragraphs drawn at random, each record with a ``content`` field
(the text) and an ``id``. Peak RSS is the kernel's high-water mark (VmHWM), reset before each reader.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _memory import proc_status_bytes, release_free_memory, reset_peak_rss  # noqa: E402

MIB = 1 << 20


def paragraphs() -> list[str]:
    from retlm.demo.corpus import pydoc_topics, stdlib_docstrings

    found = []
    for _, text in itertools.chain(pydoc_topics(), stdlib_docstrings()):
        found += [p.strip() for p in text.split("\n\n") if len(p.strip()) > 40]
    return found


def generate(path: Path, gib: float, zst: bool, seed: int = 0) -> None:
    pool, rng = paragraphs(), np.random.default_rng(seed)
    target, written, n = int(gib * (1 << 30)), 0, 0
    start = time.perf_counter()
    with open(path, "wb", buffering=16 * MIB) as f:
        while written < target:
            picks = rng.integers(0, len(pool), size=(4096, 8))
            counts = rng.integers(1, 9, size=4096)
            lines = [
                json.dumps({"id": f"rec-{n + i}", "content": "\n\n".join(pool[j] for j in row[:c])}) + "\n"
                for i, (row, c) in enumerate(zip(picks, counts, strict=True))
            ]
            data = "".join(lines).encode("utf-8")
            f.write(data)
            written, n = written + len(data), n + len(lines)
    print(f"wrote {path}: {written / MIB:,.0f} MiB, {n:,} records in {time.perf_counter() - start:.0f} s")
    if zst:
        import zstandard

        out = path.with_name(path.name + ".zst")
        with open(path, "rb") as src, open(out, "wb") as dst:
            zstandard.ZstdCompressor(level=3, threads=-1).copy_stream(src, dst)
        print(f"wrote {out}: {out.stat().st_size / MIB:,.0f} MiB")


# ---------------------------------------------------------------------------------------------- readers
def read_ours(path: Path, limit: int | None) -> tuple[int, int]:
    from retlm.retrieval.chunking import SkipReport
    from retlm.retrieval.sources import SourceOptions, open_source

    docs = open_source(path, SourceOptions(text_field="content", id_field="id")).documents(SkipReport())
    n = chars = 0
    for doc in itertools.islice(docs, limit):
        n, chars = n + 1, chars + len(doc.text)
    return n, chars


def read_bare(path: Path, limit: int | None) -> tuple[int, int]:
    """The least a JSONL reader can do: lines of the (decompressed) file, ``json.loads``, the field."""
    from retlm.retrieval.source_formats import open_binary

    n = chars = 0
    with open_binary(path) as f:
        for line in itertools.islice(f, limit):
            chars += len(json.loads(line)["content"])
            n += 1
    return n, chars


def read_datasets(path: Path, limit: int | None) -> tuple[int, int]:
    import datasets

    datasets.disable_progress_bars()
    stream = datasets.load_dataset("json", data_files=str(path), split="train", streaming=True)
    n = chars = 0
    for row in itertools.islice(stream, limit):
        n, chars = n + 1, chars + len(row["content"])
    return n, chars


READERS = {
    "retlm sources": read_ours,
    "bare json.loads loop": read_bare,
    "datasets streaming json": read_datasets,
}


def bench_read(paths: list[Path], limit: int | None, methods: list[str]) -> None:
    print(f"load average {os.getloadavg()[0]:.1f} (2 cores)")
    for name in methods:  # imports and first-call costs out of the timings
        READERS[name](paths[0], 1)
    for path in paths:
        rates = {}
        for name in methods:
            release_free_memory()
            reset_peak_rss()
            start = time.perf_counter()
            n, chars = READERS[name](path, limit)
            elapsed = time.perf_counter() - start
            peak = proc_status_bytes("VmHWM") / MIB
            rates[name] = chars / elapsed / MIB
            print(
                f"{path.name:24s} {name:26s} {n:>9,} docs {chars / MIB:>8,.0f} M chars  {elapsed:7.1f} s  "
                f"{rates[name]:6.1f} M chars/s  {n / elapsed:8,.0f} docs/s  peak RSS {peak:6.0f} MiB"
            )
        base = rates.get("retlm sources")
        for name, rate in rates.items():
            if base and name != "retlm sources":
                print(f"{'':24s} retlm sources / {name}: {base / rate:.2f}x")


# ---------------------------------------------------------------------------------------------- build
def bench_build(path: Path, out: Path, stage: str, docs: int | None) -> None:
    from retlm.retrieval import RetrievalDatabase

    print(f"load average {os.getloadavg()[0]:.1f} (2 cores)")
    if docs is not None:  # the first documents, as a file of their own
        head = out.with_name(out.name + "-head.jsonl")
        with open(path, "rb") as src, open(head, "wb") as dst:
            dst.writelines(itertools.islice(src, docs))
        path = head
    size = path.stat().st_size
    start = time.perf_counter()
    RetrievalDatabase.build(
        path, out, stage=stage, text_field="content", id_field="id", progress=False, chunk_size=64
    )
    elapsed = time.perf_counter() - start
    name = "chunking.json" if stage == "chunk" else "manifest.json"
    info = json.loads((out / name).read_text())
    peak = proc_status_bytes("VmHWM") / MIB
    print(
        f"{path.name}: stage {stage}, {size / MIB:,.0f} MiB of JSONL, {info['num_docs']:,} docs, "
        f"{info['num_chunks']:,} chunks of 64 GPT-2 tokens in {elapsed:,.0f} s: "
        f"{size / MIB / elapsed:.2f} MiB/s, {info['num_chunks'] / elapsed:,.0f} chunks/s; "
        f"peak RSS {peak:,.0f} MiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate")
    gen.add_argument("path", type=Path)
    gen.add_argument("--gib", type=float, default=2.5)
    gen.add_argument("--zst", action="store_true")
    read = sub.add_parser("read")
    read.add_argument("paths", type=Path, nargs="+")
    read.add_argument("--limit", type=int, default=None, help="documents per reader (default: all)")
    read.add_argument("--methods", nargs="+", default=list(READERS), choices=list(READERS))
    for name in ("chunk", "build"):
        cmd = sub.add_parser(name)
        cmd.add_argument("path", type=Path)
        cmd.add_argument("--out", type=Path, required=True)
        cmd.add_argument("--docs", type=int, default=None, help="only the first documents")
    args = parser.parse_args()
    if args.command == "generate":
        generate(args.path, args.gib, args.zst)
    elif args.command == "read":
        bench_read(args.paths, args.limit, args.methods)
    else:
        bench_build(args.path, args.out, "chunk" if args.command == "chunk" else "all", args.docs)


if __name__ == "__main__":
    main()
