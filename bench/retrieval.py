"""Retrieval benchmarks: embedding throughput against a bare encoder forward pass, and the index on
200k / 1M synthetic embeddings (recall@2 against exact search, build and query time, peak memory) beside
faiss's plain factory defaults and, when a separate virtualenv with it is given, autofaiss.

    python bench/retrieval.py embed --chunks 1024
    python bench/retrieval.py index --n 200000 1000000 [--autofaiss-python /tmp/autofaiss-venv/bin/python]

Each index run happens in a child process so its peak RSS (``ru_maxrss``) is its own.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DIM, INTRINSIC, K = 384, 16, 2


# ---------------------------------------------------------------------------------------------- embedding
def bench_embed(num_chunks: int, batch_size: int, rounds: int) -> dict:
    import torch

    from retlm.corpus import pydoc_topics
    from retlm.retrieval.chunking import iter_documents, write_chunks
    from retlm.retrieval.embedding import Embedder, embed_rows

    torch.manual_seed(0)
    embedder = Embedder()
    c = 64
    files = [io.BytesIO() for _ in range(3)]
    write_chunks(
        iter_documents([t for _, t in pydoc_topics()]),
        embedder.tokenizer,
        chunk_size=c,
        seq_len=512,
        pad_id=0,
        eos_id=embedder.sep_id,
        chunks_file=files[0],
        doc_ids_file=files[1],
        seqs_file=files[2],
    )
    chunks = np.frombuffer(files[0].getvalue(), dtype="<i4").reshape(-1, c + 1)[:num_chunks]
    batches = [
        embedder.encoder_inputs(chunks[i : i + batch_size, :c]) for i in range(0, len(chunks), batch_size)
    ]

    def ours() -> float:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            embed_rows(embedder, chunks, Path(tmp) / "e.dat", batch_size=batch_size, progress=False)
            return time.perf_counter() - start

    def bare() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            for input_ids, attention_mask in batches:
                embedder.model(input_ids=input_ids, attention_mask=attention_mask)
        return time.perf_counter() - start

    bare()  # warm-up
    times = {"ours": [], "bare": []}
    for _ in range(rounds):  # interleaved, so load from other processes hits both alike
        times["bare"].append(bare())
        times["ours"].append(ours())
    best = {name: min(t) for name, t in times.items()}
    return {
        "chunks": len(chunks),
        "batch_size": batch_size,
        "threads": torch.get_num_threads(),
        "ours_chunks_per_s": len(chunks) / best["ours"],
        "bare_chunks_per_s": len(chunks) / best["bare"],
        "ratio_ours_over_bare": best["bare"] / best["ours"],
    }


# ---------------------------------------------------------------------------------------------- index
def synthetic(path: Path, n: int, seed: int, block: int = 100_000) -> Path:
    """Unit vectors of low intrinsic dimension: a random 16-d Gaussian mixed into 384-d, plus noise.
    Written block by block into a float32 ``.npy`` (autofaiss reads ``.npy`` folders)."""
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(1234).standard_normal((INTRINSIC, DIM)).astype(np.float32)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, DIM))
    for start in range(0, n, block):
        z = rng.standard_normal((min(block, n - start), INTRINSIC)).astype(np.float32)
        x = z @ mixing + 0.1 * rng.standard_normal((len(z), DIM)).astype(np.float32)
        out[start : start + len(z)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    out.flush()
    return path


def child_ours(args) -> dict:
    from retlm.retrieval.index import build_index, choose_factory, set_nprobe, tune_nprobe
    from retlm.retrieval.neighbors import compute_neighbors

    x = np.load(args.data, mmap_mode="r")
    queries = np.load(args.queries)
    factory = args.factory or choose_factory(len(x))
    start = time.perf_counter()
    index = build_index(x, factory, progress=False)
    build_s = time.perf_counter() - start
    if args.nprobe:
        set_nprobe(index, args.nprobe)
        tuning = {"nprobe": args.nprobe, "recall_tuning": None}
    else:
        t = tune_nprobe(index, x, K, target=0.95)
        tuning = {"nprobe": t.nprobe, "recall_tuning": t.recall}
    tune_s = time.perf_counter() - start - build_s
    start = time.perf_counter()
    _, ids = index.search(np.ascontiguousarray(queries), K)
    query_s = time.perf_counter() - start
    np.save(args.out, ids)
    # the neighbour stage on a slice of rows, to give its rate
    rows = min(len(x), 20_000)
    doc_ids = np.arange(len(x), dtype=np.int32)  # one document per chunk: only self is excluded
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        compute_neighbors(index, x, doc_ids, K, Path(tmp) / "knn.dat", rows=(0, rows), progress=False)
        knn_rate = rows / (time.perf_counter() - start)
    return {
        "factory": factory,
        "build_s": build_s,
        "tune_s": tune_s,
        **tuning,
        "query_s": query_s,
        "neighbours_per_s": knn_rate,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


AUTOFAISS_SCRIPT = """
import json, resource, sys, time, numpy as np, faiss
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
info = json.load(open(index_path + ".json"))
print(json.dumps({"factory": info.get("index_key"), "build_s": build_s, "query_s": query_s,
                  "nprobe_params": info.get("index_param"),
                  "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def run_child(cmd: list[str], timeout: float) -> dict:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def recall(ids: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(e)) / len(e) for a, e in zip(ids, exact, strict=True)]))


def bench_index(n: int, args) -> list[dict]:
    from retlm.retrieval.index import exact_search, nlist_for

    work = Path(tempfile.mkdtemp(prefix=f"bench-index-{n}-", dir=args.workdir))
    data_dir = work / "data"
    data_dir.mkdir()
    data = synthetic(data_dir / "emb.npy", n, seed=0)
    queries = np.asarray(np.load(synthetic(work / "queries.npy", args.queries, seed=1)))
    start = time.perf_counter()
    _, exact = exact_search(queries, np.load(data, mmap_mode="r"), K)
    exact_s = time.perf_counter() - start
    rows = []
    me = [sys.executable, __file__, "_ours", "--data", str(data), "--queries", str(work / "queries.npy")]
    candidates = [("retlm (auto: nprobe tuned to recall 0.95)", [])] if "ours" in args.methods else []
    if "faiss" in args.methods:
        candidates.append(
            (
                f"faiss index_factory IVF{nlist_for(n)},Flat, default nprobe=1",
                ["--factory", f"IVF{nlist_for(n)},Flat", "--nprobe", "1"],
            )
        )
    for name, extra in candidates:
        out = work / f"ids-{len(rows)}.npy"
        row = run_child([*me, "--out", str(out), *extra], args.timeout)
        if "error" not in row:
            row["recall_at_2"] = recall(np.load(out), exact)
        rows.append({"n": n, "method": name, **row})
        print(json.dumps(rows[-1]), flush=True)
    if args.autofaiss_python and n <= args.autofaiss_max_n and "autofaiss" in args.methods:
        out = work / "ids-autofaiss.npy"
        script = work / "autofaiss_run.py"
        script.write_text(AUTOFAISS_SCRIPT)
        row = run_child(
            [
                args.autofaiss_python,
                str(script),
                str(data_dir),
                str(work / "autofaiss.index"),
                str(work / "queries.npy"),
                str(out),
                str(K),
            ],
            args.timeout,
        )
        if "error" not in row:
            row["recall_at_2"] = recall(np.load(out), exact)
        rows.append({"n": n, "method": "autofaiss 2.18 defaults (own venv, faiss 1.8)", **row})
        print(json.dumps(rows[-1]), flush=True)
    rows.append(
        {
            "n": n,
            "method": "exact (blocked IndexFlatIP) for the ground truth",
            "query_s": exact_s,
            "recall_at_2": 1.0,
        }
    )
    if not args.keep:
        for f in work.rglob("*"):
            if f.is_file():
                f.unlink()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="what", required=True)
    e = sub.add_parser("embed")
    e.add_argument("--chunks", type=int, default=1024)
    e.add_argument("--batch-size", type=int, default=128)
    e.add_argument("--rounds", type=int, default=2)
    i = sub.add_parser("index")
    i.add_argument("--n", type=int, nargs="+", default=[200_000, 1_000_000])
    i.add_argument("--queries", type=int, default=1000, help="fresh query vectors (not in the database)")
    i.add_argument("--autofaiss-python", default=None, help="python of a virtualenv with autofaiss")
    i.add_argument("--autofaiss-max-n", type=int, default=200_000)
    i.add_argument(
        "--methods", nargs="+", default=["ours", "faiss", "autofaiss"], choices=["ours", "faiss", "autofaiss"]
    )
    i.add_argument("--timeout", type=float, default=3600)
    i.add_argument("--workdir", default=None)
    i.add_argument("--keep", action="store_true")
    o = sub.add_parser("_ours")  # child process
    for name in ("--data", "--queries", "--out", "--factory"):
        o.add_argument(name)
    o.add_argument("--nprobe", type=int, default=None)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.what == "embed":
        result = bench_embed(args.chunks, args.batch_size, args.rounds)
        print(json.dumps(result, indent=2))
        print(
            f"embedding throughput: ours {result['ours_chunks_per_s']:.1f} chunks/s, bare forward "
            f"{result['bare_chunks_per_s']:.1f} chunks/s, "
            f"ratio {result['ratio_ours_over_bare']:.3f} (target >= 0.9)"
        )
    elif args.what == "index":
        for n in args.n:
            bench_index(n, args)
    else:
        print(json.dumps(child_ours(args)))


if __name__ == "__main__":
    main()
