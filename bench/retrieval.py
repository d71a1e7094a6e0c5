"""Retrieval benchmarks: the embed stage with each embed backend against the float32 torch reference
(speed ratio and neighbor agreement), the chunk stage, and the index on
synthetic embeddings: the previous default (IVF 4 sqrt(n), SQ8), the new one (fast-scan PQ with a
float16 re-rank), variants (float32 re-rank, HNSW coarse quantizer) and, when a separate virtualenv with
it is given, autofaiss, side by side at each size: train / add / tune time, recall@2 against exact search
on fresh queries and on the neighbor stage's own output, neighbor-stage throughput (wall clock and per
2 CPU-seconds, with the load average), index bytes per vector and peak memory.

    python bench/retrieval.py embed --chunks 1024 [--backends torch onnx onnx-int8 openvino]
    python bench/retrieval.py chunk                                  # chunk stage, GPT-2 tokenizer
    python bench/retrieval.py index --n 200000 1000000 [--autofaiss-python /tmp/autofaiss-venv/bin/python]
    python bench/retrieval.py scale --n 100000 1000000 3000000     # the cost curve (docs/scaling.md)

Each index run happens in a child process so its peak RSS (``ru_maxrss``) is its own.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _embedding import bench_embed, chunk_rate

DIM, INTRINSIC, K, EXTRA = 384, 16, 2, 10


# ---------------------------------------------------------------------------------------------- index
def synthetic(path: Path, n: int, seed: int, block: int = 100_000, dtype: str = "float32") -> Path:
    """Unit vectors of low intrinsic dimension: a random 16-d Gaussian mixed into 384-d, plus noise.
    Written block by block into a ``.npy`` (autofaiss reads ``.npy`` folders); ``float16`` is what the
    database stores in ``embeddings.dat``."""
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(1234).standard_normal((INTRINSIC, DIM)).astype(np.float32)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(n, DIM))
    for start in range(0, n, block):
        z = rng.standard_normal((min(block, n - start), INTRINSIC)).astype(np.float32)
        x = z @ mixing + 0.1 * rng.standard_normal((len(z), DIM)).astype(np.float32)
        out[start : start + len(z)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    out.flush()
    return path


def previous_factory(n: int) -> str:
    """retlm's default before issue 12: ``IVF{4 sqrt n},SQ8`` (nprobe tuned)."""
    return f"IVF{2 ** round(math.log2(4 * math.sqrt(n)))},SQ8"


def load_average() -> float:
    return os.getloadavg()[0]


def child_ours(args) -> dict:
    """Train, add, tune, then time the neighbor stage, in this (child) process; prints one json line."""
    from retlm.retrieval.index import (
        add_rows,
        exact_search,
        recall_at_k,
        set_search_params,
        train_index,
        tune_search,
        write_index,
    )
    from retlm.retrieval.neighbors import compute_neighbors, search_excluding

    x = np.load(args.data, mmap_mode="r")
    queries = np.load(args.queries)
    loads = [load_average()]
    start = time.perf_counter()
    index = train_index(x, args.factory)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    add_rows(index, x, progress=False)
    add_s = time.perf_counter() - start
    start = time.perf_counter()
    if args.nprobe:
        set_search_params(index, args.nprobe, args.k_factor)
        tuning = {"nprobe": args.nprobe, "k_factor": args.k_factor, "recall_tuning": None}
    else:
        t = tune_search(index, x, K, target=0.95, fetch=K + EXTRA)
        tuning = {"nprobe": t.nprobe, "k_factor": t.k_factor, "recall_tuning": t.recall}
    tune_s = time.perf_counter() - start
    loads.append(load_average())
    # fresh queries, asked exactly as the neighbor stage asks (k + extra results, first k kept)
    start = time.perf_counter()
    ids, _ = search_excluding(index, queries, K, np.zeros(len(x), dtype=np.int32), None, EXTRA)
    query_s = time.perf_counter() - start
    np.save(args.out, ids)
    # the neighbor stage itself on the first rows (one document per chunk: only itself is excluded)
    rows = min(len(x), args.rows)
    doc_ids = np.arange(len(x), dtype=np.int32)
    walls, cpus = [], []
    with tempfile.TemporaryDirectory(dir=Path(args.out).parent) as tmp:
        for repeat in range(args.repeats):
            knn_path = Path(tmp) / f"knn-{repeat}.dat"
            wall, cpu = time.perf_counter(), time.process_time()
            compute_neighbors(index, x, doc_ids, K, knn_path, rows=(0, rows), extra=EXTRA, progress=False)
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
            loads.append(load_average())
        knn = np.fromfile(knn_path, dtype="<i4").reshape(rows, K)
        check = np.sort(np.random.default_rng(2).choice(rows, size=min(1000, rows), replace=False))
        _, exact = exact_search(np.asarray(x[check], dtype=np.float32), x, K + 1)
        exact = np.stack([row[row != q][:K] for row, q in zip(exact, check, strict=True)])
        stage_recall = recall_at_k(knn[check], exact)
        write_index(index, Path(tmp) / "index.faiss")
        index_bytes = (Path(tmp) / "index.faiss").stat().st_size
    return {
        "factory": args.factory,
        "train_s": train_s,
        "add_s": add_s,
        "tune_s": tune_s,
        **tuning,
        "query_s": query_s,
        "neighbor_rows": rows,
        "neighbors_per_s": rows / min(walls),
        "neighbors_per_2cpu_s": 2 * rows / min(cpus),
        "stage_recall_at_2": stage_recall,
        "index_bytes_per_vector": index_bytes / len(x),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "load_average": [round(v, 1) for v in loads],
    }


