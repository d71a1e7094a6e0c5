"""RetrievalDatabase: neighbors against a float64 brute force, exclusion, search, add, shards, recall,
manifest validation and bad input; both tokenizers (GPT-2 chunks embedded from their re-tokenized text,
and the seed's WordPiece ids fed to the embedder) against an independent HF encoding. A tiny random-weight
BERT (MiniLM's tokenizer) keeps it fast."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from transformers import PreTrainedTokenizerFast

import retlm
from retlm import RetrievalDatabase
from retlm.checksums import seal
from retlm.demo.corpus import pydoc_topics
from retlm.retrieval._storage import CorruptDatabaseError
from retlm.tokenization import vocabulary_sha256

os.environ.setdefault("HF_HUB_OFFLINE", "1")
C, K = 16, 2


@pytest.fixture(scope="module")
def docs():
    return [text[:1500] for _, text in list(pydoc_topics())[:14]]


def build(docs, path, encoder, **kwargs):
    options = dict(
        chunk_size=C,
        num_neighbors=K,
        seq_len=64,
        embedder=encoder,
        embedding_dtype="float32",
        batch_size=32,
        progress=False,
    )
    return RetrievalDatabase.build(docs, path, **{**options, **kwargs})


@pytest.fixture(scope="module")
def db(docs, tiny_encoder, tmp_path_factory):
    return build(docs, tmp_path_factory.mktemp("db") / "db", tiny_encoder)


def brute_force_knn(embeddings, doc_ids, k):
    """float64 cosine top-k, excluding each chunk's own document: ``(ids, scores)`` of the k-th best."""
    x = np.asarray(embeddings, dtype=np.float64)
    sims = x @ x.T
    sims[doc_ids[:, None] == doc_ids[None, :]] = -np.inf
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(sims, order, axis=1)


@pytest.mark.heavy
def test_layout_and_manifest(db, docs):
    m = db.manifest
    assert len(db) == db.num_chunks == m["num_chunks"] > 100
    assert db.chunks.shape == (len(db), C + 1) and db.chunks.dtype == np.int32
    assert db.knn.shape == (len(db), K) and db.neighbors is db.knn
    assert (m["pad_id"], m["eos_id"], m["tokenizer"]["vocab_size"]) == (50256, 50256, 50257)
    assert m["tokenizer"]["name"] == "gpt2" and m["tokenizer"]["byte_level"]
    assert m["tokenizer"]["sha256"] == vocabulary_sha256(retlm.load_tokenizer("gpt2"))
    assert m["embedder_tokenizer"]["vocab_size"] == 30522 and m["embedder_tokenizer"]["max_length"] == 128
    assert m["embedder_input"] == "text" and m["embedder_truncated_chunks"] == 0
    assert m["index_type"] == "Flat" and m["recall_at_k"] == 1.0 and m["num_docs"] == len(docs)
    assert set(m["checksums"]) == {
        "chunks.dat",
        "doc_ids.dat",
        "seqs.dat",
        "doc_names.jsonl",
        "embeddings.dat",
        "knn.dat",
        "index.faiss",
    }
    assert isinstance(db.tokenizer, PreTrainedTokenizerFast) and db.tokenizer.is_fast
    assert db.tokenizer("Hello world")["input_ids"] == [15496, 995]
    assert [db.doc_name(d) for d in (0, 13)] == ["doc-0", "doc-13"]
    assert db.chunk_text(0) == docs[0][: len(db.chunk_text(0))]  # cased, spaces and newlines kept
    assert not list(db.path.glob("*.partial")) and not list(db.path.glob("*.progress"))


def test_neighbors_are_the_exact_nearest_of_other_documents(db):
    doc_ids = np.asarray(db.doc_ids)
    knn = np.asarray(db.knn)
    assert (knn >= 0).all()
    assert (doc_ids[knn] != doc_ids[:, None]).all()  # own-document exclusion, every neighbor
    _, ref_scores = brute_force_knn(db.embeddings, doc_ids, K)
    x = np.asarray(db.embeddings, dtype=np.float64)
    got_scores = np.einsum("nd,nkd->nk", x, x[knn])
    np.testing.assert_allclose(got_scores, ref_scores, atol=1e-5)  # same similarities (ties may swap ids)


