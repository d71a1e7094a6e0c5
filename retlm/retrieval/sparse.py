"""Sparse (BM25) and hybrid retrieval over the chunks' text: the retrievers besides the dense faiss index.

- ``bm25``: Okapi BM25 (Lucene's variant, k1 = 1.5, b = 0.75) over each chunk's text, decoded from its LM
  tokens and cut into lower-cased words with English stop words removed and Snowball's English stemmer
  applied (what Pyserini's BM25, used by In-Context RALM, does by default). The index is built and
  searched by ``bm25s`` (a maintained, pure numpy/scipy implementation: eager sparse scoring, its
  matrices saved as ``.npy`` files read with ``allow_pickle=False`` and memory-mapped).
- ``hybrid``: the dense and the BM25 rankings fused by reciprocal rank fusion (Cormack et al., 2009):
  a chunk's score is the sum over the rankings of ``1 / (RRF_K + rank)``, rank from 1.

A database with ``bm25`` has no embeddings and no faiss index; ``hybrid`` has both indexes. The BM25
index lives in the ``BM25_FILES`` (``retlm.retrieval.format``) of the database folder, each under the
checksums of the manifest. Scores returned: BM25 scores (``bm25``), fused scores (``hybrid``). A BM25
hit that shares no word with the query scores 0 and is returned as no neighbor (``-1``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retlm.compat import bm25_save_kwargs
from retlm.retrieval.format import BM25_FILES
from retlm.utils import deprecated_aliases

# names that moved to format.py (issue #20), for one release
__getattr__ = deprecated_aliases(
    __name__,
    {
        "RETRIEVERS": "retlm.retrieval.format.RETRIEVERS",
        "has_dense": "retlm.retrieval.format.has_dense",
        "has_sparse": "retlm.retrieval.format.has_sparse",
        "BM25_ARRAYS": "retlm.retrieval.format.BM25_ARRAYS",
    },
)

RRF_K = 60
BM25_PARAMS = {"k1": 1.5, "b": 0.75, "method": "lucene"}
# logical name -> bm25s's save() / load() keyword for that file
BM25_KEYWORDS = dict(
    zip(BM25_FILES, ("data_name", "indices_name", "indptr_name", "vocab_name", "params_name"), strict=True)
)
TEXT_BLOCK = 4096


def _word_tokenizer():
    import bm25s
    import Stemmer

    return bm25s.tokenization.Tokenizer(stopwords="en", stemmer=Stemmer.Stemmer("english"))


def bm25_words(texts: Sequence[str]) -> list[list[str]]:
    """The BM25 terms of each text: lower-cased words of 2+ characters, English stop words removed,
    stemmed."""
    return _word_tokenizer().tokenize(list(texts), return_as="string", show_progress=False)


def chunk_texts_of(chunks: np.ndarray, lm_tokenizer, pad_id: int) -> list[str]:
    """``(n, chunk_size [+ 1])`` chunk rows -> their texts (the first ``chunk_size`` tokens of a row)."""
    from retlm.retrieval.embedding import chunk_texts

    return chunk_texts(lm_tokenizer, np.asarray(chunks), pad_id)


def build_bm25(
    chunks: np.ndarray, lm_tokenizer, pad_id: int, folder: Path, names: dict[str, str] | None = None
) -> None:
    """Index the text of every row of ``chunks (n, chunk_size + 1)`` with BM25 into ``folder``: the files
    of ``BM25_FILES`` (under ``names[logical]`` if given), written to a temporary folder first and then
    moved in."""
    import bm25s

    c = chunks.shape[1] - 1
    tokenizer = _word_tokenizer()
    ids: list[list[int]] = []
    for start in range(0, len(chunks), TEXT_BLOCK):
        texts = chunk_texts_of(chunks[start : start + TEXT_BLOCK, :c], lm_tokenizer, pad_id)
        ids.extend(tokenizer.tokenize(texts, update_vocab=True, return_as="ids", show_progress=False))
    retriever = bm25s.BM25(**BM25_PARAMS)
    retriever.index((ids, tokenizer.get_vocab_dict()), show_progress=False)
    names = {logical: (names or {}).get(logical, logical) for logical in BM25_FILES}
    tmp = Path(folder) / ".bm25.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = {BM25_KEYWORDS[k]: v for k, v in names.items()}
    retriever.save(tmp, **files, **bm25_save_kwargs(retriever.save))
    for target in names.values():
        os.replace(tmp / target, Path(folder) / target)
    shutil.rmtree(tmp, ignore_errors=True)


class BM25Searcher:
    """A BM25 index read (memory-mapped) from a database folder: ``search(words, k)`` like faiss's."""

    def __init__(self, folder: Path, files: dict[str, str]):
        import bm25s

        kwargs = {keyword: files.get(logical, logical) for logical, keyword in BM25_KEYWORDS.items()}
        self.retriever = bm25s.BM25.load(folder, mmap=True, load_corpus=False, **kwargs)
        self.ntotal = int(self.retriever.scores["num_docs"])

    def search(self, words: Sequence[list[str]], k: int) -> tuple[np.ndarray, np.ndarray]:
        """``words``: the BM25 terms of each query -> ``(scores float32, ids int64)``, each ``(nq, k)``,
        best first; hits that share no term with the query are ``-1``."""
        nq, k = len(words), min(k, self.ntotal)
        if nq == 0 or k == 0:
            return np.zeros((nq, k), np.float32), np.full((nq, k), -1, np.int64)
        found, scores = self.retriever.retrieve(
            [list(w) or [""] for w in words], k=k, show_progress=False, n_threads=0
        )
        scores = np.asarray(scores, dtype=np.float32).reshape(nq, k)
        ids = np.where(scores > 0, np.asarray(found, dtype=np.int64).reshape(nq, k), -1)
        return np.where(ids >= 0, scores, -np.inf).astype(np.float32), ids


