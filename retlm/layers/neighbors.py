"""The retrieved neighbors of a RETRO call: validating ``retrieved``, encoding the neighbors, collecting
the encoded neighbors of every CCA group a call touches (from the call and from the decoding state,
:class:`NeighborState`), and the residual chunked cross-attention sub-layer that reads them. Shared by
RETRO and RETRO-fitting."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from retlm.layers.attention import ChunkedCrossAttention
from retlm.layers.neighbor_encoder import Residual
from retlm.ops.attention import cca_groups, chunks_completed


@dataclass(eq=False)
class NeighborState:
    """The neighbors' side of a RETRO decoding state (all rows of the batch share one column position).

    Attributes:
        position: number of tokens processed so far (absolute position of the next token).
        context: ``(batch, position % chunk_size, dec_dim)`` decoder states, at the first CCA layer, of
            the current incomplete chunk; the encoder is conditioned on them once the chunk completes.
        neighbors: ``(batch, k, r, dec_dim)`` encoded neighbors of the last completed chunk (read by the
            tokens up to the end of the following chunk), or None when that chunk had no retrieval.
        neighbor_mask: ``(batch, k, r)`` bool, True = real neighbor token.
        padding: ``(batch,)`` leading padding columns of each row when the prompt was left-padded, else
            None. Row ``i``'s token at column ``t`` then sits at position ``t - padding[i]``, its chunks
            are counted from its first real token, and (left-padded mode only) ``context`` holds the
            states of the last ``chunk_size - 1`` columns, ``neighbors`` each row's own last completed
            chunk's encoded neighbors, ``neighbor_valid (batch,)`` whether that chunk had retrieval.
    """

    position: int = 0
    context: Tensor | None = None
    neighbors: Tensor | None = None
    neighbor_mask: Tensor | None = None
    padding: Tensor | None = None
    neighbor_valid: Tensor | None = None

    def select_rows(self, indices: Tensor) -> None:
        """Keep (or reorder, e.g. for beam search) the batch rows ``indices`` of every tensor."""

        def select(value: Any) -> Any:
            return value.index_select(0, indices.to(value.device)) if isinstance(value, Tensor) else value

        self.context, self.neighbors, self.neighbor_mask = (
            select(self.context),
            select(self.neighbors),
            select(self.neighbor_mask),
        )
        self.padding, self.neighbor_valid = select(self.padding), select(self.neighbor_valid)


def cross_attend(
    cca: ChunkedCrossAttention,
    cca_norm: Residual,
    x: Tensor,
    start: int,
    neighbors: tuple[Tensor, Tensor, Tensor | None],
) -> Tensor:
    """The residual CCA sub-layer ``x + CCA(norm(x), neighbors)`` for positions ``start ..`` of
    ``x (batch, seq, dim)``; ``neighbors`` as returned by :func:`neighbors_for_call`."""
    if isinstance(neighbors, RowNeighbors):
        return neighbors.cross_attend(cca, cca_norm, x)
    encoded, mask, group_valid = neighbors
    h = cca(cca_norm.pre(x), encoded, mask, start=start, group_valid=group_valid)
    return cca_norm.post(x, h)


def check_retrieved(
    retrieved: Tensor | None,
    chunk_size: int,
    batch: int,
    start: int,
    seq_len: int,
    incremental: bool,
    row_starts: Tensor | None = None,
) -> Tensor | None:
    """Validate the ``retrieved`` argument of a call that feeds positions ``start .. start+seq_len-1`` and
    return it as ``(batch, completed_chunks, k, r)`` (see :meth:`~retlm.models.retro.RetroModel.forward`).

    ``row_starts (batch,)``: for a left-padded batch, each row's position of the call's first column
    (negative in the padding); ``completed_chunks`` is then the most chunks any row completes."""
    if retrieved is None:
        return None
    c = chunk_size
    if row_starts is None:
        _, num_new = chunks_completed(start, seq_len, c)
    else:
        num_new = max(row_chunks_completed(s, seq_len, c)[1] for s in row_starts.tolist())
    if retrieved.dim() == 3:  # one chunk's k neighbors (decoding), or retro-pytorch's single neighbor
        retrieved = retrieved[:, None] if incremental else retrieved[:, :, None]
    where = f"positions {start}..{start + seq_len - 1}" if incremental else f"sequence length {seq_len}"
    expected = f"(batch={batch}, num_chunks={num_new}, num_neighbors, {2 * c})"
    if retrieved.dim() != 4 or retrieved.shape[0] != batch or retrieved.shape[1] != num_new:
        raise ValueError(
            f"retrieved must have shape {expected} for {where} with chunk_size={c} "
            f"(one entry per chunk completed by these tokens), got {tuple(retrieved.shape)}"
        )
    if retrieved.shape[3] < c:
        raise ValueError(
            f"retrieved chunks must hold at least chunk_size={c} tokens (neighbor + continuation: "
            f"{2 * c}); expected shape {expected}, got {tuple(retrieved.shape)}"
        )
    if retrieved.is_floating_point():
        raise ValueError(f"retrieved must hold token ids (an integer tensor), got {retrieved.dtype}")
    return retrieved


def encode_neighbors(
    embed: Callable[[Tensor], Tensor], encoder: nn.Module, pad_id: int, retrieved: Tensor, context: Tensor
) -> tuple[Tensor, Tensor]:
    """Embed (``embed``: token ids -> ``enc_dim`` vectors) and encode neighbors.

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


