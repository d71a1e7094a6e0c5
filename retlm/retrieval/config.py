"""``BuildConfig``: every option of a database build that changes its content (recorded in the
manifest's ``build`` entry; a resumed build must be given the same)."""

from __future__ import annotations

from dataclasses import dataclass

from retlm.retrieval.chunking import validate_sizes
from retlm.retrieval.embedding import DEFAULT_EMBEDDER
from retlm.retrieval.encoders import EMBED_BACKENDS
from retlm.retrieval.format import EMBEDDING_DTYPES, POOLINGS, RETRIEVERS
from retlm.retrieval.index import EXACT_THRESHOLD
from retlm.tokenization import GPT2


@dataclass(frozen=True)
class BuildConfig:
    """Every build option that changes the database's content."""

    chunk_size: int = 64
    num_neighbors: int = 2
    seq_len: int = 512
    tokenizer: str = GPT2  # the LM tokenizer: "gpt2", "bert" (the embedder's WordPiece) or a folder
    embedder: str = DEFAULT_EMBEDDER
    pooling: str = "mean"
    embedding_dtype: str = "float16"
    batch_size: int = 128
    index_factory: str | None = None
    exact_threshold: int = EXACT_THRESHOLD
    target_recall: float = 0.95
    extra_neighbors: int = 10
    retriever: str = "dense"
    embed_backend: str = "torch"

    def validate(self) -> None:
        validate_sizes(self.chunk_size, self.seq_len)
        if not isinstance(self.tokenizer, str) or not self.tokenizer:
            raise ValueError(
                f"tokenizer must be 'gpt2', 'bert' or a tokenizer folder, got {self.tokenizer!r}"
            )
        if not isinstance(self.num_neighbors, int) or self.num_neighbors <= 0:
            raise ValueError(f"num_neighbors must be a positive integer, got {self.num_neighbors!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.embedding_dtype not in EMBEDDING_DTYPES:
            raise ValueError(
                f"embedding_dtype must be one of {EMBEDDING_DTYPES}, got {self.embedding_dtype!r}"
            )
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size!r}")
        if not 0 < self.target_recall <= 1:
            raise ValueError(f"target_recall must be in (0, 1], got {self.target_recall!r}")
        if self.extra_neighbors < 0:
            raise ValueError(f"extra_neighbors must be >= 0, got {self.extra_neighbors!r}")
        if self.retriever not in RETRIEVERS:
            raise ValueError(f"retriever must be one of {RETRIEVERS}, got {str(self.retriever)[:40]!r}")
        if self.embed_backend not in EMBED_BACKENDS:
            raise ValueError(
                f"embed_backend must be one of {EMBED_BACKENDS}, got {str(self.embed_backend)[:40]!r}"
            )
