"""The decoding state of a RETRO model (:class:`RetroCache`), continued in place call after call."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from retlm.layers.attention import KVCache
from retlm.layers.neighbors import NeighborState


@dataclass
class RetroCache(NeighborState):
    """Decoding state of a RETRO model (all rows of the batch share one column position): the
    neighbors' side (:class:`~retlm.layers.neighbors.NeighborState`: ``position``, ``context``,
    ``neighbors``, ``neighbor_mask``, ``padding``, ``neighbor_valid``) and, in ``layers``, per decoder
    layer the rotated self-attention keys and values (a growing ``KVCache``, ``(batch, heads, position,
    dim_head)``; transformer decoder), or the retention state (RetNet decoder: constant size), or None
    before the first call.
    """

    layers: list[Any] = field(default_factory=list)

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
        self.select_rows(indices)

    reorder_cache = batch_select_indices
