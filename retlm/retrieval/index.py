"""The faiss index over unit-norm chunk embeddings (inner product = cosine similarity).

- Below ``EXACT_THRESHOLD`` vectors: ``Flat`` (exact). Precomputing every chunk's neighbors costs
  ``n^2 * dim`` multiply-adds: at 100k x 384 that is 3.8e12, about a minute on two CPU cores, and it grows
  quadratically, so this is where approximate search starts paying for itself.
- Above it: ``IVF{nlist},PQ{dim/4}x4fs,Refine(SQfp16)``. ``nlist`` is the power of two nearest
  ``sqrt(n)`` (1024 at 1M), k-means trained on a random sample of 64 vectors per list. Each vector is
  stored twice: as a 4-bit product-quantizer code (``dim / 8`` bytes, 48 for 384-d) that the fast-scan
  kernels compare 32 at a time in SIMD registers, and as float16 (the precision of ``embeddings.dat``).
  A search scans the ``nprobe`` nearest lists with the codes, keeps ``k_factor * k`` candidates and
  re-ranks them with the float16 vectors, so the returned scores are exact cosines. From
  ``HNSW_COARSE_FROM`` lists on, the coarse quantizer is an HNSW graph over the centroids (assigning a
  vector then costs ``log(nlist)`` instead of ``nlist`` dot products).
- ``tune_search`` picks ``nprobe`` and ``k_factor``: the cheapest pair (by a fixed cost model, so the
  choice is reproducible) whose recall@k on held-out database rows reaches the target against exact
  search. On the structured synthetic vectors of ``bench/retrieval.py`` at 1M this index answers the
  neighbor stage's queries several times faster than the earlier ``IVF{4 sqrt n},SQ8`` at the same
  recall (docs/benchmarks.md).
- ``mergeable_empty`` / ``merge_indexes`` let shards add their vectors to copies of one trained index in
  parallel and merge the results into the index a single ``add`` would have built (the Ray engine).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from tqdm.auto import tqdm

from retlm.retrieval._storage import CorruptDatabaseError
from retlm.retrieval.config import EXACT_THRESHOLD

TRAIN_POINTS_PER_LIST = 64
ADD_BLOCK = 65_536
HNSW_COARSE_FROM = 8192
# Search settings the tuner tries. k_factor multiplies the number of results asked for.
NPROBES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
K_FACTORS = (1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
SATURATED = 0.002  # doubling k_factor raised recall less than this: more candidates do not help
# The tuner's cost model, per query: nprobe * (ntotal / nlist) codes scanned, plus REFINE_COST for each
# re-ranked candidate. Measured at 1M (IVF1024,PQ96x4fs,Refine(SQfp16), 2 cores): one more probed list
# (976 codes) costs about 1.8 us, one more re-ranked candidate about 0.45 us, i.e. about 250 codes.
REFINE_COST = 256


def nlist_for(num_vectors: int) -> int:
    """Number of IVF lists: the power of two nearest ``sqrt(n)`` (at least 16)."""
    return max(16, 2 ** round(math.log2(math.sqrt(max(num_vectors, 1)))))


def pq_subquantizers(dim: int) -> int:
    """Sub-quantizers of the 4-bit PQ: one per 4 dimensions (fewer dimensions each if 4 does not divide)."""
    return next(dim // group for group in (4, 2, 1) if dim % group == 0)


def choose_factory(num_vectors: int, exact_threshold: int = EXACT_THRESHOLD, dim: int = 384) -> str:
    """The faiss ``index_factory`` string for a database of ``num_vectors`` embeddings of ``dim``."""
    if num_vectors < exact_threshold:
        return "Flat"
    nlist = nlist_for(num_vectors)
    coarse = f"IVF{nlist}_HNSW32" if nlist >= HNSW_COARSE_FROM else f"IVF{nlist}"
    return f"{coarse},PQ{pq_subquantizers(dim)}x4fs,Refine(SQfp16)"


def use_gpu() -> bool:
    return hasattr(faiss, "index_cpu_to_all_gpus") and faiss.get_num_gpus() > 0


def to_gpu(index: faiss.Index) -> faiss.Index:
    """The index on all GPUs when faiss has them (faiss-gpu builds) and supports its type, else unchanged."""
    if not use_gpu():
        return index
    try:
        return faiss.index_cpu_to_all_gpus(index)
    except RuntimeError:  # e.g. fast-scan PQ has no GPU implementation
        return index


def to_cpu(index: faiss.Index) -> faiss.Index:
    return faiss.index_gpu_to_cpu(index) if use_gpu() and "Gpu" in type(index).__name__ else index


def as_float32(block: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(block, dtype=np.float32)


def train_index(embeddings: np.ndarray, factory: str | None = None, *, seed: int = 0) -> faiss.Index:
    """An empty inner-product index of ``factory``, trained on a random sample of ``embeddings (n, dim)``."""
    n, dim = embeddings.shape
    factory = factory or choose_factory(n, dim=dim)
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    if index.is_trained:
        return index
    sample = as_float32(embeddings[training_sample(n, index, seed)])
    if use_gpu():
        train = to_gpu(index)
        train.train(sample)
        return to_cpu(train)
    ivf = _untransformed_ivf(index)
    if ivf is not None:
        # The coarse k-means is the big job and uses every thread. What remains (a product quantizer's
        # dim/4 small k-means) is so little work per OpenMP region that on a busy 2-core box the
        # threads' barriers made it 10-20x slower than one thread (measured: 25-49 s against 2-3 s).
        ivf.train_q1(len(sample), faiss.swig_ptr(sample), False, ivf.metric_type)
    with _one_thread():
        index.train(sample)  # skips the coarse quantizer when it is already trained
    return index


def _untransformed_ivf(index: faiss.Index) -> faiss.IndexIVF | None:
    """The IVF part of ``index`` if it sees the vectors as they are (the index itself, or under Refine)."""
    index = _down(index)
    if isinstance(index, faiss.IndexRefine):
        index = _down(index.base_index)
    return index if isinstance(index, faiss.IndexIVF) else None


@contextmanager
def _one_thread():
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(threads)


def add_rows(
    index: faiss.Index,
    embeddings: np.ndarray,
    rows: tuple[int, int] | None = None,
    *,
    progress: bool = True,
    desc: str = "index add",
) -> faiss.Index:
    """Add ``embeddings[lo:hi]`` to ``index`` in blocks of ``ADD_BLOCK`` (ids continue from ``ntotal``)."""
    lo, hi = rows if rows is not None else (0, len(embeddings))
    device_index = to_gpu(index)
    bar = tqdm(total=hi - lo, desc=desc, unit="vector", disable=not progress)
    for start in range(lo, hi, ADD_BLOCK):
        stop = min(start + ADD_BLOCK, hi)
        device_index.add(as_float32(embeddings[start:stop]))
        bar.update(stop - start)
    bar.close()
    return to_cpu(device_index)


def build_index(
    embeddings: np.ndarray, factory: str | None = None, *, seed: int = 0, progress: bool = True
) -> faiss.Index:
    """Train (on a sample) and fill an inner-product index with ``embeddings (n, dim)``, read in blocks."""
    return add_rows(train_index(embeddings, factory, seed=seed), embeddings, progress=progress)


def training_sample(n: int, index: faiss.Index, seed: int) -> np.ndarray:
    """Sorted row ids of a random training sample (sorted so a memmap reads forward)."""
    ivf = faiss.try_extract_index_ivf(index)
    size = n if ivf is None else min(n, TRAIN_POINTS_PER_LIST * ivf.nlist)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


def refine_of(index: faiss.Index) -> faiss.IndexRefine | None:
    """The index itself if it re-ranks candidates (``Refine(...)`` / ``RFlat``), else ``None``."""
    index = _down(index)
    return index if isinstance(index, faiss.IndexRefine) else None


def set_search_params(index: faiss.Index, nprobe: int | None = None, k_factor: float | None = None) -> None:
    """Set ``nprobe`` (IVF indexes) and ``k_factor`` (re-ranking indexes); ``None`` leaves a value as is."""
    space = faiss.ParameterSpace()
    if nprobe is not None and faiss.try_extract_index_ivf(index) is not None:
        space.set_index_parameter(index, "nprobe", int(nprobe))
    if k_factor is not None and refine_of(index) is not None:
        space.set_index_parameter(index, "k_factor_rf", float(k_factor))


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
    """Search settings chosen by ``tune_search`` and the recall@k they reached."""

    nprobe: int | None
    recall: float
    num_queries: int
    k_factor: float | None = None


def tune_search(
    index: faiss.Index,
    embeddings: np.ndarray,
    k: int,
    target: float = 0.95,
    *,
    fetch: int | None = None,
    num_queries: int = 1000,
    seed: int = 1,
    margin: float = 2.0,
) -> Tuning:
    """The cheapest ``nprobe`` / ``k_factor`` whose recall@k on held-out database rows reaches ``target``.

    The queries are chunks of the database itself (the precomputed neighbor search is exactly such a
    query), each asking for ``fetch`` results (default ``k + 1``; the neighbor stage asks for
    ``k + extra_neighbors``, and a re-ranking index keeps ``k_factor * fetch`` candidates); each query's
    own row is removed before its first ``k`` results are compared with the exact top-k. A setting
    reaches the target when its measured recall minus ``margin`` standard errors does (a sample of
    1000 queries measures recall@2 only to about +-0.005, and the setting must hold for every chunk, not
    just for the sample). Settings are tried in increasing ``nprobe``, and for each the smallest
    ``k_factor`` reaching the target; the cheapest by the cost model of ``REFINE_COST`` wins
    (deterministic: no timing is involved). If none reaches the target, the largest settings tried are
    kept. A ``Flat`` index is exact: recall 1.0.
    """
    n = len(embeddings)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None or n == 0:
        return Tuning(nprobe=None, recall=1.0, num_queries=0)
    fetch = max(fetch or k + 1, k + 1)
    query_ids = np.sort(np.random.default_rng(seed).choice(n, size=min(num_queries, n), replace=False))
    queries = as_float32(embeddings[query_ids])
    _, exact = exact_search(queries, embeddings, k + 1)
    exact = _without_self(exact, query_ids, k)
    searcher = to_gpu(index)
    k_factors: list[float | None] = [None]
    if refine_of(index) is not None:  # up to re-ranking every vector
        k_factors = [f for f in K_FACTORS if f * fetch < index.ntotal] + [math.ceil(index.ntotal / fetch)]
    list_size = index.ntotal / ivf.nlist

    def cost(nprobe: int, k_factor: float | None) -> float:
        return nprobe * list_size + REFINE_COST * (k_factor or 0) * fetch

    measured: dict[tuple[int, float | None], float] = {}
    samples = len(query_ids) * k

    def enough(reached: float) -> bool:
        return reached - margin * math.sqrt(reached * (1 - reached) / samples) >= target

    def recall(nprobe: int, k_factor: float | None) -> float:
        if (nprobe, k_factor) not in measured:
            set_search_params(searcher, nprobe, k_factor)
            _, approx = searcher.search(queries, min(fetch, index.ntotal))
            measured[nprobe, k_factor] = recall_at_k(_without_self(approx, query_ids, k), exact)
        return measured[nprobe, k_factor]

    # Recall grows with k_factor (a superset of candidates, re-ranked exactly). For each nprobe, k_factor
    # rises until the target is reached, the setting costs more than the best so far, or recall stops
    # improving (then more lists, not more candidates, are needed).
    best: tuple[float, int, float | None, float] | None = None
    tried = (1, k_factors[0], 0.0)
    for nprobe in [p for p in NPROBES if p < ivf.nlist] + [ivf.nlist]:
        if best is not None and cost(nprobe, k_factors[0]) >= best[0]:
            break
        history: list[float] = []
        for k_factor in k_factors:
            if best is not None and cost(nprobe, k_factor) >= best[0]:
                break
            tried = (nprobe, k_factor, recall(nprobe, k_factor))
            if enough(tried[2]):
                best = (cost(nprobe, k_factor), *tried)
                break
            history.append(tried[2])
            if len(history) > 2 and history[-1] < history[-3] + SATURATED and nprobe < ivf.nlist:
                break  # about twice the candidates gained almost nothing
    nprobe, k_factor, reached = best[1:] if best is not None else tried
    set_search_params(index, nprobe, k_factor)
    return Tuning(nprobe=nprobe, recall=reached, num_queries=len(query_ids), k_factor=k_factor)


# ---------------------------------------------------------------------------------------------- shards
def mergeable_empty(trained: faiss.Index) -> faiss.Index:
    """An empty copy of the trained index that one shard adds its rows to (ids from 0); see ``merge_indexes``.

    Fast-scan IVF-PQ lists are packed 32 codes to a block, and faiss (1.15) cannot merge them: a shard
    holds a plain IVF-PQ with the same coarse quantizer and codebooks instead, which encodes every vector
    to the same code. Supported: flat-code indexes (``Flat``, ``SQ8``, ...), IVF indexes, IVF-PQ
    fast-scan, and ``Refine`` / ``RFlat`` over those.
    """
    return _plain(faiss.clone_index(trained))


def merge_indexes(trained: faiss.Index, parts: Iterable[faiss.Index]) -> faiss.Index:
    """Merge shard indexes (``mergeable_empty`` filled with consecutive row ranges, in row order) into
    the index that adding every row to ``trained`` in one process gives, byte for byte."""
    merged = mergeable_empty(trained)
    for part in parts:
        _merge_into(merged, part)
    return _restore(merged, trained)


def _unsupported(index: faiss.Index) -> ValueError:
    return ValueError(
        f"cannot build a {type(index).__name__} index from shards; supported: Flat and other flat codes, "
        "IVF, IVF-PQ fast-scan (x4fs), and Refine/RFlat over those"
    )


def _down(index: faiss.Index) -> faiss.Index:
    """``faiss.downcast_index`` that keeps the object it was given alive (it may own the C++ index)."""
    down = faiss.downcast_index(index)
    if down is not index:
        faiss.add_to_referenced_objects(down, index)
    return down


def _plain(index: faiss.Index) -> faiss.Index:
    index = _down(index)
    if isinstance(index, faiss.IndexRefine):
        base, refine = _plain(index.base_index), _plain(index.refine_index)
        out = faiss.IndexRefine(base, refine)
        out.k_factor = index.k_factor
        faiss.add_to_referenced_objects(out, index)
        return out
    if isinstance(index, faiss.IndexIVFPQFastScan):
        twin = faiss.IndexIVFPQ(
            index.quantizer, index.d, index.nlist, index.pq.M, index.pq.nbits, index.metric_type
        )
        twin.pq = index.pq
        twin.by_residual = index.by_residual
        twin.is_trained = True
        faiss.add_to_referenced_objects(twin, index)  # owns the quantizer
        return twin
    fast_scan = isinstance(index, faiss.IndexIVFFastScan)
    if fast_scan or not isinstance(index, faiss.IndexIVF | faiss.IndexFlatCodes):
        raise _unsupported(index)
    return index


def _merge_into(merged: faiss.Index, part: faiss.Index) -> None:
    merged, part = _down(merged), _down(part)
    kind = next(t for t in (faiss.IndexRefine, faiss.IndexIVF, faiss.IndexFlatCodes) if isinstance(merged, t))
    if not isinstance(part, kind) or part.d != merged.d:
        raise ValueError(f"cannot merge a {type(part).__name__} shard into a {type(merged).__name__} index")
    if isinstance(merged, faiss.IndexRefine):
        _merge_into(merged.base_index, part.base_index)
        _merge_into(merged.refine_index, part.refine_index)
        merged.ntotal = merged.base_index.ntotal
    elif isinstance(merged, faiss.IndexIVF):
        merged.merge_from(part, merged.ntotal)  # the shard's ids 0.. become ntotal..
    elif part.ntotal and hasattr(merged, "add_sa_codes"):  # flat codes: appended (ids are positions)
        merged.add_sa_codes(faiss.vector_to_array(part.codes).reshape(part.ntotal, part.code_size))
    elif part.ntotal:  # older faiss (1.9) has no add_sa_codes on flat indexes: append the code bytes
        codes = np.concatenate((faiss.vector_to_array(merged.codes), faiss.vector_to_array(part.codes)))
        faiss.copy_array_to_vector(codes, merged.codes)
        merged.ntotal += part.ntotal


def _restore(merged: faiss.Index, trained: faiss.Index) -> faiss.Index:
    merged, trained = _down(merged), _down(trained)
    if isinstance(trained, faiss.IndexRefine):
        base = _restore(merged.base_index, trained.base_index)
        out = faiss.IndexRefine(base, _down(merged.refine_index))
        out.k_factor = trained.k_factor
        faiss.add_to_referenced_objects(out, merged)
        return out
    if isinstance(trained, faiss.IndexIVFPQFastScan):
        fast = faiss.IndexIVFPQFastScan(merged, trained.bbs)  # packs the codes; shares the quantizer
        faiss.add_to_referenced_objects(fast, merged)
        merged.reset()  # its codes now live in `fast`
        return fast
    return merged


def write_index(index: faiss.Index, path: Path) -> None:
    """Write atomically: a temporary file beside ``path``, then rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        faiss.write_index(to_cpu(index), str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_index(path: Path, nprobe: int | None = None, k_factor: float | None = None) -> faiss.Index:
    """Read an index file, with a clear error naming the file if it is missing or corrupted."""
    path = Path(path)
    if not path.is_file():
        raise CorruptDatabaseError(f"missing index file: {path}")
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CorruptDatabaseError(f"{path} is truncated or corrupted (faiss: {first_line})") from None
    set_search_params(index, nprobe, k_factor)
    return index