def test_search_finds_own_text_and_excludes_documents(db, docs):
    result = db.search(docs[:4], k=3)
    assert result.chunk_ids.shape == result.doc_ids.shape == result.scores.shape == (4, 3)
    first_chunks = [int(np.flatnonzero(np.asarray(db.doc_ids) == d)[0]) for d in range(4)]
    assert result.chunk_ids[:, 0].tolist() == first_chunks
    np.testing.assert_allclose(result.scores[:, 0], 1.0, atol=1e-5)
    assert result.tokens.shape == (4, 3, 2 * C) and result.retrieved.dtype == torch.long
    excluded = db.search(docs[:4], k=3, exclude_doc_ids=[0, 1, 2, 3])
    assert (excluded.doc_ids != np.arange(4)[:, None]).all()
    token_queries = db.search(torch.from_numpy(np.asarray(db.chunks[first_chunks, :C])), k=1)
    assert token_queries.chunk_ids[:, 0].tolist() == first_chunks
    stacked = torch.from_numpy(np.asarray(db.chunks[first_chunks, :C])).reshape(2, 2, C)
    per_sequence = db.search(stacked, k=2, exclude_doc_ids=-1)
    assert per_sequence.retrieved.shape == (2, 2, 2, 2 * C)  # (batch, n_chunks, k, 2c): RETRO's input
    np.testing.assert_array_equal(per_sequence.chunk_ids.reshape(4, 2)[:, 0], first_chunks)
    texts = result.texts
    assert len(texts) == 4 and texts[0][0] == db.chunk_text(first_chunks[0])


def test_retrieved_tokens_are_neighbor_plus_continuation(db):
    ids = np.array([[0, len(db) - 1], [-1, 5]])
    out = db.retrieved_tokens(ids)
    doc_ids = np.asarray(db.doc_ids)
    for (r, j), cid in np.ndenumerate(ids):
        if cid < 0:
            assert (out[r, j] == db.pad_id).all()
            continue
        np.testing.assert_array_equal(out[r, j, :C], db.chunks[cid, :C])
        same_doc_next = cid + 1 < len(db) and doc_ids[cid + 1] == doc_ids[cid]
        expected = db.chunks[cid + 1, :C] if same_doc_next else np.full(C, db.pad_id)
        np.testing.assert_array_equal(out[r, j, C:], expected)
    training = db.retrieved_for_chunks(np.array([[3, 4]]))
    assert training.shape == (1, 2, K, 2 * C)
    np.testing.assert_array_equal(training[0, 1], db.retrieved_tokens(db.knn[4]))


@pytest.mark.heavy
def test_add_equals_full_rebuild(docs, tiny_encoder, tmp_path):
    full = build(docs, tmp_path / "full", tiny_encoder)
    grown = build(docs[:9], tmp_path / "grown", tiny_encoder)
    grown.add(docs[9:])
    for name in ("chunks", "doc_ids", "seqs", "knn"):
        np.testing.assert_array_equal(getattr(grown, name), getattr(full, name), err_msg=name)
    np.testing.assert_allclose(grown.embeddings, full.embeddings, atol=1e-6)
    assert grown.manifest["num_docs"] == full.manifest["num_docs"]
    RetrievalDatabase.open(grown.path)  # checksums rewritten


@pytest.mark.heavy
def test_sharded_build_equals_single(docs, db, tiny_encoder, tmp_path):
    path = tmp_path / "sharded"
    build(docs, path, tiny_encoder, stage="chunk")
    for i in range(3):
        assert build(None, path, tiny_encoder, stage="embed", shard=f"{i}/3") is None
    build(None, path, tiny_encoder, stage="index")
    for i in (2, 0, 1):
        build(None, path, tiny_encoder, stage="neighbors", shard=(i, 3))
    sharded = build(None, path, tiny_encoder, stage="finalize")
    # shard boundaries fall on batch boundaries: the same batches, so the same bytes
    np.testing.assert_array_equal(sharded.embeddings, db.embeddings)
    np.testing.assert_array_equal(sharded.knn, db.knn)
    assert not (path / "shards").exists()


def test_missing_shard_is_named(docs, tiny_encoder, tmp_path):
    path = tmp_path / "partial"
    build(docs, path, tiny_encoder, stage="chunk")
    build(None, path, tiny_encoder, stage="embed", shard="0/2")
    with pytest.raises(RuntimeError, match=r"shards \[1\] of 2"):
        build(None, path, tiny_encoder, stage="index")


@pytest.mark.heavy
def test_ivf_recall_is_measured_against_exact(docs, tiny_encoder, tmp_path):
    many = [text[:1500] for _, text in list(pydoc_topics())[:50]]
    db = build(
        many, tmp_path / "ivf", tiny_encoder, exact_threshold=100, target_recall=0.9, chunk_size=8, seq_len=64
    )
    m = db.manifest
    assert m["index_type"].startswith("IVF") and m["nprobe"] >= 1 and m["recall_at_k"] >= 0.9
    doc_ids = np.asarray(db.doc_ids)
    ref_ids, ref_scores = brute_force_knn(db.embeddings, doc_ids, K)
    x = np.asarray(db.embeddings, dtype=np.float64)
    knn = np.asarray(db.knn)
    got = np.where(knn >= 0, np.einsum("nd,nkd->nk", x, x[np.maximum(knn, 0)]), -np.inf)
    recall = np.mean(got >= ref_scores[:, -1:] - 1e-6)  # a hit: at least as close as the true k-th
    assert recall >= 0.85, recall


