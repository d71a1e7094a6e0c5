"""Embed backends: the ONNX paths against the float32 torch reference on real text (the bundled Python
documentation), neighbors that agree with the reference's, the export cached once and checked, and a
database whose queries would go through another backend than its chunks did."""

import io
import warnings

import numpy as np
import pytest

from retlm import RetrievalDatabase
from retlm.compat import FAST_EMBED_BACKENDS_TRACE
from retlm.demo.corpus import pydoc_topics
from retlm.errors import OptionError
from retlm.retrieval import encoders
from retlm.retrieval.chunking import write_chunks
from retlm.retrieval.embedding import Embedder, chunk_texts
from retlm.retrieval.sources import iter_documents
from retlm.tokenization import load_tokenizer

needs_trace = pytest.mark.skipif(
    not FAST_EMBED_BACKENDS_TRACE, reason="the fast embed backends need transformers>=5.24 (retlm.compat)"
)


def test_the_default_backend_follows_what_the_installed_transformers_can_export():
    if FAST_EMBED_BACKENDS_TRACE:
        assert encoders.default_backend("cpu") == encoders.CPU_DEFAULT_BACKEND
        return
    assert encoders.default_backend("cpu") == "torch"
    with pytest.raises(OptionError, match="needs transformers>="):
        encoders.load_encoder("all-MiniLM-L6-v2", "openvino", "cpu")


# Stated agreement with the float32 torch vectors (cosine of each vector):
MIN_COSINE = {"onnx": 0.99999, "openvino": 0.99999, "onnx-int8": 0.98}


@pytest.fixture(autouse=True)
def _own_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("RETLM_HOME", str(tmp_path_factory.getbasetemp() / "retlm-home"))


@pytest.fixture(scope="module")
def corpus():
    """GPT-2 chunks (32 tokens) of the first 30 pydoc topics: their texts and document ids."""
    lm = load_tokenizer("gpt2")
    files = [io.BytesIO() for _ in range(3)]
    docs = iter_documents([t[:2000] for _, t in list(pydoc_topics())[:30]])
    write_chunks(docs, lm, chunk_size=32, seq_len=64, pad_id=lm.pad_token_id, eos_id=lm.eos_token_id,
                 chunks_file=files[0], doc_ids_file=files[1], seqs_file=files[2])  # fmt: skip
    chunks = np.frombuffer(files[0].getvalue(), dtype="<i4").reshape(-1, 33)
    texts = chunk_texts(lm, chunks[:, :32], lm.pad_token_id)
    return texts, np.frombuffer(files[1].getvalue(), dtype="<i4")


def top2(vectors, doc_ids):
    sims = vectors.astype(np.float64) @ vectors.astype(np.float64).T
    sims[doc_ids[:, None] == doc_ids[None, :]] = -np.inf
    return np.argsort(-sims, axis=1, kind="stable")[:, :2]


def jaccard(a, b):
    return float(np.mean([len(set(x) & set(y)) / len(set(x) | set(y)) for x, y in zip(a, b, strict=True)]))


@needs_trace
@pytest.mark.parametrize("backend", ["openvino", "onnx", "onnx-int8"])
@pytest.mark.heavy
def test_fast_backend_vectors_and_neighbors_agree_with_torch(backend, corpus, tiny_encoder):
    texts, doc_ids = corpus
    reference = Embedder(tiny_encoder, backend="torch").embed_texts(texts)
    fast = Embedder(tiny_encoder, backend=backend).embed_texts(texts)
    cosine = (reference * fast).sum(1)
    assert cosine.min() >= MIN_COSINE[backend], cosine.min()
    assert jaccard(top2(fast, doc_ids), top2(reference, doc_ids)) >= 0.9


@needs_trace
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["openvino", "onnx"])
def test_minilm_fast_backends_agree_with_torch_on_real_text(backend, corpus):
    """The real all-MiniLM-L6-v2 (exported once per cache): vectors and top-2 neighbor sets, against the
    float32 torch model."""
    texts, doc_ids = corpus
    texts, doc_ids = texts[:300], doc_ids[:300]
    reference = Embedder(backend="torch").embed_texts(texts)
    fast = Embedder(backend=backend).embed_texts(texts)
    assert (reference * fast).sum(1).min() >= MIN_COSINE[backend]
    assert jaccard(top2(fast, doc_ids), top2(reference, doc_ids)) >= 0.99


@needs_trace
def test_the_export_is_cached_checked_and_rebuilt_when_corrupted(tiny_encoder):
    first = encoders.cached_export(tiny_encoder, "onnx")
    folder = first.parent
    assert folder.parent.parent.parent == encoders.retlm_home()  # RETLM_HOME/embedders/<model>/<backend>
    mtime = first.stat().st_mtime_ns
    assert encoders.cached_export(tiny_encoder, "onnx").stat().st_mtime_ns == mtime  # reused, not redone
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left
    data = bytearray(first.read_bytes())
    data[len(data) // 2] ^= 0xFF
    first.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="rebuilding the cached onnx export"):
        again = encoders.cached_export(tiny_encoder, "onnx")
    assert encoders.verify_folder(again.parent, [encoders.MODEL_FILE])


@needs_trace
@pytest.mark.heavy
def test_database_records_its_backend_and_a_mismatch_is_caught(tiny_encoder, tmp_path):
    docs = [text[:800] for _, text in list(pydoc_topics())[:6]]
    options = dict(chunk_size=16, seq_len=64, embedder=tiny_encoder, progress=False)
    db = RetrievalDatabase.build(docs, tmp_path / "db", **options)  # the default on a CPU
    assert db.manifest["embed_backend"] == "openvino" and db.embedder.backend == "openvino"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RetrievalDatabase.open(db.path, embed_backend="openvino")  # the same: no warning
    with pytest.warns(UserWarning, match="embedded with embed backend 'openvino'.*'torch'"):
        other = RetrievalDatabase.open(db.path, embed_backend="torch")
    assert other.embedder.backend == "torch"
    query = ["for loops"]
    np.testing.assert_array_equal(other.search(query, 2).chunk_ids, db.search(query, 2).chunk_ids)
    with pytest.raises(OptionError, match="embed backend must be one of"):
        RetrievalDatabase.open(db.path, embed_backend="tensorrt")
    with pytest.raises(ValueError, match="embed_backend: 'openvino' -> 'torch'"):  # resuming with another
        RetrievalDatabase.build(docs, tmp_path / "db", embed_backend="torch", **options)
