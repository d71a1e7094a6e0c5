"""The transformers ``Cache`` answers that retlm's caches share (``RetNetCache``, ``RetroCache``)."""

from __future__ import annotations

from transformers.cache_utils import Cache


class StateCache(Cache):
    """An HF ``Cache`` whose layers hold a decoding state of fixed size instead of per-token keys and
    values (RetNet's retention state; RETRO's, beside encoded neighbors that cannot be rolled back): it
    has no maximum length, is neither compiled nor cropped, and is initialised once it has seen a column
    (:meth:`get_seq_length`, which each subclass defines)."""

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return self.get_seq_length() > 0