def test_open_refuses_corruption_and_mismatches(db, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(db.path, copy)
    RetrievalDatabase.open(copy)
    with pytest.raises(ValueError, match="embedder"):
        RetrievalDatabase.open(copy, embedder="bert-base-cased")
    with pytest.raises(ValueError, match="built with tokenizer 'gpt2', not 'bert'"):
        RetrievalDatabase.open(copy, tokenizer="bert")
    data = bytearray((copy / "knn.dat").read_bytes())
    data[0] ^= 1
    (copy / "knn.dat").write_bytes(bytes(data))
    for verify in (True, False):  # a small file's sampled digest covers all of it
        with pytest.raises(CorruptDatabaseError, match="knn.dat does not match the sampled checksum"):
            RetrievalDatabase.open(copy, verify=verify)
    (copy / "chunks.dat").write_bytes((copy / "chunks.dat").read_bytes()[:-7])
    with pytest.raises(CorruptDatabaseError, match="chunks.dat is truncated"):
        RetrievalDatabase.open(copy)
    shutil.copy(db.path / "chunks.dat", copy / "chunks.dat")
    shutil.copy(db.path / "knn.dat", copy / "knn.dat")
    (copy / "index.faiss").write_bytes(b"garbage")
    for verify in (True, False):  # the index is checked on every open
        with pytest.raises(CorruptDatabaseError, match="index.faiss does not match"):
            RetrievalDatabase.open(copy, verify=verify)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(CorruptDatabaseError, match="format_version"):
        RetrievalDatabase.open(copy)
    (copy / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))
    with pytest.raises(CorruptDatabaseError, match="older retlm .* rebuild it"):
        RetrievalDatabase.open(copy)
    # a tokenizer folder that no longer holds the recorded vocabulary is refused when first used: by the
    # checksums of its files, and (where a manifest records none) by the vocabulary hash
    (copy / "manifest.json").write_text(json.dumps(manifest))
    shutil.copy(db.path / "index.faiss", copy / "index.faiss")
    retlm.load_tokenizer("bert").save_pretrained(copy / "tokenizer")
    with pytest.raises(CorruptDatabaseError, match="tokenizer.json does not match the checksum"):
        RetrievalDatabase.open(copy, verify=False).chunk_text(0)
    unrecorded = {**manifest, "integrity": {**manifest["integrity"], "tokenizer": {}}}
    (copy / "manifest.json").write_text(json.dumps(seal(unrecorded)))
    with pytest.raises(CorruptDatabaseError, match="does not hold the vocabulary recorded"):
        RetrievalDatabase.open(copy, verify=False).chunk_text(0)
    with pytest.raises(CorruptDatabaseError, match="not a retrieval database"):
        RetrievalDatabase.open(tmp_path)


@pytest.mark.heavy
def test_empty_database_gives_empty_results(tiny_encoder, tmp_path):
    empty = build([], tmp_path / "empty", tiny_encoder)
    assert len(empty) == 0
    result = empty.search(["hello world"], k=K)  # k up to the database's own k is always served
    assert (result.chunk_ids == -1).all() and result.tokens.shape == (1, K, 2 * C) and result.texts == [[]]
    with pytest.raises(ValueError, match="k must be at most 2"):
        empty.search(["hello world"], k=K + 1)
    empty.add(["now a first document with some words in it"])
    assert len(empty) == 1 and (empty.knn == -1).all()  # no other document to be a neighbor


def test_bad_arguments_raise_value_errors(db, docs, tiny_encoder, tmp_path):
    for k in (0, -1):
        with pytest.raises(ValueError, match="k must be a positive integer"):
            db.search(["x"], k=k)
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        build(docs, tmp_path / "a", tiny_encoder, chunk_size=0)
    with pytest.raises(ValueError, match="num_neighbors"):
        build(docs, tmp_path / "b", tiny_encoder, num_neighbors=0)
    with pytest.raises(ValueError, match=f"seq_len must be a multiple of chunk_size {C} "):
        build(docs, tmp_path / "c", tiny_encoder, seq_len=70)
    with pytest.raises(ValueError, match="shard must look like"):
        build(docs, tmp_path / "d", tiny_encoder, stage="embed", shard="one of two")
    with pytest.raises(ValueError, match="token queries must be"):
        db.search(np.zeros((2, C + 1), dtype=np.int64), k=1)
    with pytest.raises(ValueError, match="token queries must be"):
        db.search(np.zeros(C, dtype=np.int64), k=1)
    with pytest.raises(ValueError, match="other settings"):
        build(docs, db.path, tiny_encoder, num_neighbors=3)
    assert build(docs, db.path, tiny_encoder).num_chunks == len(db)  # same settings: reopened, not rebuilt


