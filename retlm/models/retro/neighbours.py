"""The retrieved neighbours of a RETRO call: validating ``retrieved``, encoding the neighbours, collecting
the encoded neighbours of every CCA group a call touches (from the call and from the cache), and the
residual chunked cross-attention sub-layer that reads them. Shared by RETRO and RETRO-fitting."""

from __future__ import annotations

from collections.abc import Callable

import torch
from einops import rearrange
from torch import Tensor, nn

from retlm.layers.attention import ChunkedCrossAttention
from retlm.models.retro.cache import RetroCache
from retlm.models.retro.sublayers import Residual
from retlm.ops.attention import cca_groups, chunks_completed


def cross_attend(
    cca: ChunkedCrossAttention,
    cca_norm: Residual,
    x: Tensor,
    start: int,
    neighbours: tuple[Tensor, Tensor, Tensor | None],
) -> Tensor:
    """The residual CCA sub-layer ``x + CCA(norm(x), neighbours)`` for positions ``start ..`` of
    ``x (batch, seq, dim)``; ``neighbours`` as returned by :func:`neighbours_for_call`."""
    encoded, mask, group_valid = neighbours
    h = cca(cca_norm.pre(x), encoded, mask, start=start, group_valid=group_valid)
    return cca_norm.post(x, h)


def check_retrieved(
    retrieved: Tensor | None, chunk_size: int, batch: int, start: int, seq_len: int, incremental: bool
) -> Tensor | None:
    """Validate the ``retrieved`` argument of a call that feeds positions ``start .. start+seq_len-1`` and
    return it as ``(batch, completed_chunks, k, r)`` (see :meth:`RetroModel.forward`)."""
    if retrieved is None:
        return None
    c = chunk_size
    _, num_new = chunks_completed(start, seq_len, c)
    if retrieved.dim() == 3:  # one chunk's k neighbours (decoding), or retro-pytorch's single neighbour
        retrieved = retrieved[:, None] if incremental else retrieved[:, :, None]
    where = f"positions {start}..{start + seq_len - 1}" if incremental else f"sequence length {seq_len}"
    expected = f"(batch={batch}, num_chunks={num_new}, num_neighbours, {2 * c})"
    if retrieved.dim() != 4 or retrieved.shape[0] != batch or retrieved.shape[1] != num_new:
        raise ValueError(
            f"retrieved must have shape {expected} for {where} with chunk_size={c} "
            f"(one entry per chunk completed by these tokens), got {tuple(retrieved.shape)}"
        )
    if retrieved.shape[3] < c:
        raise ValueError(
            f"retrieved chunks must hold at least chunk_size={c} tokens (neighbour + continuation: "
            f"{2 * c}); expected shape {expected}, got {tuple(retrieved.shape)}"
        )
    if retrieved.is_floating_point():
        raise ValueError(f"retrieved must hold token ids (an integer tensor), got {retrieved.dtype}")
    return retrieved


def encode_neighbours(
    embed: Callable[[Tensor], Tensor], encoder: nn.Module, pad_id: int, retrieved: Tensor, context: Tensor
) -> tuple[Tensor, Tensor]:
    """Embed (``embed``: token ids -> ``enc_dim`` vectors) and encode neighbours.

    ``retrieved (batch, u, k, r)`` token ids (``pad_id`` or -1 = missing), ``context (batch, u, c, dec_dim)``
    decoder states of the retrieving chunks -> ``(encoded (batch, u, k, r, dec_dim), mask (batch, u, k, r))``.
    """
    batch = retrieved.shape[0]
    mask = (retrieved != pad_id) & (retrieved >= 0)
    tokens = embed(retrieved.clamp(min=0).long())
    encoded = encoder(
        rearrange(tokens, "b u k r d -> (b u) k r d"),
        rearrange(mask, "b u k r -> (b u) k r"),
        rearrange(context, "b u n d -> (b u) n d"),
    )
    return rearrange(encoded, "(b u) k r d -> b u k r d", b=batch), mask


def neighbours_for_call(
    x: Tensor,
    retrieved: Tensor | None,
    start: int,
    cache: RetroCache | None,
    chunk_size: int,
    encode: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]],
) -> tuple[Tensor, Tensor, Tensor | None] | None:
    """Encode the neighbours of the chunks completed by this call and collect, for every CCA group the
    call's positions touch, its encoded neighbours.

    ``x (batch, seq, dec_dim)``: decoder states of positions ``start ..`` at the layer that conditions the
    encoder; ``retrieved (batch, completed_chunks, k, r)`` or None; ``cache``: the decoding state (its
    ``context``, ``neighbours`` and ``neighbour_mask`` are read and updated), or None for a full forward;
    ``encode(retrieved, context)`` as :func:`encode_neighbours`. Returns ``(encoded (b, g, k, r, d),
    mask (b, g, k, r), group_valid (g,) or None)`` or None when no group has neighbours.
    """
    c = chunk_size
    _, num_new = chunks_completed(start, x.shape[1], c)
    context = x if cache is None or cache.context is None else torch.cat((cache.context, x), dim=1)
    new = None
    if retrieved is not None and num_new > 0:
        chunk_context = rearrange(context[:, : num_new * c], "b (u n) d -> b u n d", n=c)
        new = encode(retrieved, chunk_context)
    _, num_groups = cca_groups(start, x.shape[1], c)
    from_cache = num_groups - num_new  # 1 when the first group's chunk was completed earlier
    old = None
    if from_cache and cache is not None and cache.neighbours is not None:
        old = (cache.neighbours[:, None], cache.neighbour_mask[:, None])
    if cache is not None:
        cache.context = context[:, num_new * c :]
        if num_new > 0:
            cache.neighbours = None if new is None else new[0][:, -1]
            cache.neighbour_mask = None if new is None else new[1][:, -1]
    if num_groups == 0 or (new is None and old is None):
        return None
    template = new if new is not None else old
    if new is not None and old is not None and new[1].shape[2:] != old[1].shape[2:]:
        raise ValueError(
            "the neighbours of consecutive chunks must have the same (num_neighbours, length); "
            f"cached {tuple(old[1].shape[2:])}, new {tuple(new[1].shape[2:])}"
        )
    encoded, masks, flags = [], [], []
    for part, count in ((old, from_cache), (new, num_new)):
        if count == 0:
            continue
        flags += [part is not None] * count
        if part is None:  # these groups had no retrieval: zeros in, and their output is dropped
            part = tuple(t[:, :1].new_zeros(t[:, :1].shape).expand(-1, count, *t.shape[2:]) for t in template)
        encoded.append(part[0])
        masks.append(part[1])
    group_valid = None if all(flags) else torch.tensor(flags, device=x.device)
    return torch.cat(encoded, dim=1), torch.cat(masks, dim=1), group_valid
