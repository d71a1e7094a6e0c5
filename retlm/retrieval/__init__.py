"""The retrieval database of RETRO: chunks, embeddings, a faiss index and precomputed neighbors.

Imports nothing from ``retlm.models`` or ``retlm.layers``. The names below load their modules on first
use, so that ``retlm.retrieval.config`` (the build options, which `retlm --help` reads) imports neither
torch nor faiss.
"""

import importlib
from typing import Any

_HOMES = {
    "RetrievalDatabase": "retlm.retrieval.database",
    "SearchResult": "retlm.retrieval.database",
    "BuildConfig": "retlm.retrieval.config",
    "BuildOptions": "retlm.retrieval.config",
    "Embedder": "retlm.retrieval.embedding",
    "DEFAULT_EMBEDDER": "retlm.tokenization",
    "tokenize": "retlm.retrieval.embedding",
    "bert_embed": "retlm.retrieval.embedding",
    "chunk_mask": "retlm.retrieval.chunking",
}

__all__ = list(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])