def test_shard_rows_align_to_batches():
    from retlm.retrieval.shards import shard_rows

    bounds = [shard_rows(1000, (i, 3), align=32) for i in range(3)]
    assert bounds == [(0, 320), (320, 640), (640, 1000)]
    assert [shard_rows(10, (i, 4), align=8) for i in range(4)] == [(0, 0), (0, 0), (0, 0), (0, 10)]
    assert shard_rows(10, None, align=8) == (0, 10)


def reference_vectors(encoder, texts):
    """The tiny encoder run the plain HF way on the texts: its tokenizer with [CLS]/[SEP], masked mean."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(encoder), AutoModel.from_pretrained(encoder).eval()
    out = []
    for text in texts:  # one at a time: no padding at all
        batch = tokenizer(text, return_tensors="pt", truncation=True, max_length=128)
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state[0].double()
        out.append(torch.nn.functional.normalize(hidden.mean(0), dim=0).numpy())
    return np.stack(out)


def test_gpt2_chunks_are_embedded_from_their_text(db, tiny_encoder):
    ids = np.arange(0, len(db), 17)
    texts = [db.chunk_text(int(i)) for i in ids]
    np.testing.assert_allclose(db.embeddings[ids], reference_vectors(tiny_encoder, texts), atol=1e-5)
    # a query is embedded the same way, from the text of its LM tokens
    found = db.search(torch.from_numpy(np.asarray(db.chunks[ids, :C])), k=1)
    np.testing.assert_allclose(found.scores[:, 0], 1.0, atol=1e-5)
    assert found.doc_names[0] == [db.doc_name(int(found.doc_ids[0, 0]))]


def test_bert_database_feeds_the_wordpiece_ids_to_the_embedder(docs, tiny_encoder, tmp_path):
    bert = build(docs, tmp_path / "bert", tiny_encoder, tokenizer="bert")
    m = bert.manifest
    assert (m["pad_id"], m["eos_id"], m["tokenizer"]["vocab_size"]) == (0, 102, 30522)
    assert m["embedder_input"] == "tokens" and m["tokenizer"]["sha256"] == m["embedder_tokenizer"]["sha256"]
    assert bert.tokenizer("Hello world")["input_ids"] == [7592, 2088]  # no [CLS] / [SEP] for the LM
    ids = np.arange(0, len(bert), 13)
    # [CLS] ids [SEP], the seed's way: the same vectors as the plain HF encoding of those ids
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_encoder).eval()
    for i in ids:
        tokens = bert.chunk_tokens(int(i))
        with torch.no_grad():
            hidden = model(input_ids=torch.tensor([[101, *tokens.tolist(), 102]])).last_hidden_state[0]
        expected = torch.nn.functional.normalize(hidden.double().mean(0), dim=0).numpy()
        np.testing.assert_allclose(bert.embeddings[i], expected, atol=1e-5)


@pytest.mark.heavy
def test_over_long_chunk_texts_are_truncated_and_counted(tiny_encoder, tmp_path):
    # a line of 64 "=" is one GPT-2 token (23926) but 64 WordPiece tokens: a chunk of 16 is ~1000 WordPieces
    rule = "=" * 64
    docs = ["Title\n" + (rule + "\n") * 40, "short text about rivers and lakes " * 5]
    long = build(docs, tmp_path / "long", tiny_encoder)
    texts = [long.chunk_text(i) for i in range(len(long))]
    wordpieces = [len(long.embedder.wordpiece_ids([t])[0]) + 2 for t in texts]
    assert long.embedder.max_length == 128 and max(wordpieces) > 128
    assert long.manifest["embedder_truncated_chunks"] == sum(n > 128 for n in wordpieces) > 0
    # a truncated chunk is embedded from its first 126 WordPiece tokens, as the HF tokenizer truncates
    np.testing.assert_allclose(long.embeddings, reference_vectors(tiny_encoder, texts), atol=1e-5)
    long.add(["another\n" + (rule + "\n") * 20])
    assert long.manifest["embedder_truncated_chunks"] > sum(n > 128 for n in wordpieces)