def neighbors_for_call(
    x: Tensor,
    retrieved: Tensor | None,
    start: int,
    cache: NeighborState | None,
    chunk_size: int,
    encode: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]],
) -> tuple[Tensor, Tensor, Tensor | None] | None:
    """Encode the neighbors of the chunks completed by this call and collect, for every CCA group the
    call's positions touch, its encoded neighbors.

    ``x (batch, seq, dec_dim)``: decoder states of positions ``start ..`` at the layer that conditions the
    encoder; ``retrieved (batch, completed_chunks, k, r)`` or None; ``cache``: the decoding state (its
    ``context``, ``neighbors`` and ``neighbor_mask`` are read and updated), or None for a full forward;
    ``encode(retrieved, context)`` as :func:`encode_neighbors`. Returns ``(encoded (b, g, k, r, d),
    mask (b, g, k, r), group_valid (g,) or None)`` or None when no group has neighbors.
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
    if from_cache and cache is not None and cache.neighbors is not None:
        old = (cache.neighbors[:, None], cache.neighbor_mask[:, None])
    if cache is not None:
        cache.context = context[:, num_new * c :]
        if num_new > 0:
            cache.neighbors = None if new is None else new[0][:, -1]
            cache.neighbor_mask = None if new is None else new[1][:, -1]
    if num_groups == 0 or (new is None and old is None):
        return None
    template = new if new is not None else old
    if new is not None and old is not None and new[1].shape[2:] != old[1].shape[2:]:
        raise ValueError(
            "the neighbors of consecutive chunks must have the same (num_neighbors, length); "
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


# -- left-padded batches: every row has its own chunk boundaries ----------------------------------------


def row_chunks_completed(row_start: int, seq_len: int, chunk_size: int) -> tuple[int, int]:
    """:func:`chunks_completed` for one row whose call covers positions ``row_start ..`` (negative ones
    are left padding and complete no chunk)."""
    first = max(row_start, 0)
    return chunks_completed(first, max(0, row_start + seq_len - first), chunk_size)


@dataclass
class RowNeighbors:
    """The encoded neighbors of one call on a left-padded batch, and where each row's tokens sit.

    Row ``i``'s chunks start at its own first real token, so its CCA groups sit at other columns than
    another row's. Chunked cross-attention treats every query independently: its output depends on the
    query, its offset inside its group and that group's neighbors only. So each row is moved by a whole
    number of groups, onto a shared window where its first group is group 0, and ONE
    :class:`ChunkedCrossAttention` call at ``start`` serves the batch; the outputs are moved back.

    ``encoded (batch, groups, k, r, dim)``, ``mask (batch, groups, k, r)``: row i's groups, in order;
    ``source (batch, window)``: the column each window slot reads; ``window_valid (batch, window)``: the
    slot holds a token of the row whose group has neighbors; ``back (batch, seq)``: the slot each column's
    output comes from; ``column_valid (batch, seq)``: the column gets cross-attention (position >= c - 1);
    ``row_valid (batch,)``: the row reads neighbors at all (else its CCA sub-layer is skipped, as for
    a row alone whose call has none).
    """

    start: int
    encoded: Tensor
    mask: Tensor
    source: Tensor
    window_valid: Tensor
    back: Tensor
    column_valid: Tensor
    row_valid: Tensor

    def cross_attend(self, cca: ChunkedCrossAttention, cca_norm: Residual, x: Tensor) -> Tensor:
        """The residual CCA sub-layer of :func:`cross_attend` for ``x (batch, seq, dim)``."""
        h = cca_norm.pre(x)
        dim = h.shape[-1]
        window = h.gather(1, self.source[..., None].expand(-1, -1, dim))
        out = cca(window, self.encoded, self.mask, start=self.start)
        out = out * self.window_valid[..., None].to(out.dtype)
        out = out.gather(1, self.back[..., None].expand(-1, -1, dim))
        out = out * self.column_valid[..., None].to(out.dtype)
        return torch.where(self.row_valid[:, None, None], cca_norm.post(x, out), x)


def row_neighbors_for_call(
    x: Tensor,
    retrieved: Tensor | None,
    row_starts: Tensor,
    cache: NeighborState | None,
    chunk_size: int,
    encode: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]],
) -> RowNeighbors | None:
    """:func:`neighbors_for_call` for a left-padded batch: row ``i``'s column ``t`` is at position
    ``row_starts[i] + t`` (negative = padding), its chunks and groups are counted from its position 0.

    ``x (batch, seq, dec_dim)``; ``retrieved (batch, n, k, r)``: row i's entry j holds the neighbors of
    the j-th chunk the row completes in this call (``n`` the most any row completes; the others' extra
    entries are ignored), or None; ``cache`` (its left-padded fields, see :class:`NeighborState`) is read
    and updated, or None for a full forward. Returns None when no row reads neighbors.
    """
    c = chunk_size
    batch, seq_len, dim = x.shape
    device = x.device
    starts = row_starts.tolist()
    completed = [row_chunks_completed(s, seq_len, c) for s in starts]  # (first chunk, count) per row
    groups = [cca_groups(s, seq_len, c) for s in starts]  # (first group, count) per row
    num_new = max(n for _, n in completed)

    # encoder context: each completed chunk's c decoder states, from the last c-1 columns (cache) + x
    prefix = None if cache is None else cache.context
    if prefix is None:
        prefix = x.new_zeros(batch, c - 1, dim)
    context = torch.cat((prefix, x), dim=1)  # columns start-(c-1) .. start+seq-1
    new = None
    if retrieved is not None and num_new > 0:
        idx = torch.zeros(batch, num_new, c, dtype=torch.long)
        for i, ((first, count), s) in enumerate(zip(completed, starts, strict=True)):
            for j in range(count):  # chunk first+j spans positions (first+j)*c .. +c-1
                idx[i, j] = torch.arange(c) + (first + j) * c - s + c - 1
        idx = idx.to(device).view(batch, num_new * c, 1).expand(-1, -1, dim)
        new = encode(retrieved, context.gather(1, idx).view(batch, num_new, c, dim))
    counts = torch.tensor([n for _, n in completed], device=device)  # chunks each row completes

    # candidates per row: slot 0 the cached last chunk's neighbors, slots 1.. this call's chunks'
    old_valid = torch.zeros(batch, dtype=torch.bool, device=device)
    if cache is not None and cache.neighbors is not None:
        old = (cache.neighbors, cache.neighbor_mask)
        if cache.neighbor_valid is not None:
            old_valid = cache.neighbor_valid
    elif new is not None:
        old = tuple(t[:, 0].new_zeros(t[:, 0].shape) for t in new)
    else:
        old = None
    if cache is not None:
        cache.context = context[:, context.shape[1] - (c - 1) :]
    if old is None:  # nothing retrieved, now or before: no row reads neighbors
        if cache is not None:
            cache.neighbor_valid = old_valid
        return None
    if new is not None and old[1].shape[1:] != new[1].shape[2:]:
        raise ValueError(
            "the neighbors of consecutive chunks must have the same (num_neighbors, length); "
            f"cached {tuple(old[1].shape[1:])}, new {tuple(new[1].shape[2:])}"
        )
    tail = new if new is not None else tuple(t[:, None].new_zeros(t[:, None].shape) for t in old)
    candidates = [torch.cat((o[:, None], t), dim=1) for o, t in zip(old, tail, strict=True)]
    slots = torch.arange(tail[1].shape[1], device=device)
    valid = torch.cat((old_valid[:, None], (slots[None] < counts[:, None]) & (new is not None)), dim=1)

    def take(index: Tensor) -> tuple[Tensor, Tensor]:
        """Each row's candidates ``index (batch, n)``: ``(encoded (b, n, k, r, d), mask (b, n, k, r))``."""
        return tuple(
            t.gather(1, index.view(*index.shape, *[1] * (t.dim() - 2)).expand(-1, -1, *t.shape[2:]))
            for t in candidates
        )

    if cache is not None:  # each row keeps the neighbors of its own last completed chunk
        last = counts.clamp(max=candidates[0].shape[1] - 1)[:, None]  # slot 0 when none completed
        (cache.neighbors, cache.neighbor_mask), cache.neighbor_valid = (
            tuple(t[:, 0] for t in take(last)),
            torch.where(counts > 0, (counts > 0) & (new is not None), old_valid),
        )

    # the shared window: row i moves by its first group, so that group is window group 0
    rows = [i for i, (_, count) in enumerate(groups) if count > 0]
    if not rows:
        return None
    lows = [max(starts[i], c - 1) - groups[i][0] * c for i in rows]  # in c-1 .. 2c-2
    start = min(lows)
    end = max(starts[i] + seq_len - groups[i][0] * c for i in rows)
    _, num_groups = cca_groups(start, end - start, c)
    shift = torch.tensor([g * c for g, _ in groups], device=device)
    row_start = row_starts.to(device)
    window_pos = torch.arange(start, end, device=device)[None] + shift[:, None]  # (batch, window)
    source = window_pos - row_start[:, None]
    first_pos = row_start.clamp(min=c - 1)
    in_row = (window_pos >= first_pos[:, None]) & (source < seq_len)
    slot = torch.arange(num_groups, device=device)
    from_cache = torch.tensor(
        [n_g - n for (_, n_g), (_, n) in zip(groups, completed, strict=True)], device=device
    )
    group_count = torch.tensor([n_g for _, n_g in groups], device=device)
    pick = (slot[None] + 1 - from_cache[:, None]).clamp(0, candidates[0].shape[1] - 1)
    group_valid = valid.gather(1, pick) & (slot[None] < group_count[:, None])
    if not bool(group_valid.any()):
        return None
    window_group = (torch.arange(start, end, device=device) - c + 1) // c
    positions = row_start[:, None] + torch.arange(seq_len, device=device)[None]
    column_valid = positions >= c - 1
    back = (positions - shift[:, None] - start).clamp(0, end - start - 1)
    encoded, mask = take(pick)
    return RowNeighbors(
        start=start,
        encoded=encoded,
        mask=mask,
        source=source.clamp(0, seq_len - 1),
        window_valid=in_row & group_valid.gather(1, window_group[None].expand(batch, -1)),
        back=back,
        column_valid=column_valid,
        row_valid=group_valid.any(dim=1),
    )
