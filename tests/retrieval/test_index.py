"""retlm.retrieval.index: the default large-database index, its tuner, and building it from shards.

References: a float64 brute force for recall and scores, and the index a single faiss ``add`` builds
(byte for byte) for the shard merge.
"""

import faiss
import numpy as np
import pytest

from retlm.retrieval.index import (
    K_FACTORS,
    NPROBES,
    add_rows,
    choose_factory,
    merge_indexes,
    mergeable_empty,
    recall_at_k,
    set_search_params,
    train_index,
    training_sample,
    tune_search,
)
from retlm.retrieval.neighbors import search_excluding

DIM = 64


def structured(n: int, seed: int) -> np.ndarray:
    """Unit vectors of intrinsic dimension 8 in 64-d plus a little noise (like bench/retrieval.py)."""
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(99).standard_normal((8, DIM))
    x = rng.standard_normal((n, 8)) @ mixing + 0.1 * rng.standard_normal((n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def vectors():
    return structured(12_000, seed=0)


def within_margin(recall: float, target: float, samples: int = 2000) -> bool:
    """The tuner's acceptance rule: recall minus two standard errors (1000 queries x k=2) reaches it."""
    return recall - 2 * np.sqrt(recall * (1 - recall) / samples) >= target


def brute_force(queries: np.ndarray, x: np.ndarray, k: int, skip_self: np.ndarray | None = None):
    sims = queries.astype(np.float64) @ x.astype(np.float64).T
    if skip_self is not None:
        sims[np.arange(len(queries)), skip_self] = -np.inf
    return np.argsort(-sims, axis=1, kind="stable")[:, :k]


def test_choose_factory_by_size_and_dim():
    assert choose_factory(50_000) == "Flat"
    assert choose_factory(1_000_000) == "IVF1024,PQ96x4fs,Refine(SQfp16)"
    assert choose_factory(3_000_000) == "IVF2048,PQ96x4fs,Refine(SQfp16)"
    assert choose_factory(100_000_000) == "IVF8192_HNSW32,PQ96x4fs,Refine(SQfp16)"
    assert choose_factory(1_000_000, dim=768) == "IVF1024,PQ192x4fs,Refine(SQfp16)"
    assert choose_factory(1_000_000, dim=90) == "IVF1024,PQ45x4fs,Refine(SQfp16)"  # 2 dims per code
    for dim in (384, 90, 31):  # every choice is a valid faiss factory string for its dimension
        faiss.index_factory(dim, choose_factory(1_000_000, dim=dim), faiss.METRIC_INNER_PRODUCT)


@pytest.mark.parametrize(
    "factory",
    [
        "IVF64,PQ16x4fs,Refine(SQfp16)",
        "IVF64_HNSW32,PQ16x4fs,RFlat",
        "IVF64,SQ8",
        "Flat",
    ],
)
def test_shards_merge_into_the_single_add_index(vectors, factory, tmp_path):
    """Shards add consecutive row ranges to copies of one trained index; the merge (through files, as
    the Ray engine does it) is byte-identical to adding every row in one process."""
    trained = train_index(vectors, factory)
    single = add_rows(faiss.clone_index(trained), vectors, progress=False)
    bounds = [0, 1000, 5500, 5500, len(vectors)]  # uneven, one empty shard
    files = []
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        part = add_rows(mergeable_empty(trained), vectors, (lo, hi), progress=False)
        assert part.ntotal == hi - lo
        files.append(tmp_path / f"part{i}.faiss")
        faiss.write_index(part, str(files[-1]))
        del part
    merged = merge_indexes(trained, (faiss.read_index(str(f)) for f in files))
    assert merged.ntotal == len(vectors)
    assert bytes(faiss.serialize_index(merged)) == bytes(faiss.serialize_index(single))
    set_search_params(merged, 8, 4)
    set_search_params(single, 8, 4)
    for got, want in zip(merged.search(vectors[:300], 5), single.search(vectors[:300], 5), strict=True):
        np.testing.assert_array_equal(got, want)


def test_training_equals_plain_faiss_training(vectors):
    """train_index trains the coarse quantizer first, then the rest on one thread: same index."""
    factory = "IVF64,PQ16x4fs,Refine(SQfp16)"
    ours = train_index(vectors, factory)
    plain = faiss.index_factory(DIM, factory, faiss.METRIC_INNER_PRODUCT)
    plain.train(vectors[training_sample(len(vectors), plain, 0)])
    assert bytes(faiss.serialize_index(ours)) == bytes(faiss.serialize_index(plain))


def test_unsupported_index_types_are_named(vectors):
    trained = train_index(vectors[:2000], "HNSW16")
    with pytest.raises(ValueError, match="cannot build a IndexHNSWFlat index from shards"):
        mergeable_empty(trained)


@pytest.mark.heavy
def test_tuner_reaches_the_target_with_the_smallest_k_factor(vectors):
    index = add_rows(train_index(vectors, "IVF64,PQ16x4fs,Refine(SQfp16)"), vectors, progress=False)
    k, fetch, target = 2, 12, 0.95
    tuning = tune_search(index, vectors, k, target, fetch=fetch)
    assert tuning.nprobe in NPROBES and tuning.k_factor in K_FACTORS
    assert tuning.recall >= target and tuning.num_queries == 1000
    again = tune_search(index, vectors, k, target, fetch=fetch)
    assert (again.nprobe, again.k_factor, again.recall) == (tuning.nprobe, tuning.k_factor, tuning.recall)

    # the recall it reports, recomputed from scratch against a float64 brute force on the same queries
    query_ids = np.sort(np.random.default_rng(1).choice(len(vectors), size=1000, replace=False))
    queries = vectors[query_ids]
    exact = brute_force(queries, vectors, k, skip_self=query_ids)

    def measured(nprobe, k_factor):
        set_search_params(index, nprobe, k_factor)
        _, ids = index.search(queries, fetch)
        ids = np.stack([row[row != q][:k] for row, q in zip(ids, query_ids, strict=True)])
        return recall_at_k(ids, exact)

    assert measured(tuning.nprobe, tuning.k_factor) == pytest.approx(tuning.recall, abs=2e-3)
    smaller = K_FACTORS[K_FACTORS.index(tuning.k_factor) - 1] if tuning.k_factor > K_FACTORS[0] else None
    if smaller is not None:  # one step fewer candidates misses the target (with its margin) at this nprobe
        assert not within_margin(measured(tuning.nprobe, smaller), target)
    assert within_margin(tuning.recall, target)

    # and on fresh queries, through the neighbor search, with exact re-ranked scores
    set_search_params(index, tuning.nprobe, tuning.k_factor)
    fresh = structured(500, seed=5)
    ids, scores = search_excluding(index, fresh, k, np.zeros(len(vectors), dtype=np.int32), None, fetch - k)
    assert recall_at_k(ids, brute_force(fresh, vectors, k)) >= 0.9
    true_scores = np.einsum("qd,qkd->qk", fresh.astype(np.float64), vectors[ids].astype(np.float64))
    np.testing.assert_allclose(scores, true_scores, atol=2e-3)  # float16 re-rank: exact to fp16


def test_tuner_leaves_exact_indexes_alone(vectors):
    index = add_rows(train_index(vectors, "Flat"), vectors, progress=False)
    tuning = tune_search(index, vectors, 2)
    assert (tuning.nprobe, tuning.k_factor, tuning.recall, tuning.num_queries) == (None, None, 1.0, 0)


def test_ivf_without_refine_tunes_nprobe_only(vectors):
    """An IVF index without a re-rank: the smallest nprobe of the grid that reaches the target."""
    index = add_rows(train_index(vectors, "IVF64,SQ8"), vectors, progress=False)
    tuning = tune_search(index, vectors, 2, 0.9, fetch=12)
    assert tuning.k_factor is None and tuning.recall >= 0.9 and tuning.nprobe > 1
    query_ids = np.sort(np.random.default_rng(1).choice(len(vectors), size=1000, replace=False))
    exact = brute_force(vectors[query_ids], vectors, 2, skip_self=query_ids)
    set_search_params(index, NPROBES[NPROBES.index(tuning.nprobe) - 1])
    _, ids = index.search(vectors[query_ids], 12)
    ids = np.stack([row[row != q][:2] for row, q in zip(ids, query_ids, strict=True)])
    assert not within_margin(recall_at_k(ids, exact), 0.9)
