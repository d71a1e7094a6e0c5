"""RetNetCache: the recurrent state of every layer plus each row's position, as a transformers `Cache`.

Unlike a KV cache its size does not grow with the context: per layer it holds
``kv (batch, heads, key_dim, head_value_dim)`` and ``z (batch, heads, key_dim)`` (see
:mod:`retlm.ops.retention`), in float32 (float64 for float64 models). Beside them it tracks
``position_offset (batch,)``, the absolute position the next token of each row will take (left-padded
rows lag behind by their padding), and ``seen_tokens``, the number of input columns consumed so far,
which is what `GenerationMixin` asks for through :meth:`get_seq_length`.

A state written by any retention mode can be continued by any other mode.
"""

from __future__ import annotations

import torch
from torch import Tensor

from retlm.models.state_cache import StateCache, StateCacheLayer
from retlm.ops.retention import RetentionState


class RetentionCacheLayer(StateCacheLayer):
    """One layer's ``(kv, z)`` retention state (None before the first update)."""

    crop_refusal = "a RetNet state cannot be cropped: it keeps no per-token history to roll back"
    state: RetentionState | None

    def __repr__(self) -> str:
        shapes = None if self.state is None else [tuple(t.shape) for t in self.state]
        return f"RetentionCacheLayer({shapes})"

    def _map(self, fn) -> None:
        if self.state is not None:
            self.state = tuple(fn(t) for t in self.state)

    def reorder_cache(self, beam_idx: Tensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._map(lambda t: t[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def offload(self) -> None:
        self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:  # states are small; nothing is offloaded ahead of time
        pass


class RetNetCache(StateCache):
    """Per-layer retention states + per-row position offsets.

    Args:
        num_layers: number of RetNet blocks whose state this cache carries.
    """

    def __init__(self, num_layers: int) -> None:
        super().__init__(layers=[RetentionCacheLayer() for _ in range(num_layers)])
        self.position_offset: Tensor | None = None
        self.seen_tokens = 0

    def __repr__(self) -> str:
        return f"RetNetCache(layers={len(self.layers)}, seen_tokens={self.seen_tokens})"

    # -- what the model reads and writes ---------------------------------------------------------
    def get_state(self, layer_idx: int) -> RetentionState | None:
        """``(kv, z)`` of layer ``layer_idx``, or None when nothing was seen yet."""
        return self.layers[layer_idx].state

    def set_state(self, layer_idx: int, state: RetentionState) -> None:
        self.layers[layer_idx].state = state

    def advance(self, position_offset: Tensor, num_tokens: int) -> None:
        """Record that ``num_tokens`` input columns were consumed; ``position_offset (batch,)`` is the
        absolute position of each row's next token."""
        self.position_offset = position_offset
        self.seen_tokens += num_tokens

    # -- transformers Cache API ------------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Number of input columns (padding included) already folded into the state."""
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return query_length, 0

    @property
    def batch_size(self) -> int:
        return -1 if self.position_offset is None else self.position_offset.shape[0]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.position_offset is not None:
            beam_idx = beam_idx.to(self.position_offset.device)
            self.position_offset = self.position_offset.index_select(0, beam_idx)

    def batch_select_indices(self, indices: Tensor) -> None:
        super().batch_select_indices(indices)
        if self.position_offset is not None:
            self.position_offset = self.position_offset[indices]

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.position_offset is not None:
            self.position_offset = self.position_offset.repeat_interleave(repeats, dim=0)

    def reset(self) -> None:
        super().reset()
        self.position_offset = None
        self.seen_tokens = 0

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("a RetNetCache cannot be cropped: it keeps no per-token history to roll back")
