"""The faiss index over unit-norm chunk embeddings (inner product = cosine similarity).

- Below ``EXACT_THRESHOLD`` vectors: ``Flat`` (exact). Precomputing every chunk's neighbours costs
  ``n^2 * dim`` multiply-adds: at 100k x 384 that is 3.8e12, about a minute on two CPU cores, and it grows
  quadratically, so this is where approximate search starts paying for itself.
- Above it: ``IVF{nlist},SQ8`` with ``nlist ~ 4 sqrt(n)``, k-means trained on a random sample of about 64
  vectors per list. SQ8 stores one byte per dimension (a quarter of float32; 1M x 384 is 384 MB) and on
  unit vectors costs almost no recall, so recall is governed by ``nprobe`` alone, which
  ``tune_nprobe`` raises until held-out queries reach the target recall@k against exact search.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from tqdm.auto import tqdm

from retlm.retrieval._storage import CorruptDatabaseError

EXACT_THRESHOLD = 100_000
TRAIN_POINTS_PER_LIST = 64
ADD_BLOCK = 65_536


def nlist_for(num_vectors: int) -> int:
    """Number of IVF lists: the power of two nearest ``4 sqrt(n)`` (at least 16)."""
    return max(16, 2 ** round(math.log2(4 * math.sqrt(max(num_vectors, 1)))))


def choose_factory(num_vectors: int, exact_threshold: int = EXACT_THRESHOLD) -> str:
    """The faiss ``index_factory`` string for a database of ``num_vectors`` embeddings."""
    if num_vectors < exact_threshold:
        return "Flat"
    return f"IVF{nlist_for(num_vectors)},SQ8"


def use_gpu() -> bool:
    return hasattr(faiss, "index_cpu_to_all_gpus") and faiss.get_num_gpus() > 0


def to_gpu(index: faiss.Index) -> faiss.Index:
    """The index on all GPUs when faiss has them (faiss-gpu builds), else unchanged."""
    return faiss.index_cpu_to_all_gpus(index) if use_gpu() else index


def to_cpu(index: faiss.Index) -> faiss.Index:
    return faiss.index_gpu_to_cpu(index) if use_gpu() else index


def as_float32(block: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(block, dtype=np.float32)


def build_index(
    embeddings: np.ndarray, factory: str | None = None, *, seed: int = 0, progress: bool = True
) -> faiss.Index:
    """Train (on a sample) and fill an inner-product index with ``embeddings (n, dim)``, read in blocks."""
    n, dim = embeddings.shape
    factory = factory or choose_factory(n)
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        sample = training_sample(n, index, seed)
        train = to_gpu(index)
        train.train(as_float32(embeddings[sample]))
        index = to_cpu(train)
    gpu_index = to_gpu(index)
    for start in tqdm(range(0, n, ADD_BLOCK), desc="index add", unit="block", disable=not progress):
        gpu_index.add(as_float32(embeddings[start : start + ADD_BLOCK]))
    return to_cpu(gpu_index)


def training_sample(n: int, index: faiss.Index, seed: int) -> np.ndarray:
    """Sorted row ids of a random training sample (sorted so a memmap reads forward)."""
    ivf = faiss.try_extract_index_ivf(index)
    size = n if ivf is None else min(n, TRAIN_POINTS_PER_LIST * ivf.nlist)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


def set_nprobe(index: faiss.Index, nprobe: int | None) -> None:
    if nprobe is not None and faiss.try_extract_index_ivf(index) is not None:
        faiss.ParameterSpace().set_index_parameter(index, "nprobe", int(nprobe))


def exact_search(queries: np.ndarray, embeddings: np.ndarray, k: int, block: int = 131_072):
    """Exact top-``k`` inner-product search over ``embeddings`` read in blocks: ``(scores, ids)``."""
    nq = len(queries)
    best_scores = np.full((nq, k), -np.inf, dtype=np.float32)
    best_ids = np.full((nq, k), -1, dtype=np.int64)
    for start in range(0, len(embeddings), block):
        flat = faiss.IndexFlatIP(embeddings.shape[1])
        flat.add(as_float32(embeddings[start : start + block]))
        scores, ids = flat.search(as_float32(queries), min(k, flat.ntotal))
        ids = np.where(ids >= 0, ids + start, -1)
        all_scores = np.concatenate([best_scores, scores], axis=1)
        all_ids = np.concatenate([best_ids, ids], axis=1)
        order = np.argsort(-all_scores, axis=1, kind="stable")[:, :k]
        best_scores = np.take_along_axis(all_scores, order, axis=1)
        best_ids = np.take_along_axis(all_ids, order, axis=1)
    return best_scores, best_ids


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean fraction of each query's exact top-k found in its approximate top-k (both ``(nq, k)``)."""
    hits = [
        len(set(a[a >= 0]) & set(e[e >= 0])) / max(1, (e >= 0).sum())
        for a, e in zip(approx_ids, exact_ids, strict=True)
    ]
    return float(np.mean(hits)) if hits else 1.0


def _without_self(ids: np.ndarray, query_ids: np.ndarray, k: int) -> np.ndarray:
    """Drop each query's own id from its result row and keep the first ``k``."""
    kept = [row[row != q][:k] for row, q in zip(ids, query_ids, strict=True)]
    return np.stack([np.pad(r, (0, k - len(r)), constant_values=-1) for r in kept])


@dataclass
class Tuning:
    nprobe: int | None
    recall: float
    num_queries: int


def tune_nprobe(
    index: faiss.Index,
    embeddings: np.ndarray,
    k: int,
    target: float = 0.95,
    num_queries: int = 1000,
    seed: int = 1,
) -> Tuning:
    """Smallest power-of-two ``nprobe`` whose recall@k on held-out database rows reaches ``target``.

    The queries are chunks of the database itself (the precomputed neighbour search is exactly such a
    query); each query's own row is removed from both result lists before comparing. A ``Flat`` index
    is exact: recall 1.0, nothing to tune.
    """
    n = len(embeddings)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None or n == 0:
        return Tuning(nprobe=None, recall=1.0, num_queries=0)
    query_ids = np.sort(np.random.default_rng(seed).choice(n, size=min(num_queries, n), replace=False))
    queries = as_float32(embeddings[query_ids])
    _, exact = exact_search(queries, embeddings, k + 1)
    exact = _without_self(exact, query_ids, k)
    searcher = to_gpu(index)
    nprobe, recall = 1, 0.0
    while True:
        set_nprobe(searcher, nprobe)
        _, approx = searcher.search(queries, k + 1)
        recall = recall_at_k(_without_self(approx, query_ids, k), exact)
        if recall >= target or nprobe >= ivf.nlist:
            break
        nprobe = min(2 * nprobe, ivf.nlist)
    set_nprobe(index, nprobe)
    return Tuning(nprobe=nprobe, recall=recall, num_queries=len(query_ids))


def write_index(index: faiss.Index, path: Path) -> None:
    """Write atomically: a temporary file beside ``path``, then rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        faiss.write_index(to_cpu(index), str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_index(path: Path, nprobe: int | None = None) -> faiss.Index:
    """Read an index file, with a clear error naming the file if it is missing or corrupted."""
    path = Path(path)
    if not path.is_file():
        raise CorruptDatabaseError(f"missing index file: {path}")
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CorruptDatabaseError(f"{path} is truncated or corrupted (faiss: {first_line})") from None
    set_nprobe(index, nprobe)
    return index
