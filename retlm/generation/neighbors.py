"""A neighbor as generation reports it: which database chunk, from which document, how close, and its text."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class NeighborText:
    """One neighbor: database chunk and document ids, cosine score, text (the chunk, or the chunk and its
    continuation where the caller says so), and the name of its source document."""

    chunk_id: int
    doc_id: int
    score: float
    text: str
    doc_name: str = ""

    @property
    def source(self) -> str:
        """How printouts name the neighbor's document: its name, or ``doc N`` if the database has none."""
        return self.doc_name or f"doc {self.doc_id}"
