"""BM25 and hybrid databases: BM25 scores against a direct float64 computation of the formula, reciprocal
rank fusion against its definition, neighbors that exclude their own document, search, add (equal to a
rebuild), a killed build that resumes, and corrupted BM25 files refused. A tiny random BERT embeds the
hybrid databases' chunks."""

import json
import math
import re
from collections import Counter

import numpy as np
import pytest

from retlm import RetrievalDatabase
from retlm.demo.corpus import pydoc_topics
from retlm.retrieval._storage import CorruptDatabaseError
from retlm.retrieval.sparse import RRF_K, bm25_words, fuse_rankings

C, K = 16, 2


@pytest.fixture(scope="module")
def docs():
    return [text[:1500] for _, text in list(pydoc_topics())[:14]]


def build(docs, path, encoder, retriever, **kwargs):
    options = dict(chunk_size=C, num_neighbors=K, seq_len=64, embedder=encoder, batch_size=32, progress=False)
    return RetrievalDatabase.build(docs, path, retriever=retriever, **{**options, **kwargs})


@pytest.fixture(scope="module", params=["bm25", "hybrid"])
def db(request, docs, tiny_encoder, tmp_path_factory):
    return build(docs, tmp_path_factory.mktemp(request.param) / "db", tiny_encoder, request.param)


def chunk_words(db):
    return bm25_words([db.chunk_text(i) for i in range(len(db))])


def bm25_reference(corpus, query, k1=1.5, b=0.75):
    """Lucene's BM25 in float64, straight from its definition: one score per document."""
    n, avg = len(corpus), np.mean([len(d) for d in corpus])
    frequency = Counter(term for d in corpus for term in set(d))
    scores = np.zeros(n)
    for term in set(query):
        if term not in frequency:
            continue
        idf = math.log(1 + (n - frequency[term] + 0.5) / (frequency[term] + 0.5))
        for i, d in enumerate(corpus):
            tf = d.count(term)
            if tf:
                scores[i] += idf * tf / (tf + k1 * (1 - b + b * len(d) / avg))
    return scores


def test_manifest_and_files(db):
    m = db.manifest
    assert m["retriever"] in ("bm25", "hybrid") and db.retriever == m["retriever"]
    bm25 = {"bm25_data.npy", "bm25_indices.npy", "bm25_indptr.npy", "bm25_vocab.json", "bm25_params.json"}
    assert bm25 <= set(m["checksums"])
    assert ("embeddings.dat" in m["checksums"]) == (db.retriever == "hybrid")
    assert (db.embeddings is None) == (db.retriever == "bm25")


def test_bm25_search_matches_the_formula(docs, tiny_encoder, tmp_path):
    db = build(docs, tmp_path / "db", tiny_encoder, "bm25")
    corpus = chunk_words(db)
    queries = ["the for statement iterates over a sequence", "class definitions and inheritance"]
    result = db.search(queries, 5)
    for q, query in enumerate(queries):
        expected = bm25_reference(corpus, bm25_words([query])[0])
        np.testing.assert_allclose(result.scores[q], np.sort(expected)[::-1][:5], rtol=1e-4)
        np.testing.assert_allclose(expected[result.chunk_ids[q]], result.scores[q], rtol=1e-4)


def test_neighbors_exclude_own_document_and_match_a_search(db):
    valid = db.knn >= 0
    assert valid.any(axis=1).mean() > 0.9  # almost every chunk shares a word with another document's
    own = np.asarray(db.doc_ids)[np.maximum(db.knn, 0)] == np.asarray(db.doc_ids)[:, None]
    assert not (own & valid).any()
    rows = np.arange(0, len(db), 7)
    tokens = np.asarray(db.chunks[rows, :C])
    found = db.search(tokens, K, exclude_doc_ids=np.asarray(db.doc_ids)[rows])
    np.testing.assert_array_equal(found.chunk_ids, db.knn[rows])


