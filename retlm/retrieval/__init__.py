"""The retrieval database of RETRO: chunks, embeddings, a faiss index and precomputed neighbors.

Imports nothing from ``retlm.models`` or ``retlm.layers``.
"""

from retlm.retrieval.chunking import chunk_mask
from retlm.retrieval.config import BuildConfig
from retlm.retrieval.database import RetrievalDatabase, SearchResult
from retlm.retrieval.embedding import DEFAULT_EMBEDDER, Embedder, bert_embed, tokenize

__all__ = [
    "RetrievalDatabase",
    "SearchResult",
    "BuildConfig",
    "Embedder",
    "DEFAULT_EMBEDDER",
    "tokenize",
    "bert_embed",
    "chunk_mask",
]
