"""k nearest neighbors that exclude a document: for queries, and precomputed for every chunk.

Like retro-pytorch, a search asks faiss for ``k + extra`` results and drops those of the excluded document.
Unlike retro-pytorch, a row that still has fewer than ``k`` after dropping (a long document whose own chunks
crowd the top of the list) is searched again with four times as many results, until it has ``k`` or the
index has no more.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import faiss
import numpy as np
from tqdm.auto import tqdm

from retlm.retrieval._storage import ResumableRows, is_complete
from retlm.retrieval.format import TOKEN_DTYPE
from retlm.retrieval.index import as_float32

NO_DOC = -1


def first_valid(ids: np.ndarray, scores: np.ndarray, valid: np.ndarray, k: int):
    """Per row, the first ``k`` entries where ``valid`` holds, in order; ``-1`` / ``-inf`` fill the rest."""
    order = np.argsort(~valid, axis=1, kind="stable")[:, :k]
    keep = np.take_along_axis(valid, order, axis=1)
    ids = np.where(keep, np.take_along_axis(ids, order, axis=1), -1)
    scores = np.where(keep, np.take_along_axis(scores, order, axis=1), -np.inf)
    pad = k - ids.shape[1]
    if pad > 0:
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
    return ids, scores


def search_excluding(
    index: Any,
    queries: Any,
    k: int,
    doc_ids: np.ndarray,
    exclude_doc_ids: np.ndarray | None = None,
    extra: int = 10,
):
    """Top-``k`` ``(ids int64, scores float32)`` of ``queries``, skipping each query's document.

    ``index``: a faiss index (``queries``: vectors ``(nq, dim)``) or a searcher of
    ``retlm.retrieval.sparse`` (``queries``: what its ``search`` reads, indexable by rows).
    ``exclude_doc_ids (nq,)`` names the document to skip per query (``-1``: none). ``doc_ids`` maps a
    database row to its document.
    """
    nq = len(queries)
    exclude = np.full(nq, NO_DOC) if exclude_doc_ids is None else np.asarray(exclude_doc_ids)
    ids = np.full((nq, k), -1, dtype=np.int64)
    scores = np.full((nq, k), -np.inf, dtype=np.float32)
    todo = np.arange(nq)
    # Always k + extra, excluding or not: a re-ranking index keeps k_factor * fetch candidates, and its
    # k_factor was tuned for the neighbor stage's fetch of k + extra.
    fetch = k + extra
    while len(todo) and index.ntotal:
        fetch = min(fetch, index.ntotal)
        found_scores, found = _search(index, queries[todo], fetch)
        found_doc = np.where(found >= 0, np.asarray(doc_ids)[np.maximum(found, 0)], NO_DOC)
        valid = (found >= 0) & (found_doc != exclude[todo, None])
        ids[todo], scores[todo] = first_valid(found, found_scores, valid, k)
        # Rows short of k although faiss filled every slot may have more valid results further down.
        short = (valid.sum(1) < k) & (found[:, -1] >= 0)
        if fetch >= index.ntotal or not short.any():
            break
        todo, fetch = todo[short], fetch * 4
    return ids, scores


def _search(index: Any, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(index, faiss.Index):
        return index.search(as_float32(queries), k)
    return index.search(queries, k)


def compute_neighbors(
    index: Any,
    embeddings: Any,
    doc_ids: np.ndarray,
    k: int,
    out_path: Path,
    *,
    rows: tuple[int, int] | None = None,
    extra: int = 10,
    block: int = 4096,
    progress: bool = True,
    desc: str = "neighbors",
) -> Path:
    """Neighbors of database rows ``lo:hi`` into the int32 file ``out_path (hi - lo, k)``; resumable.

    ``embeddings``: the rows' vectors for a faiss ``index``, or the ``sparse.ChunkQueries`` of a sparse or
    hybrid searcher. Each chunk's own document (itself included) is excluded. Blocks are fixed row
    ranges, so a resumed run writes the same bytes as an uninterrupted one.
    """
    lo, hi = rows if rows is not None else (0, len(embeddings))
    if is_complete(out_path):
        return Path(out_path)
    out = ResumableRows(
        out_path,
        hi - lo,
        (k,),
        TOKEN_DTYPE,
        {"rows": [lo, hi], "k": k, "extra": extra, "block": block, "ntotal": int(index.ntotal)},
    )
    bar = tqdm(total=hi - lo, initial=out.rows_done, desc=desc, unit="chunk", disable=not progress)
    for start in range(out.rows_done, hi - lo, block):
        stop = min(start + block, hi - lo)
        queries = embeddings[lo + start : lo + stop]
        ids, _ = search_excluding(
            index, queries, k, doc_ids, np.asarray(doc_ids[lo + start : lo + stop]), extra
        )
        out.write(start, ids.astype(TOKEN_DTYPE))
        bar.update(stop - start)
    bar.close()
    out.finish()
    return Path(out_path)


def merge_new_neighbors(
    knn: np.ndarray, embeddings: np.ndarray, new_start: int, k: int, block: int = 4096
) -> np.ndarray:
    """Update old rows' neighbor lists ``knn (new_start, k)`` with rows ``new_start:`` added since.

    New rows belong to new documents, so no exclusion applies between old and new. An old row's list
    changes only where a new chunk beats its current k-th neighbor; candidates come from an exact
    search of the old rows among the new ones.
    """
    new = faiss.IndexFlatIP(embeddings.shape[1])
    new.add(as_float32(embeddings[new_start:]))
    merged = np.array(knn[:new_start], dtype=np.int64)
    for start in range(0, new_start, block):
        stop = min(start + block, new_start)
        queries = as_float32(embeddings[start:stop])
        old_ids = merged[start:stop]
        neighbors = as_float32(embeddings[np.maximum(old_ids, 0).ravel()]).reshape(*old_ids.shape, -1)
        old_scores = np.where(old_ids >= 0, np.einsum("qd,qkd->qk", queries, neighbors), -np.inf)
        new_scores, new_ids = new.search(queries, min(k, new.ntotal))
        new_ids = np.where(new_ids >= 0, new_ids + new_start, -1)
        new_scores = np.where(new_ids >= 0, new_scores, -np.inf)
        all_ids = np.concatenate([old_ids, new_ids], axis=1)
        all_scores = np.concatenate([old_scores, new_scores], axis=1)
        order = np.argsort(-all_scores, axis=1, kind="stable")[:, :k]
        merged[start:stop] = np.where(
            np.take_along_axis(all_scores, order, axis=1) > -np.inf,
            np.take_along_axis(all_ids, order, axis=1),
            -1,
        )
    return merged.astype(TOKEN_DTYPE)
