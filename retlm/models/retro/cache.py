"""The decoding state of a RETRO model (:class:`RetroCache`), continued in place call after call."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from retlm.layers.attention import KVCache


@dataclass
class RetroCache:
    """Decoding state of a RETRO model (all rows of the batch share one column position).

    Attributes:
        position: number of tokens processed so far (absolute position of the next token).
        layers: per decoder layer, the rotated self-attention keys and values (a growing ``KVCache``,
            ``(batch, heads, position, dim_head)``; transformer decoder), or the retention state
            (RetNet decoder: constant size), or None before the first call.
        context: ``(batch, position % chunk_size, dec_dim)`` decoder states, at the first CCA layer, of
            the current incomplete chunk; the encoder is conditioned on them once the chunk completes.
        neighbors: ``(batch, k, r, dec_dim)`` encoded neighbors of the last completed chunk (read by the
            tokens up to the end of the following chunk), or None when that chunk had no retrieval.
        neighbor_mask: ``(batch, k, r)`` bool, True = real neighbor token.
        padding: ``(batch,)`` leading padding columns of each row when the prompt was left-padded, else
            None. Row ``i``'s token at column ``t`` then sits at position ``t - padding[i]``, its chunks
            are counted from its first real token, and (left-padded mode only) ``context`` holds the
            states of the last ``chunk_size - 1`` columns, ``neighbors`` each row's own last completed
            chunk's encoded neighbors, ``neighbor_valid (batch,)`` whether that chunk had retrieval.
    """

    position: int = 0
    layers: list[Any] = field(default_factory=list)
    context: Tensor | None = None
    neighbors: Tensor | None = None
    neighbor_mask: Tensor | None = None
    padding: Tensor | None = None
    neighbor_valid: Tensor | None = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.position

    def batch_size(self) -> int | None:
        """The number of rows the cache holds, or None while it holds no tensor yet."""

        def rows(value: Any) -> int | None:
            if isinstance(value, KVCache):
                return value.keys.shape[0]
            if isinstance(value, Tensor):
                return value.shape[0]
            if isinstance(value, (tuple, list)):
                return next((n for n in map(rows, value) if n is not None), None)
            return None

        return rows([self.context, self.neighbors, self.padding, self.layers])

    def batch_select_indices(self, indices: Tensor) -> None:
        """Keep (or reorder, e.g. for beam search) the batch rows ``indices``."""

        def select(value: Any) -> Any:
            if isinstance(value, KVCache):  # moves the indices to its own device
                return value.index_select(0, indices)
            if isinstance(value, Tensor):
                return value.index_select(0, indices.to(value.device))
            if isinstance(value, (tuple, list)):
                return type(value)(select(v) for v in value)
            return value

        self.layers = [select(state) for state in self.layers]
        self.context, self.neighbors, self.neighbor_mask = (
            select(self.context),
            select(self.neighbors),
            select(self.neighbor_mask),
        )
        self.padding, self.neighbor_valid = select(self.padding), select(self.neighbor_valid)

    reorder_cache = batch_select_indices
