"""The embed and chunk stages of ``bench/retrieval.py`` (``embed``, and ``scale``'s chunk rate)."""

from __future__ import annotations

import io
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np

K = 2


def load_average() -> float:
    return os.getloadavg()[0]


def corpus_chunks(num_chunks: int):
    """The first ``num_chunks`` GPT-2 chunks (64 tokens) of the bundled corpus, their document ids, and the
    tokenizer: what ``build-db``'s embed stage reads by default."""
    from retlm.demo.corpus import pydoc_topics
    from retlm.retrieval.chunking import write_chunks
    from retlm.retrieval.sources import iter_documents
    from retlm.tokenization import load_tokenizer

    lm = load_tokenizer("gpt2")
    files = [io.BytesIO() for _ in range(3)]
    docs = iter_documents([t for _, t in pydoc_topics()])
    kwargs = dict(chunk_size=64, seq_len=512, pad_id=lm.pad_token_id, eos_id=lm.eos_token_id)
    write_chunks(docs, lm, **kwargs, chunks_file=files[0], doc_ids_file=files[1], seqs_file=files[2])
    chunks = np.frombuffer(files[0].getvalue(), dtype="<i4").reshape(-1, 65)[:num_chunks]
    doc_ids = np.frombuffer(files[1].getvalue(), dtype="<i4")[:num_chunks]
    return chunks, doc_ids, lm


def top2(vectors: np.ndarray, doc_ids: np.ndarray) -> np.ndarray:
    """Exact top-2 neighbors of every row among the others, its own document excluded."""
    import faiss

    from retlm.retrieval.neighbors import search_excluding

    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return search_excluding(index, vectors, K, doc_ids, doc_ids)[0]


def bench_embed(num_chunks: int, batch_size: int, rounds: int, backends: list[str]) -> dict:
    """The embed stage on the default path (GPT-2 chunks decoded and re-tokenized by WordPiece), timed
    in interleaved rounds: the reference (float32 torch, batched as before #23: each 128-row batch split
    by padded width) against ``embed_rows`` with each backend (16 batches sorted by width at a time).
    Agreement with the reference over the chunks embedded: cosine of each vector, and the mean Jaccard
    overlap and recall of the top-2 neighbor sets (exact search, own document excluded)."""
    import torch

    from retlm.retrieval.embedding import Embedder, chunk_texts, embed_rows

    chunks, doc_ids, lm = corpus_chunks(num_chunks)
    pad = lm.pad_token_id
    reference = Embedder(backend="torch")
    embedders = {name: Embedder(backend=name) for name in backends}
    vectors: dict[str, np.ndarray] = {}

    def run_reference() -> float:
        start = time.perf_counter()
        out = [
            reference.embed_texts(chunk_texts(lm, chunks[i : i + batch_size, :64], pad))
            for i in range(0, len(chunks), batch_size)
        ]
        seconds = time.perf_counter() - start
        vectors["reference"] = np.concatenate(out)
        return seconds

    def run(name: str) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            file = Path(tmp) / "e.dat"
            start = time.perf_counter()
            embed_rows(
                embedders[name],
                chunks,
                file,
                dtype="float32",
                batch_size=batch_size,
                pad_id=pad,
                lm_tokenizer=lm,
                progress=False,
            )
            seconds = time.perf_counter() - start
            vectors[name] = np.fromfile(file, dtype="<f4").reshape(len(chunks), -1)
        return seconds

    for name in backends:  # warm-up: sessions, caches
        embedders[name].embed_texts(chunk_texts(lm, chunks[:16, :64], pad))
    times: dict[str, list[float]] = {"reference": [], **{name: [] for name in backends}}
    for _ in range(rounds):  # interleaved, so load from other processes hits every one alike
        times["reference"].append(run_reference())
        for name in backends:
            times[name].append(run(name))
    best = {name: min(t) for name, t in times.items()}
    neighbors = top2(vectors["reference"], doc_ids)
    rows = {}
    for name in backends:
        ours = top2(vectors[name], doc_ids)
        jaccard = [len(set(a) & set(b)) / len(set(a) | set(b)) for a, b in zip(ours, neighbors, strict=True)]
        recall = [len(set(a) & set(b)) / K for a, b in zip(ours, neighbors, strict=True)]
        cosine = (vectors[name] * vectors["reference"]).sum(1)
        rows[name] = {
            "chunks_per_s": len(chunks) / best[name],
            "ratio": best["reference"] / best[name],
            "cosine_min": float(cosine.min()),
            "cosine_mean": float(cosine.mean()),
            "jaccard_at_2": float(np.mean(jaccard)),
            "recall_at_2": float(np.mean(recall)),
        }
    return {
        "chunks": len(chunks),
        "batch_size": batch_size,
        "threads": torch.get_num_threads(),
        "load_average": load_average(),
        "reference_chunks_per_s": len(chunks) / best["reference"],
        "backends": rows,
    }


def chunk_rate(rounds: int = 3) -> dict:
    """Chunk-stage throughput on the bundled corpus with the default LM tokenizer (GPT-2's byte-level BPE,
    chunk 64), the best of ``rounds``: chunks and megabytes of text per second."""
    from retlm.demo.corpus import pydoc_topics
    from retlm.retrieval.chunking import write_chunks
    from retlm.retrieval.sources import iter_documents
    from retlm.tokenization import load_tokenizer

    tokenizer = load_tokenizer("gpt2")
    texts = [t for _, t in pydoc_topics()]
    best = math.inf
    for _ in range(rounds):
        files = [io.BytesIO() for _ in range(3)]
        start = time.perf_counter()
        counts = write_chunks(
            iter_documents(texts),
            tokenizer,
            chunk_size=64,
            seq_len=512,
            pad_id=tokenizer.pad_token_id,
            eos_id=tokenizer.eos_token_id,
            chunks_file=files[0],
            doc_ids_file=files[1],
            seqs_file=files[2],
        )
        best = min(best, time.perf_counter() - start)
    return {
        "chunks": counts.num_chunks,
        "chunks_per_s": counts.num_chunks / best,
        "text_mb_per_s": sum(len(t.encode()) for t in texts) / best / 1e6,
        "seqs": counts.num_seqs,
    }
