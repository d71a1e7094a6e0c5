"""Fixtures shared by several test modules."""

import pytest
from training_helpers import tiny_bert_embedder


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    """A random 2-layer, 32-wide BERT with the MiniLM tokenizer, saved as an HF folder: a fast embedder."""
    return str(tiny_bert_embedder(tmp_path_factory.mktemp("tiny-bert"), layers=2, max_positions=128))