AUTOFAISS_SCRIPT = """
import json, os, resource, sys, time, numpy as np, faiss
from autofaiss import build_index
folder, index_path, queries_path, out_path, K = *sys.argv[1:5], int(sys.argv[5])
start = time.perf_counter()
build_index(embeddings=folder, index_path=index_path, index_infos_path=index_path + ".json",
            metric_type="ip", max_index_memory_usage="4G", current_memory_available="8G", verbose=30)
build_s = time.perf_counter() - start
index = faiss.read_index(index_path)
queries = np.load(queries_path)
start = time.perf_counter()
_, ids = index.search(queries, K)
query_s = time.perf_counter() - start
np.save(out_path, ids)
rows = np.load(os.path.join(folder, "emb.npy"), mmap_mode="r")[:20000].astype("float32")
start = time.perf_counter()
index.search(rows, K + 10)
rate = len(rows) / (time.perf_counter() - start)
info = json.load(open(index_path + ".json"))
print(json.dumps({"factory": info.get("index_key"), "train_s": build_s, "query_s": query_s,
                  "nprobe_params": info.get("index_param"), "search_k12_per_s": rate,
                  "index_bytes_per_vector": os.path.getsize(index_path) / index.ntotal,
                  "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def run_child(cmd: list[str], timeout: float) -> dict:
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def recall(ids: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(e)) / len(e) for a, e in zip(ids, exact, strict=True)]))


def candidates(n: int, methods: list[str]) -> list[tuple[str, str]]:
    """(name, factory) of each index compared at ``n`` vectors."""
    from retlm.retrieval.index import choose_factory, nlist_for

    new = choose_factory(n, exact_threshold=0)
    coarse = f"IVF{nlist_for(n)}"
    table = {
        "before": ("before: IVF 4 sqrt(n), SQ8 (nprobe tuned)", previous_factory(n)),
        "new": ("new default: fast-scan PQ + float16 re-rank (nprobe, k_factor tuned)", new),
        "rflat": ("fast-scan PQ + float32 re-rank (RFlat)", new.replace("Refine(SQfp16)", "RFlat")),
        "hnsw": ("fast-scan PQ + re-rank, HNSW coarse quantizer", new.replace(coarse, f"{coarse}_HNSW32")),
        "sq8-refine": ("fast-scan PQ + 8-bit re-rank", new.replace("Refine(SQfp16)", "Refine(SQ8)")),
        "megatron": (
            "Megatron's RETRO index, scaled (OPQ, 32-byte PQ, no re-rank)",
            f"OPQ32_64,{coarse}_HNSW8,PQ32",
        ),
    }
    return [table[m] for m in methods if m in table]


def bench_index(n: int, args) -> list[dict]:
    from retlm.retrieval.index import exact_search

    work = Path(tempfile.mkdtemp(prefix=f"bench-index-{n}-", dir=args.workdir))
    data_dir = work / "data"
    data_dir.mkdir()
    data = synthetic(data_dir / "emb.npy", n, seed=0, dtype=args.dtype)
    queries = np.asarray(np.load(synthetic(work / "queries.npy", args.queries, seed=1)))
    start = time.perf_counter()
    _, exact = exact_search(queries, np.load(data, mmap_mode="r"), K)
    exact_s = time.perf_counter() - start
    rows = []
    me = [sys.executable, __file__, "_ours", "--data", str(data), "--queries", str(work / "queries.npy")]
    me += ["--rows", str(args.rows), "--repeats", str(args.repeats)]
    for name, factory in candidates(n, args.methods):
        out = work / f"ids-{len(rows)}.npy"
        row = run_child([*me, "--out", str(out), "--factory", factory], args.timeout)
        if "error" not in row:
            row["recall_at_2"] = recall(np.load(out), exact)
        rows.append({"n": n, "method": name, **row})
        print(json.dumps(rows[-1]), flush=True)
    if "autofaiss" in args.methods:
        if args.autofaiss_python and n <= args.autofaiss_max_n:
            out = work / "ids-autofaiss.npy"
            script = work / "autofaiss_run.py"
            script.write_text(AUTOFAISS_SCRIPT)
            cmd = [args.autofaiss_python, str(script), str(data_dir), str(work / "autofaiss.index")]
            row = run_child([*cmd, str(work / "queries.npy"), str(out), str(K)], args.timeout)
            if "error" not in row:
                row["recall_at_2"] = recall(np.load(out), exact)
        else:
            row = {"error": "not run (no --autofaiss-python, or n above --autofaiss-max-n)"}
        rows.append({"n": n, "method": "autofaiss 2.18 defaults (own venv, faiss 1.8)", **row})
        print(json.dumps(rows[-1]), flush=True)
    rows.append({"n": n, "method": "exact (blocked IndexFlatIP), ground truth", "query_s": exact_s})
    print(json.dumps(rows[-1]), flush=True)
    print(summary(rows), flush=True)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def summary(rows: list[dict]) -> str:
    """A markdown table of one size's rows, with each index's neighbor rate over the previous default's."""
    base = next((r for r in rows if r["method"].startswith("before") and "error" not in r), None)
    lines = [
        "| method | index | nprobe | k_factor | train s | add s | tune s | recall@2 (fresh queries) "
        "| recall@2 (stage) | neighbors/s wall | per 2 CPU-s | vs before | bytes/vector | peak RSS GiB "
        "| load avg |",
        "|" + "---|" * 15,
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['error']} |" + " |" * 13)
            continue

        def f(key: str, fmt: str = ".1f", r: dict = r) -> str:
            return format(r[key], fmt) if r.get(key) is not None else "–"

        rate = r.get("neighbors_per_s") or r.get("search_k12_per_s")
        ratio = f"{rate / base['neighbors_per_s']:.1f}x" if base and rate else "–"
        load = r.get("load_average") or ["–"]
        nprobe = r.get("nprobe") or r.get("nprobe_params") or "–"
        cells = [
            r["method"],
            r.get("factory") or "",
            nprobe,
            f("k_factor", "g"),
            f("train_s"),
            f("add_s"),
            f("tune_s"),
            f("recall_at_2", ".3f"),
            f("stage_recall_at_2", ".3f"),
            format(rate, ".0f") if rate else "–",
            f("neighbors_per_2cpu_s", ".0f"),
            ratio,
            f("index_bytes_per_vector", ".0f"),
            f("peak_rss_gib", ".2f"),
            f"{min(load)}-{max(load)}" if len(load) > 1 else str(load[0]),
        ]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- scale
