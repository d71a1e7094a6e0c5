"""Fixtures shared by several test modules, and a deterministic suite.

Every test starts from the same random state and hypothesis replays the same examples on every run,
so CI cannot fail on an unlucky draw. `HYPOTHESIS_PROFILE=explore pytest ...` draws fresh examples
when hunting for new counterexamples.
"""

import os
import random

import numpy as np
import pytest
import torch
from hypothesis import settings
from training_helpers import build_real_database, open_twin_database, tiny_bert_embedder, write_twin_database

settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    """A random 2-layer, 32-wide BERT with the MiniLM tokenizer, saved as an HF folder: a fast embedder."""
    return str(tiny_bert_embedder(tmp_path_factory.mktemp("tiny-bert"), layers=2, max_positions=128))


@pytest.fixture(scope="session")
def twin_db(tmp_path_factory):
    """The synthetic twin database (``training_helpers.write_twin_database``'s defaults: 12 pairs of
    documents, chunks of 8, sequences of 32, a 64-token toy vocabulary), opened as training reads it.
    Shared by every test that only reads it: a test that changes it writes its own."""
    return open_twin_database(write_twin_database(tmp_path_factory.mktemp("twin") / "db"))


@pytest.fixture(scope="session")
def real_db(tmp_path_factory):
    """A real ``RetrievalDatabase`` of 40 Python documentation topics (GPT-2 chunks of 8, sequences of 32,
    a tiny random embedder, exact index; ``training_helpers.build_real_database``), shared read-only."""
    root = tmp_path_factory.mktemp("real")
    return build_real_database(root / "db", tiny_bert_embedder(root / "embedder"))


@pytest.fixture(scope="session")
def robust(tmp_path_factory):
    """A real database built from a folder of 10 pydoc topics (tiny random BERT embedder, chunk 16) and a
    RETRO trained 2 steps on it: the clean state the robustness tests and the fuzz suite corrupt."""
    from types import SimpleNamespace

    from robust_helpers import build_db, train_tiny, write_corpus

    root = tmp_path_factory.mktemp("robust")
    embedder = str(tiny_bert_embedder(root / "embedder", layers=1, max_positions=64))
    corpus = write_corpus(root / "corpus")
    db = build_db(corpus, root / "db", embedder)
    model = train_tiny(db, root / "run")
    return SimpleNamespace(root=root, embedder=embedder, corpus=corpus, db=db.path, model=model)
