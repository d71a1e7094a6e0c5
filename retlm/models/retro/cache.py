"""The decoding state of a RETRO model (:class:`RetroCache`, a transformers ``Cache``), continued in place
call after call."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from retlm.layers.attention import KVCache
from retlm.layers.neighbors import NeighborState
from retlm.models.state_cache import StateCache, StateCacheLayer


def _rows(value: Any) -> int | None:
    """The batch size of the first tensor (or ``KVCache``) in ``value``, a possibly nested sequence."""
    if isinstance(value, KVCache):
        return value.keys.shape[0]
    if isinstance(value, Tensor):
        return value.shape[0]
    if isinstance(value, (tuple, list)):
        return next((n for n in map(_rows, value) if n is not None), None)
    return None


def _select(value: Any, indices: Tensor) -> Any:
    """``value`` (a tensor, ``KVCache`` or a tuple of them) with only the batch rows ``indices``."""
    if isinstance(value, KVCache):  # moves the indices to its own device
        return value.index_select(0, indices)
    if isinstance(value, Tensor):
        return value.index_select(0, indices.to(value.device))
    if isinstance(value, (tuple, list)):
        return type(value)(_select(v, indices) for v in value)
    return value


class RetroCacheLayer(StateCacheLayer):
    """One decoder layer's state: the rotated self-attention keys and values (a growing ``KVCache``,
    ``(batch, heads, position, dim_head)``; transformer decoder), or the retention state (RetNet decoder:
    constant size), or None before the first call."""

    crop_refusal = "a RETRO cache cannot be cropped: its encoded neighbors cannot be rolled back"

    def __repr__(self) -> str:
        return f"RetroCacheLayer({type(self.state).__name__})"

    def batch_select_indices(self, indices: Tensor) -> None:
        self.state = _select(self.state, indices)

    reorder_cache = batch_select_indices


class RetroCache(NeighborState, StateCache):
    """Decoding state of a RETRO model (all rows of the batch share one column position): the neighbors'
    side (:class:`~retlm.layers.neighbors.NeighborState`: ``position``, ``context``, ``neighbors``,
    ``neighbor_mask``, ``padding``, ``neighbor_valid``) and, in ``layers``, one :class:`RetroCacheLayer`
    per decoder layer (empty until the first call).

    Args:
        num_layers: number of decoder layers (0: filled by the model's first call).
    """

    def __init__(self, num_layers: int = 0) -> None:
        NeighborState.__init__(self)
        StateCache.__init__(self, layers=[RetroCacheLayer() for _ in range(num_layers)])

    def __repr__(self) -> str:
        return f"RetroCache(layers={len(self.layers)}, position={self.position})"

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.position

    @property
    def batch_size(self) -> int:
        """The number of rows the cache holds, or -1 while it holds no tensor yet."""
        rows = _rows([self.context, self.neighbors, self.padding, [layer.state for layer in self.layers]])
        return -1 if rows is None else rows

    def batch_select_indices(self, indices: Tensor) -> None:
        """Keep (or reorder, e.g. for beam search) the batch rows ``indices``."""
        for layer in self.layers:
            layer.batch_select_indices(indices)
        self.select_rows(indices)

    def reorder_cache(self, beam_idx: Tensor) -> None:
        self.batch_select_indices(beam_idx)

    def reset(self) -> None:
        NeighborState.__init__(self)
        for layer in self.layers:
            layer.reset()

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("a RETRO cache cannot be cropped: its encoded neighbors cannot be rolled back")