def child_scale(args) -> dict:
    """The index-side stages of a build of ``n`` chunks on synthetic float16 embeddings, timed one by
    one with the default settings: train, add, tune, the neighbor stage (on ``rows`` rows, its rate
    extrapolated to all), and finalize's checksums; peak memory and the files' bytes per chunk."""
    from retlm.retrieval._storage import sha256_file
    from retlm.retrieval.index import add_rows, choose_factory, train_index, tune_search, write_index
    from retlm.retrieval.neighbors import compute_neighbors

    x = np.load(args.data, mmap_mode="r")
    n = len(x)
    factory = choose_factory(n)
    loads, times = [load_average()], {}
    start = time.perf_counter()
    index = train_index(x, factory)
    times["train"] = time.perf_counter() - start
    start = time.perf_counter()
    add_rows(index, x, progress=False)
    times["add"] = time.perf_counter() - start
    loads.append(load_average())
    start = time.perf_counter()
    tuning = tune_search(index, x, K, target=0.95, fetch=K + EXTRA)
    times["tune"] = time.perf_counter() - start
    loads.append(load_average())
    rows = min(n, args.rows)
    doc_ids = np.arange(n, dtype=np.int32)
    work = Path(args.data).parent
    wall, cpu = time.perf_counter(), time.process_time()
    compute_neighbors(index, x, doc_ids, K, work / "knn.dat", rows=(0, rows), extra=EXTRA, progress=False)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    loads.append(load_average())
    index_path = work / "index.faiss"
    write_index(index, index_path)
    index_bytes = index_path.stat().st_size
    del index
    start = time.perf_counter()
    sha256_file(Path(args.data))
    sha256_file(index_path)
    hashed = Path(args.data).stat().st_size + index_bytes
    checksum_s_per_byte = (time.perf_counter() - start) / hashed
    return {
        "n": n,
        "factory": factory,
        "nprobe": tuning.nprobe,
        "k_factor": tuning.k_factor,
        "recall_tuning": tuning.recall,
        "train_s": times["train"],
        "add_s": times["add"],
        "tune_s": times["tune"],
        "neighbor_rows": rows,
        "neighbors_per_s": rows / wall,
        "neighbors_per_2cpu_s": 2 * rows / cpu,
        "neighbors_stage_s": n * wall / rows,
        "index_bytes_per_chunk": index_bytes / n,
        "checksum_s_per_gb": checksum_s_per_byte * 1e9,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "load_average": [round(v, 1) for v in loads],
    }


