"""Retrieval-augmented generation from text, two ways.

- RETRO (:func:`generate_text`): tokenize a prompt with the database's tokenizer, generate with retrieval
  at every chunk boundary through chunked cross-attention, and report the neighbors used, as text. The
  token-level loop is :func:`retlm.models.retrieval_generation.generate_with_retrieval`; this layer adds the
  text on both ends (the database and the model share one tokenizer, the database's LM tokenizer).
- In-context, for any frozen causal LM (:func:`generate_in_context`, In-Context RALM): every ``stride``
  tokens, the neighbors' text goes in front of the context, re-tokenized by the LM's own tokenizer
  (:mod:`retlm.generation.in_context`).
"""

from __future__ import annotations

from retlm.generation.in_context import (
    InContextRetrieval,
    InContextText,
    generate_in_context,
    search_neighbors,
)
from retlm.generation.neighbors import NeighborText
from retlm.generation.text import GeneratedText, generate_text, print_generation, print_neighbors
from retlm.models.retrieval_generation import ChunkRetrieval, RetrievalGenerateOutput, generate_with_retrieval
from retlm.utils import deprecated_aliases

__getattr__ = deprecated_aliases(
    __name__, {"NeighbourText": "NeighborText", "print_neighbours": "print_neighbors"}
)

__all__ = [
    "ChunkRetrieval",
    "GeneratedText",
    "InContextRetrieval",
    "InContextText",
    "NeighborText",
    "RetrievalGenerateOutput",
    "generate_in_context",
    "generate_text",
    "generate_with_retrieval",
    "print_generation",
    "print_neighbors",
    "search_neighbors",
]
