"""The transformers ``Cache`` answers that retlm's caches share (``RetNetCache``, ``RetroCache``), and
those of their layers."""

from __future__ import annotations

from typing import Any

from transformers.cache_utils import Cache


class StateCacheLayer:
    """One layer of a :class:`StateCache`: its ``state`` (None before the first update), which cannot be
    cropped (``crop_refusal`` says why), has no maximum length and is never compiled."""

    is_compileable = False
    is_croppable = False
    is_sliding = False
    supports_early_init = False
    crop_refusal = "this cache cannot be cropped"

    def __init__(self) -> None:
        self.state: Any = None

    @property
    def is_initialized(self) -> bool:
        return self.state is not None

    def reset(self) -> None:
        self.state = None

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError(self.crop_refusal)

    def get_max_length(self) -> int:
        return -1


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
