"""Training and generation read one neighbor layout (issue #11's bug).

The dataset (training, evaluation) and ``RetrievalDatabase.search`` (generation) must turn the same
chunk ids into the same neighbor (+ continuation) tokens. Two databases where the old dataset rule
("blank the continuation when the row holds EOS anywhere, the extra column included") disagreed with
the database's rule ("keep it when the next chunk is of the same document"):

- a real built database whose documents end exactly on a chunk boundary, so each document's EOS starts
  a row of its own and sits in the extra column of the row before;
- a database whose text holds the end-of-document id inside a document (laid out by the real chunk
  writer, ``retlm.retrieval.chunking.chunk_document``).
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from retlm.data import RETRODataset
from retlm.retrieval import RetrievalDatabase
from retlm.retrieval.chunking import chunk_document
from retlm.retrieval.format import FORMAT_VERSION
from retlm.tokenization import load_tokenizer

C, SEQ_LEN = 4, 8


def dataset_layout(dataset: RETRODataset) -> dict[int, np.ndarray]:
    """chunk id -> ``(2 * chunk_size,)`` tokens, as the dataset's items feed them."""
    store, found = dataset.store, {}
    for i in range(len(dataset)):
        _, retrieved = dataset[i]
        begin = int(store.seqs[i])
        rows = np.arange(begin, min(begin + dataset.seq_num_chunks, dataset.num_chunks))
        ids = np.asarray(store.knn[rows])[:, : retrieved.shape[1]]
        for u, j in zip(*np.nonzero(ids >= 0), strict=True):
            found[int(ids[u, j])] = retrieved[u, j].numpy()
    return found


def boundary_texts(tokenizer) -> list[str]:
    """Texts whose tokens are an exact multiple of the chunk size."""
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()
    texts = []
    for d in range(6):
        n, i = C * (2 + d % 3), 0
        text = words[d]
        while (count := len(tokenizer(text, add_special_tokens=False)["input_ids"])) < n or count % C:
            i += 1
            text += " " + words[(d + i) % len(words)]
        texts.append(text)
    return texts


@pytest.fixture(scope="module")
def boundary_db(tiny_encoder, tmp_path_factory):
    # The seed's WordPiece LM tokenizer (pad 0, EOS [SEP]): with GPT-2's, padding is the EOS id, so the
    # continuation [EOS, pad, ...] reads the same as a dropped one and the two rules cannot be told apart.
    path = tmp_path_factory.mktemp("boundary") / "db"
    texts = boundary_texts(load_tokenizer("bert", embedder=tiny_encoder))
    return RetrievalDatabase.build(
        texts,
        path,
        chunk_size=C,
        seq_len=SEQ_LEN,
        num_neighbors=2,
        tokenizer="bert",
        embedder=tiny_encoder,
        batch_size=64,
        progress=False,
    )


def test_documents_ending_on_a_chunk_boundary(boundary_db):
    db = boundary_db
    chunks, doc_ids = np.asarray(db.chunks), np.asarray(db.doc_ids)
    # the case under test: the row before a document's last holds EOS only in its extra column
    eos_row = (chunks[:-1, C] == db.eos_id) & (doc_ids[1:] == doc_ids[:-1]) & (chunks[1:, 0] == db.eos_id)
    assert eos_row.sum() == db.num_docs
    for dataset in (RETRODataset.from_database(db), RETRODataset.from_database(db.path)):
        layout = dataset_layout(dataset)
        assert any(eos_row[i] for i in layout if i < len(eos_row))
        ids = np.fromiter(layout, dtype=np.int64)
        np.testing.assert_array_equal(np.stack([layout[i] for i in ids]), db.retrieved_tokens(ids))
    # DataLoader workers get a pickled copy, which reopens the same files
    dataset = RETRODataset.from_database(db)
    copied = pickle.loads(pickle.dumps(dataset))
    assert all(torch.equal(a, b) for a, b in zip(copied[1], dataset[1], strict=True))
    # generation's path: search with completed chunks, as retrieval generation does
    result = db.search(np.asarray(chunks[:, :C]), k=2)
    layout = dataset_layout(RETRODataset.from_database(db))
    shared = [
        (r, j)
        for r, j in zip(*np.nonzero(result.chunk_ids >= 0), strict=True)
        if int(result.chunk_ids[r, j]) in layout
    ]
    assert any(
        eos_row[int(result.chunk_ids[r, j])] for r, j in shared if result.chunk_ids[r, j] < len(eos_row)
    )
    for r, j in shared:
        np.testing.assert_array_equal(result.tokens[r, j], layout[int(result.chunk_ids[r, j])])


def write_database(path, docs: list[np.ndarray], *, pad_id: int, eos_id: int) -> RetrievalDatabase:
    """The files of a database (embeddings zero: nothing here searches) with the real chunk writer."""
    rows, doc_ids = [], []
    for d, tokens in enumerate(docs):
        for block in chunk_document([np.append(tokens, eos_id).astype(np.int32)], C, pad_id):
            rows += list(block)
            doc_ids += [d] * len(block)
    chunks = np.stack(rows).astype(np.int32)
    n = len(chunks)
    knn = np.stack([(np.arange(n) + 3) % n, (np.arange(n) * 5 + 1) % n], axis=1).astype(np.int32)
    knn[np.asarray(doc_ids)[knn[:, 0]] == np.asarray(doc_ids), 0] = -1
    seqs = np.arange(0, n, SEQ_LEN // C, dtype=np.int32)
    path.mkdir()
    for name, array in (
        ("chunks", chunks),
        ("doc_ids", np.asarray(doc_ids, np.int32)),
        ("seqs", seqs),
        ("knn", knn),
        ("embeddings", np.zeros((n, 4), np.float16)),
    ):
        array.tofile(path / f"{name}.dat")
    manifest = dict(
        format_version=FORMAT_VERSION,
        chunk_size=C,
        num_chunks=n,
        num_neighbors=2,
        seq_len=SEQ_LEN,
        num_seqs=len(seqs),
        num_docs=len(docs),
        pad_id=pad_id,
        eos_id=eos_id,
        embedding_dtype="float16",
        embedding_dim=4,
    )
    (path / "manifest.json").write_text(json.dumps(manifest))
    return RetrievalDatabase(path, manifest)


def test_text_holding_the_end_of_document_id(tmp_path):
    eos, pad = 50256, 50256  # GPT-2's: padding is the end-of-document token
    rng = np.random.default_rng(0)
    docs = [rng.integers(10, 1000, size=n) for n in (13, 9, 22, 7, 16)]
    docs[0][5] = docs[2][3] = docs[2][12] = eos  # the text itself holds the id, mid-document
    db = write_database(tmp_path / "db", docs, pad_id=pad, eos_id=eos)
    chunks, doc_ids = np.asarray(db.chunks), np.asarray(db.doc_ids)
    mid_document = (chunks[:-1, :C] == eos).any(1) & (doc_ids[1:] == doc_ids[:-1])
    assert mid_document.sum() >= 3
    for dataset in (RETRODataset.from_database(db), RETRODataset.from_database(db.path)):
        layout = dataset_layout(dataset)
        assert any(mid_document[i] for i in layout if i < len(mid_document))
        ids = np.fromiter(layout, dtype=np.int64)
        np.testing.assert_array_equal(np.stack([layout[i] for i in ids]), db.retrieved_tokens(ids))
        for i in ids[ids < len(mid_document)][mid_document[ids[ids < len(mid_document)]]]:
            np.testing.assert_array_equal(layout[i][C:], chunks[i + 1, :C])  # continuation kept
