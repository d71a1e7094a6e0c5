"""retro-pytorch's interface to RETRO: :class:`RETRO`, built from keywords and called as
``forward(seq, retrieved=None, return_loss=False)``."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from retlm.compat import CausalLMOutputWithCache
from retlm.models.retro.configuration_retro import BERT_CASED_VOCAB_SIZE, RetroConfig
from retlm.models.retro.modeling_retro import RetroForCausalLM


class RETRO(RetroForCausalLM):
    """The seed's interface: ``RETRO(chunk_size=..., max_seq_len=..., enc_dim=..., ...)`` (any
    :class:`RetroConfig` argument; ``num_tokens`` defaults to retro-pytorch's 28996) and
    ``forward(seq, retrieved=None, return_loss=False)``.

    ``seq``: ``(batch, n)``, or ``(batch, n + 1)`` when ``return_loss`` (split into inputs and labels;
    ``pad_id`` labels are ignored). ``retrieved``: ``(batch, n // chunk_size, k, 2 * chunk_size)`` or None.
    Returns logits ``(batch, n, num_tokens)`` or the scalar loss. Called with HF keywords
    (``input_ids=...``) it behaves as :class:`RetroForCausalLM`.
    """

    def __init__(self, config: RetroConfig | None = None, **kwargs: Any) -> None:
        if config is None:  # retro-pytorch's default vocabulary (bert-base-cased), not RetroConfig's
            config = RetroConfig(**{"num_tokens": BERT_CASED_VOCAB_SIZE, **kwargs})
        elif kwargs:
            raise ValueError(
                f"pass either a RetroConfig or keyword arguments, not both (got {sorted(kwargs)})"
            )
        super().__init__(config)

    def forward(  # type: ignore[override]
        self,
        seq: Tensor | None = None,
        retrieved: Tensor | None = None,
        return_loss: bool = False,
        **kwargs: Any,
    ) -> Tensor | CausalLMOutputWithCache | tuple:
        if seq is None or kwargs:
            return super().forward(input_ids=kwargs.pop("input_ids", seq), retrieved=retrieved, **kwargs)
        if not return_loss:
            return super().forward(input_ids=seq, retrieved=retrieved).logits
        # retro-pytorch's loss is the model's, with its targets mapped onto HF's: pad_id targets are ignored
        targets = seq[:, 1:].long().masked_fill(seq[:, 1:] == self.config.pad_id, -100)
        return super().forward(input_ids=seq[:, :-1], retrieved=retrieved, shift_labels=targets).loss
