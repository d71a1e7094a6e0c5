"""The one padding policy of retlm's models: which ``attention_mask (batch, seq)`` (1 = token, 0 =
padding) each accepts, and what a padded row's positions are.

- RETRO (:func:`left_padding`): strict left padding (zeros, then ones), with right padding accepted for a
  full forward without a cache. A left-padded row's positions, chunks and neighbors are counted from its
  first real token, so it computes what the same prompt computes alone (:class:`RowPadding`; the
  neighbors side: :func:`~retlm.layers.neighbors.row_neighbors_for_call`).
- RETRO-fitting (:func:`check_right_padding`): right padding only while neighbors are read (its rows
  share one position); any mask otherwise, as its base takes it.
- RetNet (:func:`leading_padding`): left and right padding; a row's positions start at its first real
  token.

Every policy refuses a hole (a zero between two ones).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def _holes(mask: Tensor) -> Tensor:
    """``(batch,)``: the row has a zero between two ones."""
    seen = mask.long().cumsum(-1) > 0
    after = mask.flip(-1).long().cumsum(-1).flip(-1) > 0
    return (seen & after & ~mask).any(dim=-1)


def refuse_holes(mask: Tensor, model: str) -> None:
    """Refuse a ``(batch, seq)`` bool mask with a zero between two ones in a row."""
    if bool(_holes(mask).any()):
        raise ValueError(
            f"{model}'s attention_mask has a hole (a zero between two ones in a row); padding may only "
            "precede or follow a row's tokens"
        )


def leading_padding(mask: Tensor, model: str = "RetNet") -> Tensor:
    """Number of padding columns before each row's first real token. ``mask (batch, seq)`` -> ``(batch,)``;
    a row may also end in padding, but holes are refused."""
    mask = mask.bool()
    refuse_holes(mask, model)
    return (mask.long().cumsum(-1) == 0).sum(-1)


def check_right_padding(attention_mask: Tensor | None, model: str = "RETRO-fitting") -> None:
    """Right padding only (ones, then zeros): rows that share one position, whose chunk boundaries agree;
    a causal model never looks at the padding after a row's end."""
    if attention_mask is None:
        return
    mask = attention_mask.bool()
    if (mask[:, 1:] & ~mask[:, :-1]).any():
        raise ValueError(
            f"{model} supports right padding only while it reads neighbors (attention_mask of ones "
            "followed by zeros); left-padded rows would shift positions and chunk boundaries"
        )


@dataclass
class RowPadding:
    """A left-padded batch in one call over columns ``start .. start+seq-1`` (see :func:`row_padding`).

    ``padding (batch,)``: each row's leading padding columns; ``row_starts (batch,)``: each row's position
    of column ``start`` (``start - padding``; negative inside the padding); ``retention_offset``: the same,
    as the RetNet decoder's ``position_offset`` (an int when all rows agree); ``token_mask (batch, seq)``:
    1 for this call's real tokens, or None when all are real; ``key_mask (batch, start+seq)`` bool: the
    real columns, as keys of the transformer decoder's self-attention (its KV cache holds them all).
    """

    padding: Tensor
    row_starts: Tensor
    retention_offset: int | Tensor
    token_mask: Tensor | None
    key_mask: Tensor


def row_padding(padding: Tensor, start: int, seq_len: int, dtype: torch.dtype) -> RowPadding:
    """:class:`RowPadding` for columns ``start .. start+seq_len-1`` of rows with ``padding (batch,)``
    leading padding columns; ``dtype``: the hidden states' (the retention token mask multiplies them)."""
    row_starts = start - padding
    columns = torch.arange(start + seq_len, device=padding.device)
    key_mask = columns[None] >= padding[:, None]
    token_mask = key_mask[:, start:]
    offset: int | Tensor = row_starts
    if bool((row_starts == row_starts[0]).all()):
        offset = int(row_starts[0])
    return RowPadding(
        padding=padding,
        row_starts=row_starts,
        retention_offset=offset,
        token_mask=None if bool(token_mask.all()) else token_mask.to(dtype),
        key_mask=key_mask,
    )


def left_padding(
    attention_mask: Tensor | None, known: Tensor | None, start: int, seq_len: int, decoding: bool
) -> Tensor | None:
    """The leading padding ``(batch,)`` of a left-padded batch (zeros, then ones, in each row of
    ``attention_mask``), or None when no row is padded. Right padding (ones, then zeros) is accepted for
    a full forward without a cache, as before: a causal model never looks at what follows a row's end.

    ``attention_mask`` is ``(batch, seq)`` or, continuing a cache, ``(batch, start + seq)`` (generate's
    growing mask); padding may only precede the first call's tokens. ``known``: the padding the cache
    recorded on the first call (None: none, or no cache). ``decoding``: a cache is passed or asked for
    (right padding is then refused: decoding would continue after the padding).
    """
    if attention_mask is None:
        return known
    mask = attention_mask.bool()
    if mask.dim() != 2 or mask.shape[1] not in (seq_len, start + seq_len):
        raise ValueError(
            f"attention_mask must be (batch, {seq_len}) or (batch, {start + seq_len}), got "
            f"{tuple(attention_mask.shape)}"
        )
    rises = (mask[:, 1:] & ~mask[:, :-1]).any(dim=1)  # a zero followed by a one
    falls = (mask[:, :-1] & ~mask[:, 1:]).any(dim=1)  # a one followed by a zero
    if bool((rises & falls).any()) or bool((~mask.any(dim=1)).any()):
        raise ValueError(
            "RETRO's attention_mask must be left padding (zeros, then ones in every row) with at least one "
            "real token per row; it has a hole or an empty row"
        )
    if bool(falls.any()):
        if bool(rises.any()) or decoding:
            raise ValueError(
                "RETRO decodes and batches prompts with left padding only (attention_mask of zeros, then "
                "ones); right padding is accepted only for a full forward without a cache"
            )
        return None  # right padding: nothing to do
    padding = (~mask).sum(dim=1)
    if mask.shape[1] == seq_len and start > 0:  # the new columns only: they must all be real
        if bool(padding.any()):
            raise ValueError("left padding may only precede a prompt's first call, not a continuation")
        return known
    if known is not None or start > 0:
        previous = known if known is not None else torch.zeros_like(padding)
        if not torch.equal(previous.to(padding.device), padding):
            raise ValueError(
                "attention_mask's padding differs from the cache's: left padding may only precede the "
                "prompt's first call"
            )
        return known
    return padding if bool(padding.any()) else None
