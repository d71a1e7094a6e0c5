"""``(seq, retrieved)`` items -> model inputs, with HF's label convention (-100 = ignored)."""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # targets with this value add nothing to the loss (torch cross_entropy default)


class RetroCollator:
    """Stacks ``(seq, retrieved)`` pairs into model inputs, with labels in HF's convention.

    Returns ``input_ids (batch, seq_len)``; ``labels (batch, seq_len)``, HF's unshifted labels (the model
    shifts them: ``labels[:, t]`` is the target of position ``t - 1``), ``IGNORE_INDEX`` where a token is
    not a target; ``shift_labels (batch, seq_len)``, the same targets already aligned with the logits
    (``shift_labels[:, t]`` is the target of position ``t``), which also hold the target of the last
    position (token ``seq_len + 1`` of the item, which ``labels`` cannot hold). Every model in retlm
    (and HF's causal LMs) computes its loss from ``shift_labels`` when given. And ``retrieved (batch,
    n_chunks, k, 2 * chunk_size)`` unless retrieval is switched off.

    A target is every token but padding. When padding is the end-of-document token (``eos_id ==
    pad_id``, GPT-2's), the first one of a row is the end of its document, a target like any other
    token; only the ones after it are padding.
    """

    def __init__(self, pad_id: int, retrieval: bool = True, eos_id: int | None = None):
        self.pad_id = pad_id
        self.retrieval = retrieval
        self.eos_id = eos_id

    def __call__(self, items: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        seq = torch.stack([torch.as_tensor(s) for s, _ in items]).long()
        targets = seq.clone()
        padding = targets == self.pad_id
        if self.eos_id is not None and self.eos_id == self.pad_id:
            padding[:, 1:] &= torch.cumsum(seq == self.eos_id, dim=1)[:, :-1] > 0  # an eos before it
        targets[padding] = IGNORE_INDEX
        targets[:, 0] = IGNORE_INDEX  # the first token is no position's target
        batch = {
            "input_ids": seq[:, :-1].contiguous(),
            "labels": targets[:, :-1].contiguous(),
            "shift_labels": targets[:, 1:].contiguous(),
        }
        if self.retrieval:
            batch["retrieved"] = torch.stack([torch.as_tensor(r) for _, r in items]).long()
        return batch
