"""Attention on tensors: scaled dot-product attention with key masks, and the chunk alignment of
RETRO's chunked cross-attention (CCA, arXiv 2112.04426 section 2.4).

CCA alignment. With chunk size c, the sequence is cut into chunks u = 0, 1, ... of c tokens. The
neighbors retrieved for chunk u are computed from chunk u's own tokens, so only tokens that have
seen all of chunk u may look at them: the last token of chunk u and the first c - 1 tokens of
chunk u + 1. That window of c tokens is *group* u:

    group u = positions  u*c + c - 1  ...  u*c + 2c - 2          (the "c - 1 shift")

Positions 0 .. c-2 belong to no group and receive no cross-attention. The helpers below cut any
window of token positions ``[start, start + seq)`` into whole groups (zero-padding both ends) and
paste the results back, so that a full forward (start = 0) and incremental decoding (start > 0)
share the same code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor


def causal_mask(q_len: int, k_len: int, device: torch.device) -> Tensor:
    """Boolean ``(q_len, k_len)``, True = may attend. The queries are the LAST q_len of the k_len
    positions (bottom-right aligned), as when new tokens attend to a KV cache plus themselves."""
    q_pos = torch.arange(k_len - q_len, k_len, device=device)
    return q_pos[:, None] >= torch.arange(k_len, device=device)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_mask: Tensor | None = None,
    causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> Tensor:
    """softmax(q k^T * scale + mask) v through ``F.scaled_dot_product_attention``.

    q: ``(batch, heads, q_len, dim)``; k, v: ``(batch, heads, k_len, dim)``.
    key_mask: ``(batch, k_len)`` bool, True = real key. A query row whose visible keys are all masked
    would give NaN; such rows attend to all their visible keys instead (callers mask their outputs).
    causal: query i (bottom-right aligned) sees keys up to its own position.
    Returns ``(batch, heads, q_len, dim)``.
    """
    q_len, k_len = q.shape[-2], k.shape[-2]
    if key_mask is None:
        # the fused kernels take is_causal only for square (or single-query) shapes
        square = q_len == k_len
        if not causal or square or q_len == 1:
            return F.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout_p, is_causal=causal and square and q_len > 1, scale=scale
            )
        mask = causal_mask(q_len, k_len, q.device)
    else:
        visible = causal_mask(q_len, k_len, q.device) if causal else torch.ones_like(key_mask[:1, None, :])
        mask = key_mask[:, None, None, :] & visible
        mask = mask | (~mask.any(dim=-1, keepdim=True) & visible)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)


# -- CCA alignment ----------------------------------------------------------------------------------


def cca_groups(start: int, seq_len: int, chunk_size: int) -> tuple[int, int]:
    """Groups touched by token positions ``[start, start + seq_len)``: ``(first_group, num_groups)``.

    ``num_groups`` is 0 when every position is before ``chunk_size - 1``.
    """
    end = start + seq_len
    first_pos = max(start, chunk_size - 1)
    if first_pos >= end:
        return 0, 0
    first = (first_pos - chunk_size + 1) // chunk_size
    last = (end - 1 - chunk_size + 1) // chunk_size
    return first, last - first + 1


def chunks_completed(start: int, seq_len: int, chunk_size: int) -> tuple[int, int]:
    """Chunks whose last token lies in ``[start, start + seq_len)``: ``(first_chunk, num_chunks)``."""
    first = start // chunk_size
    return first, (start + seq_len) // chunk_size - first


def to_groups(x: Tensor, start: int, chunk_size: int) -> tuple[Tensor, int]:
    """Cut ``x (batch, seq, dim)`` holding positions ``start ..`` into CCA groups.

    Returns ``(groups (batch, num_groups, chunk_size, dim), left_pad)``; positions before
    ``chunk_size - 1`` are dropped, the ragged ends are zero-padded.
    """
    c, seq_len = chunk_size, x.shape[1]
    first, num_groups = cca_groups(start, seq_len, c)
    skipped = max(0, c - 1 - start)  # tokens that precede every group
    x = x[:, skipped:]
    left = max(start, c - 1) - (first * c + c - 1)
    right = num_groups * c - left - x.shape[1]
    x = F.pad(x, (0, 0, left, right))
    return rearrange(x, "b (g n) d -> b g n d", n=c), left


def from_groups(groups: Tensor, start: int, seq_len: int, left_pad: int) -> Tensor:
    """Inverse of :func:`to_groups`: ``(batch, num_groups, chunk_size, dim)`` -> ``(batch, seq_len, dim)``,
    with zeros at the positions that belong to no group."""
    c = groups.shape[2]
    skipped = min(seq_len, max(0, c - 1 - start))
    x = rearrange(groups, "b g n d -> b (g n) d")[:, left_pad : left_pad + seq_len - skipped]
    return F.pad(x, (0, 0, skipped, 0))


def cca_query_positions(chunk_size: int, style: str, device: torch.device) -> Tensor:
    """Rotary positions ``(chunk_size,)`` of the queries of one group, relative to the start of the chunk
    whose neighbors they read (the neighbor occupies 0..c-1, its continuation c..2c-1).

    "paper": the true offsets c-1 .. 2c-2 (the last token of chunk u, then chunk u+1).
    "retro_pytorch": [2c-2, 0, 0, ..., 0], what retro-pytorch 0.3.9 computes (its shift of the position
    table pads with zeros), needed to reproduce its logits.
    """
    if style == "paper":
        return torch.arange(chunk_size - 1, 2 * chunk_size - 1, device=device)
    if style == "retro_pytorch":
        positions = torch.zeros(chunk_size, dtype=torch.long, device=device)
        positions[0] = 2 * chunk_size - 2
        return positions
    raise ValueError(f"unknown CCA query position style {style!r}; expected 'paper' or 'retro_pytorch'")