class HybridQueries:
    """The queries of a hybrid search: unit vectors ``(nq, dim)`` and their BM25 terms (``nq`` lists)."""

    def __init__(self, vectors: np.ndarray, words: Sequence[list[str]]):
        self.vectors = vectors
        self.words = np.empty(len(words), dtype=object)
        self.words[:] = [list(w) for w in words]

    def __len__(self) -> int:
        return len(self.vectors)

    def __getitem__(self, rows: Any) -> HybridQueries:
        return HybridQueries(self.vectors[rows], self.words[rows])


class HybridSearcher:
    """Dense and BM25 rankings fused by reciprocal rank fusion: ``search(HybridQueries, k)``."""

    def __init__(self, dense, sparse: BM25Searcher):
        self.dense, self.sparse = dense, sparse
        self.ntotal = int(dense.ntotal)

    def search(self, queries: HybridQueries, k: int) -> tuple[np.ndarray, np.ndarray]:
        from retlm.retrieval.index import as_float32

        k = min(k, self.ntotal)
        _, dense_ids = self.dense.search(as_float32(queries.vectors), k)
        _, sparse_ids = self.sparse.search(list(queries.words), k)
        return fuse_rankings([dense_ids, sparse_ids], k)


def make_searcher(retriever: str, dense_index: Any, folder: Path, files: dict[str, str] | None = None) -> Any:
    """What a search of ``retriever`` queries: the faiss ``dense_index``, the BM25 index of ``folder``
    (its files named by ``files``: logical -> relative path), or both fused."""
    if retriever == "dense":
        return dense_index
    sparse = BM25Searcher(folder, files or {})
    return sparse if retriever == "bm25" else HybridSearcher(dense_index, sparse)


def fuse_rankings(rankings: Sequence[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Reciprocal rank fusion of ``(nq, depth)`` id rankings (-1: none) -> the ``k`` best ``(scores
    float32, ids int64)`` per query; equal scores are ordered by the first ranking's order, then the
    next's."""
    nq = len(rankings[0])
    ids = np.full((nq, k), -1, dtype=np.int64)
    scores = np.full((nq, k), -np.inf, dtype=np.float32)
    for q in range(nq):
        fused: dict[int, float] = {}
        for ranking in rankings:
            for rank, chunk in enumerate(ranking[q], start=1):
                if chunk >= 0:
                    fused[int(chunk)] = fused.get(int(chunk), 0.0) + 1.0 / (RRF_K + rank)
        best = sorted(fused.items(), key=lambda item: -item[1])[:k]  # stable: first-seen order on ties
        for j, (chunk, score) in enumerate(best):
            ids[q, j], scores[q, j] = chunk, score
    return scores, ids


class ChunkQueries:
    """Database rows as the queries of the neighbor stage, made block by block: ``rows[lo:hi]`` is the
    rows' embeddings (``dense``), their BM25 terms (``bm25``) or both (``hybrid``)."""

    def __init__(self, retriever: str, chunks: np.ndarray, lm_tokenizer, pad_id: int, embeddings=None):
        self.retriever, self.chunks, self.embeddings = retriever, chunks, embeddings
        self.lm_tokenizer, self.pad_id = lm_tokenizer, pad_id

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, rows: slice):
        if self.retriever == "dense":
            return self.embeddings[rows]
        c = self.chunks.shape[1] - 1
        words = bm25_words(chunk_texts_of(self.chunks[rows, :c], self.lm_tokenizer, self.pad_id))
        if self.retriever == "bm25":
            return _object_array(words)
        return HybridQueries(np.asarray(self.embeddings[rows]), words)


def _object_array(words: Sequence[list[str]]) -> np.ndarray:
    out = np.empty(len(words), dtype=object)
    out[:] = [list(w) for w in words]
    return out


def query_inputs(retriever: str, tokens: np.ndarray, lm_tokenizer, pad_id: int, embed) -> Any:
    """``(nq, chunk_size)`` query chunks -> what the retriever's searcher reads: vectors (``embed(tokens)``),
    BM25 terms, or both."""
    if retriever == "dense":
        return embed(tokens)
    words = bm25_words(chunk_texts_of(tokens, lm_tokenizer, pad_id))
    if retriever == "bm25":
        return _object_array(words)
    return HybridQueries(embed(tokens), words)