def test_hybrid_fuses_the_two_rankings_by_reciprocal_rank(docs, tiny_encoder, tmp_path):
    hybrid = build(docs, tmp_path / "hybrid", tiny_encoder, "hybrid")
    query = "the for statement iterates over a sequence"
    result = hybrid.search([query], 4)
    fetch = 4 + hybrid.manifest["extra_neighbors"]
    vectors = hybrid.embed_chunks(hybrid.query_chunks([query])).astype(np.float32)
    dense = hybrid.index.search(vectors, fetch)[1]
    scores = bm25_reference(chunk_words(hybrid), bm25_words([query])[0])
    sparse = [i for i in np.argsort(-scores, kind="stable")[:fetch] if scores[i] > 0]
    fused: dict[int, float] = {}
    for ranking in (dense[0], sparse):
        for rank, chunk in enumerate(ranking, start=1):
            fused[int(chunk)] = fused.get(int(chunk), 0) + 1 / (RRF_K + rank)
    expected = sorted(fused.values(), reverse=True)[:4]
    np.testing.assert_allclose(result.scores[0], expected, rtol=1e-6)
    found = [fused[int(i)] for i in result.chunk_ids[0]]
    np.testing.assert_allclose(found, expected, rtol=1e-6)


def test_fuse_rankings_orders_and_pads():
    scores, ids = fuse_rankings([np.array([[3, 1, -1]]), np.array([[1, 2, 5]])], 5)
    assert ids[0].tolist()[:4] == [1, 3, 2, 5] and ids[0, 4] == -1
    np.testing.assert_allclose(scores[0, 0], 1 / (RRF_K + 2) + 1 / (RRF_K + 1))
    assert scores[0, 4] == -np.inf


@pytest.mark.heavy
def test_add_equals_a_full_rebuild(docs, tiny_encoder, tmp_path, db):
    grown = build(docs[:10], tmp_path / "grown", tiny_encoder, db.retriever, embedding_dtype="float32")
    grown.add(docs[10:])
    full = build(docs, tmp_path / "full", tiny_encoder, db.retriever, embedding_dtype="float32")
    for name in ("chunks", "doc_ids", "seqs", "knn"):
        np.testing.assert_array_equal(getattr(grown, name), getattr(full, name), err_msg=name)
    query = ["exceptions raised by the interpreter"]
    np.testing.assert_array_equal(grown.search(query, 3).chunk_ids, full.search(query, 3).chunk_ids)
    assert RetrievalDatabase.open(grown.path, verify=True).manifest["generation"] == 1


@pytest.mark.heavy
def test_a_build_killed_after_its_bm25_index_resumes(docs, tiny_encoder, tmp_path, monkeypatch, db):
    """The build dies in its neighbor stage, after the BM25 index is written (a KeyboardInterrupt, which
    the stages do not clean up after, as after a kill); the re-run finishes with the same bytes."""
    import retlm.retrieval.neighbors as neighbors

    reference = build(docs, tmp_path / "reference", tiny_encoder, db.retriever)
    original, calls = neighbors.search_excluding, {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt("killed")
        return original(*args, **kwargs)

    monkeypatch.setattr(neighbors, "search_excluding", dying)
    path = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        build(docs, path, tiny_encoder, db.retriever)
    assert not (path / "manifest.json").exists() and (path / "bm25_vocab.json").exists()
    monkeypatch.setattr(neighbors, "search_excluding", original)
    resumed = build(docs, path, tiny_encoder, db.retriever)
    for name in reference.manifest["checksums"]:
        assert (reference.path / name).read_bytes() == (resumed.path / name).read_bytes(), name


@pytest.mark.parametrize("name", ["bm25_data.npy", "bm25_vocab.json", "bm25_params.json"])
def test_a_corrupted_bm25_file_is_refused(docs, tiny_encoder, tmp_path, name):
    db = build(docs, tmp_path / "db", tiny_encoder, "bm25")
    file = db.path / name
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01
    file.write_bytes(bytes(data))
    with pytest.raises(CorruptDatabaseError, match=re.escape(name)):
        RetrievalDatabase.open(db.path, verify=False).search(["a query"], 1)
    with pytest.raises(CorruptDatabaseError, match=re.escape(name)):
        RetrievalDatabase.open(db.path, verify=True)


def test_bm25_database_via_the_cli(docs, tiny_encoder, tmp_path, capsys):
    from retlm.cli.main import main

    folder = tmp_path / "texts"
    folder.mkdir()
    for i, text in enumerate(docs[:6]):
        (folder / f"{i}.txt").write_text(text)
    out = tmp_path / "db"
    args = ["--chunk-size", "16", "--seq-len", "64", "--embedder", tiny_encoder, "--no-progress"]
    assert main(["build-db", str(folder), "--out", str(out), "--retriever", "bm25", *args]) == 0
    assert main(["search", str(out), "the for statement", "-k", "2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert len(rows[0]["neighbors"]) == 2 and rows[0]["neighbors"][0]["score"] > 0
    assert main(["db-info", str(out)]) == 0
    assert re.search(r"retriever\s+bm25", capsys.readouterr().out)
