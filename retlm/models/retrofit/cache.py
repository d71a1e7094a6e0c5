"""RetroFitCache: a RETRO-fitted model's decoding state, as a transformers ``Cache``: the base's own cache,
continued by the base as it is, and the adapter's state (the neighbors' side of RETRO's decoding)."""

from __future__ import annotations

from typing import Any

from torch import Tensor
from transformers.cache_utils import Cache

from retlm.layers.neighbors import NeighborState


class RetroFitCache(Cache):
    """The decoding state of :class:`~retlm.models.retrofit.RetroFitForCausalLM`.

    Args:
        base_cache: the base's own cache (a ``DynamicCache`` for GPT-2 and Llama, a ``RetNetCache``, a
            ``RetroCache``), passed to the base and continued by it.
        neighbors: the adapter's :class:`~retlm.layers.neighbors.NeighborState` (position, the states of
            the current chunk, the encoded neighbors of the last completed one).
    """

    def __init__(self, base_cache: Any, neighbors: NeighborState) -> None:
        super().__init__(layers=[])
        self.base_cache = base_cache
        self.neighbors = neighbors

    def __repr__(self) -> str:
        return (
            f"RetroFitCache(base_cache={type(self.base_cache).__name__}, position={self.neighbors.position})"
        )

    def __len__(self) -> int:
        return len(self.base_cache) if hasattr(self.base_cache, "__len__") else 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens processed so far."""
        return self.neighbors.position

    def batch_select_indices(self, indices: Tensor) -> None:
        """Keep (or reorder) the batch rows ``indices``, in the base's cache and the adapter's state."""
        self.base_cache.batch_select_indices(indices)
        self.neighbors.select_rows(indices)

    def reorder_cache(self, beam_idx: Tensor) -> None:
        self.batch_select_indices(beam_idx)

    def reset(self) -> None:
        self.base_cache.reset()
        self.neighbors = NeighborState()

    def crop(self, max_length: int) -> None:
        raise ValueError("a RETRO-fit cache cannot be cropped: its encoded neighbors cannot be rolled back")
