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
from training_helpers import tiny_bert_embedder

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