def bench_scale(args) -> list[dict]:
    rows = []
    for n in args.n:
        work = Path(tempfile.mkdtemp(prefix=f"bench-scale-{n}-", dir=args.workdir))
        start = time.perf_counter()
        data = synthetic(work / "emb.npy", n, seed=0, dtype="float16")
        generate_s = time.perf_counter() - start
        cmd = [sys.executable, __file__, "_scale", "--data", str(data), "--rows", str(args.rows)]
        row = {"generate_s": generate_s, **run_child(cmd, args.timeout)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    chunking = chunk_rate()
    print(json.dumps({"chunk_stage": chunking}), flush=True)
    print(scale_summary(rows, chunking, args.embed_rate), flush=True)
    return rows


def scale_summary(rows: list[dict], chunking: dict, embed_rate: float) -> str:
    """Per-stage seconds (chunk and embed from their per-chunk rates), bytes per chunk, memory."""
    c = 64
    per_chunk_files = (c + 1) * 4 + 4 + 4 * chunking["seqs"] / chunking["chunks"] + DIM * 2 + K * 4
    lines = [
        "| n | index | nprobe / k_factor | chunk s* | embed s* | train s | add s | tune s | neighbors s "
        "(rate/s wall, per 2 CPU-s) | checksums s | disk bytes/chunk (index) | peak RSS GiB | load avg |",
        "|" + "---|" * 13,
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r.get('n', '?')} | {r['error']} |" + " |" * 11)
            continue
        n = r["n"]
        disk = per_chunk_files + r["index_bytes_per_chunk"]
        checksum_s = r["checksum_s_per_gb"] * n * disk / 1e9
        cells = [
            f"{n:,}",
            r["factory"],
            f"{r['nprobe']} / {r['k_factor']:g}",
            f"{n / chunking['chunks_per_s']:.0f}",
            f"{n / embed_rate:,.0f}",
            f"{r['train_s']:.1f}",
            f"{r['add_s']:.1f}",
            f"{r['tune_s']:.1f}",
            f"{r['neighbors_stage_s']:.0f} ({r['neighbors_per_s']:.0f}, {r['neighbors_per_2cpu_s']:.0f})",
            f"{checksum_s:.1f}",
            f"{disk:.0f} ({r['index_bytes_per_chunk']:.0f})",
            f"{r['peak_rss_gib']:.2f}",
            f"{min(r['load_average'])}-{max(r['load_average'])}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(
        f"\n*chunk: {chunking['chunks_per_s']:.0f} chunks/s measured on the bundled corpus; embed: "
        f"{embed_rate:.0f} chunks/s (--embed-rate, from `bench/retrieval.py embed`), both linear in n."
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="what", required=True)
    e = sub.add_parser("embed")
    e.add_argument("--chunks", type=int, default=1024)
    e.add_argument("--batch-size", type=int, default=128)
    e.add_argument("--rounds", type=int, default=2)
    e.add_argument("--backends", nargs="+", default=["torch", "onnx", "onnx-int8", "openvino"])
    sub.add_parser("chunk")  # the chunk stage's rate with the default GPT-2 tokenizer
    i = sub.add_parser("index")
    i.add_argument("--n", type=int, nargs="+", default=[200_000, 1_000_000])
    i.add_argument("--queries", type=int, default=1000, help="fresh query vectors (not in the database)")
    i.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="of the vectors")
    i.add_argument("--rows", type=int, default=50_000, help="rows of the timed neighbor stage")
    i.add_argument("--repeats", type=int, default=3, help="neighbor-stage runs (the fastest is kept)")
    i.add_argument("--autofaiss-python", default=None, help="python of a virtualenv with autofaiss")
    i.add_argument("--autofaiss-max-n", type=int, default=200_000)
    i.add_argument(
        "--methods",
        nargs="+",
        default=["before", "new", "rflat", "hnsw", "autofaiss"],
        choices=["before", "new", "rflat", "hnsw", "sq8-refine", "megatron", "autofaiss"],
    )
    i.add_argument("--timeout", type=float, default=3600)
    i.add_argument("--workdir", default=None)
    i.add_argument("--keep", action="store_true")
    c = sub.add_parser("scale")
    c.add_argument("--n", type=int, nargs="+", default=[100_000, 1_000_000, 3_000_000])
    c.add_argument("--rows", type=int, default=50_000, help="rows of the timed neighbor stage")
    c.add_argument("--embed-rate", type=float, default=99.5, help="embedding chunks/s (from `embed`)")
    c.add_argument("--timeout", type=float, default=3600)
    c.add_argument("--workdir", default=None)
    c.add_argument("--keep", action="store_true")
    sc = sub.add_parser("_scale")  # child process
    sc.add_argument("--data")
    sc.add_argument("--rows", type=int, default=50_000)
    o = sub.add_parser("_ours")  # child process
    for name in ("--data", "--queries", "--out", "--factory"):
        o.add_argument(name)
    o.add_argument("--nprobe", type=int, default=None)
    o.add_argument("--k-factor", type=float, default=None)
    o.add_argument("--rows", type=int, default=50_000)
    o.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.what == "embed":
        result = bench_embed(args.chunks, args.batch_size, args.rounds, args.backends)
        print(json.dumps(result, indent=2))
        print(
            f"reference (torch float32, batching before #23): {result['reference_chunks_per_s']:.1f} chunks/s"
        )
        for name, r in result["backends"].items():
            print(
                f"{name:>10}: {r['chunks_per_s']:6.1f} chunks/s, ratio {r['ratio']:.2f}x; agreement: "
                f"top-2 Jaccard {r['jaccard_at_2']:.3f}, recall@2 {r['recall_at_2']:.3f}, "
                f"cosine min {r['cosine_min']:.4f} mean {r['cosine_mean']:.5f}"
            )
    elif args.what == "chunk":
        print(json.dumps(chunk_rate()))
    elif args.what == "index":
        for n in args.n:
            bench_index(n, args)
    elif args.what == "scale":
        bench_scale(args)
    elif args.what == "_scale":
        print(json.dumps(child_scale(args)))
    else:
        print(json.dumps(child_ours(args)))


if __name__ == "__main__":
    main()
