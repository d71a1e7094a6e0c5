"""Attention modules of RETRO: multi-head (self or cross) attention with partial rotary positions,
and chunked cross-attention (CCA).

Parameter names are retro-pytorch's (``to_q``, ``to_k``, ``to_v``, ``to_out``, ``null_k``, ``null_v``)
so that its weights import by copying.
"""

from __future__ import annotations

import torch
from einops import rearrange, repeat
from torch import Tensor, nn

from retlm.ops import attention as attention_ops
from retlm.ops.rotary import apply_rotary, rotary_angles, standard_inv_freq


class KVCache:
    """Rotated keys and values of past positions, ``(batch, heads, length, dim_head)`` each, kept in
    buffers that grow by doubling. Appending a token copies only that token (amortised): ``torch.cat``
    onto the whole cache at every step would copy it all, quadratic in the generated length."""

    def __init__(self, k: Tensor, v: Tensor) -> None:
        self.length = 0
        self.keys = k.new_empty(*k.shape[:2], max(16, 2 * k.shape[2]), k.shape[3])
        self.values = v.new_empty(*v.shape[:2], self.keys.shape[2], v.shape[3])
        self.append(k, v)

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Add ``k, v (batch, heads, new, dim_head)``; return all keys and values so far (views)."""
        end = self.length + k.shape[2]
        if end > self.keys.shape[2]:
            capacity = max(end, 2 * self.keys.shape[2])
            self.keys = self._grown(self.keys, capacity)
            self.values = self._grown(self.values, capacity)
        self.keys[:, :, self.length : end] = k
        self.values[:, :, self.length : end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def _grown(self, buffer: Tensor, capacity: int) -> Tensor:
        grown = buffer.new_empty(*buffer.shape[:2], capacity, buffer.shape[3])
        grown[:, :, : self.length] = buffer[:, :, : self.length]
        return grown

    def index_select(self, dim: int, indices: Tensor) -> KVCache:
        """Keep (or reorder) batch rows ``indices`` (``dim`` must be 0), as ``Tensor.index_select``."""
        if dim != 0:
            raise ValueError(f"a KVCache selects along the batch dimension 0, not {dim}")
        selected = KVCache.__new__(KVCache)
        selected.length = self.length
        selected.keys = self.keys.index_select(0, indices.to(self.keys.device))
        selected.values = self.values.index_select(0, indices.to(self.values.device))
        return selected


class Attention(nn.Module):
    """Multi-head attention, ``to_out(attend(rotate(q), rotate(k), v))``.

    Args:
        dim: query input width.
        heads, dim_head: number and width of heads.
        context_dim: key/value input width for cross-attention (default ``dim``).
        causal: mask future keys (self-attention of a decoder).
        dropout: dropout on the attention probabilities.
        null_kv: prepend one learned key/value (not rotated) that every query can attend to, so that
            a query whose keys are all masked still has somewhere to go.
        rotary_dim: rotate the first ``rotary_dim`` features of each head (rotate-half layout, base
            10000); 0 disables rotation.
    """

    def __init__(
        self,
        dim: int,
        *,
        heads: int = 8,
        dim_head: int = 64,
        context_dim: int | None = None,
        causal: bool = False,
        dropout: float = 0.0,
        null_kv: bool = False,
        rotary_dim: int = 32,
    ) -> None:
        super().__init__()
        if rotary_dim % 2 or rotary_dim > dim_head:
            raise ValueError(f"rotary_dim must be even and at most dim_head={dim_head}, got {rotary_dim}")
        inner = heads * dim_head
        context_dim = context_dim or dim
        self.heads, self.dim_head, self.causal, self.dropout = heads, dim_head, causal, dropout
        self.rotary_dim = rotary_dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim)
        self.null_k = nn.Parameter(torch.randn(inner)) if null_kv else None
        self.null_v = nn.Parameter(torch.randn(inner)) if null_kv else None
        # derived from rotary_dim, never trained or saved (kept off the state_dict)
        self._inv_freq: dict[torch.device, Tensor] = {}

    def inv_freq(self, device: torch.device) -> Tensor:
        if device not in self._inv_freq:
            self._inv_freq[device] = standard_inv_freq(self.rotary_dim).to(device)
        return self._inv_freq[device]

    def rotate(self, x: Tensor, positions: Tensor | None) -> Tensor:
        """Rotate ``x (batch, heads, seq, dim_head)`` to ``positions (seq,)``."""
        if positions is None or self.rotary_dim == 0:
            return x
        cos, sin = rotary_angles(positions, self.inv_freq(x.device), x.dtype)
        return apply_rotary(x, cos, sin)

    def split_heads(self, x: Tensor) -> Tensor:
        return rearrange(x, "b n (h d) -> b h n d", h=self.heads)

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        *,
        key_mask: Tensor | None = None,
        q_positions: Tensor | None = None,
        k_positions: Tensor | None = None,
        kv_cache: KVCache | None = None,
        return_kv: bool = False,
    ) -> tuple[Tensor, KVCache | None]:
        """
        Args:
            x: ``(batch, q_len, dim)`` queries.
            context: ``(batch, k_len, context_dim)`` keys/values for cross-attention; None = self.
            key_mask: ``(batch, k_len)`` bool, True = real key (cache keys are never masked).
            q_positions, k_positions: rotary positions ``(q_len,)`` / ``(k_len,)``; k_positions defaults
                to q_positions (self-attention).
            kv_cache: a :class:`KVCache` of the rotated keys and values of earlier positions, extended
                in place with this call's (self-attention decoding).
            return_kv: also return the cache including this call's keys/values, for the next step.

        Returns ``(output (batch, q_len, dim), kv or None)``.
        """
        source = x if context is None else context
        q = self.rotate(self.split_heads(self.to_q(x)), q_positions)
        k = self.rotate(
            self.split_heads(self.to_k(source)), k_positions if context is not None else q_positions
        )
        v = self.split_heads(self.to_v(source))
        new_kv = None
        if kv_cache is not None:
            k, v = kv_cache.append(k, v)
            new_kv = kv_cache if return_kv else None
        elif return_kv:
            new_kv = KVCache(k, v)

        if self.null_k is not None:
            null_k, null_v = (
                repeat(p, "(h d) -> b h 1 d", b=x.shape[0], h=self.heads) for p in (self.null_k, self.null_v)
            )
            k, v = torch.cat((null_k, k), dim=2), torch.cat((null_v, v), dim=2)
            if key_mask is not None:
                key_mask = nn.functional.pad(key_mask, (1, 0), value=True)

        out = attention_ops.attention(
            q,
            k,
            v,
            key_mask=key_mask,
            causal=self.causal,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.to_out(rearrange(out, "b h n d -> b n (h d)")), new_kv


class ChunkedCrossAttention(nn.Module):
    """RETRO's causal chunked cross-attention.

    Group u (the last token of chunk u and the first c-1 tokens of chunk u+1, see
    :mod:`retlm.ops.attention`) attends to the encoded neighbors of chunk u (each neighbor with its
    continuation) plus a learned null key/value. Tokens before position c-1 get zeros.

    Args: ``dim`` (decoder width), ``chunk_size``, ``heads``, ``dim_head``, ``dropout``, ``rotary_dim``,
    and ``query_positions`` ("paper" or "retro_pytorch", see
    :func:`retlm.ops.attention.cca_query_positions`).
    """

    def __init__(
        self,
        dim: int,
        chunk_size: int,
        *,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
        rotary_dim: int = 32,
        query_positions: str = "paper",
    ) -> None:
        super().__init__()
        attention_ops.cca_query_positions(chunk_size, query_positions, torch.device("cpu"))  # validates
        self.chunk_size = chunk_size
        self.query_positions = query_positions
        self.attn = Attention(
            dim, heads=heads, dim_head=dim_head, dropout=dropout, null_kv=True, rotary_dim=rotary_dim
        )

    def forward(
        self,
        x: Tensor,
        neighbors: Tensor,
        neighbor_mask: Tensor,
        *,
        start: int = 0,
        group_valid: Tensor | None = None,
    ) -> Tensor:
        """
        Args:
            x: ``(batch, seq, dim)`` normalised decoder states of positions ``start .. start+seq-1``.
            neighbors: ``(batch, groups, k, r, dim)`` encoded neighbors (r = neighbor + continuation
                length) for every group the positions touch, in order (see
                :func:`retlm.ops.attention.cca_groups`).
            neighbor_mask: ``(batch, groups, k, r)`` bool, True = real token.
            start: absolute position of ``x[:, 0]``.
            group_valid: ``(groups,)`` bool; groups marked False (no neighbors retrieved) output zeros.

        Returns ``(batch, seq, dim)``.
        """
        c, (batch, seq_len) = self.chunk_size, x.shape[:2]
        _, num_groups = attention_ops.cca_groups(start, seq_len, c)
        if num_groups == 0:
            return torch.zeros_like(x)
        if neighbors.shape[1] != num_groups:
            raise ValueError(
                f"positions {start}..{start + seq_len - 1} need neighbors for {num_groups} chunk(s), "
                f"got {neighbors.shape[1]}"
            )
        groups, left = attention_ops.to_groups(x, start, c)
        num_neighbors, r = neighbors.shape[2:4]
        q_positions = attention_ops.cca_query_positions(c, self.query_positions, x.device)
        k_positions = torch.arange(r, device=x.device).repeat(num_neighbors)
        out, _ = self.attn(
            rearrange(groups, "b g n d -> (b g) n d"),
            rearrange(neighbors, "b g k r d -> (b g) (k r) d"),
            key_mask=rearrange(neighbor_mask, "b g k r -> (b g) (k r)"),
            q_positions=q_positions,
            k_positions=k_positions,
        )
        out = rearrange(out, "(b g) n d -> b g n d", b=batch)
        if group_valid is not None:
            out = out * group_valid[None, :, None, None].to(out.dtype)
        return attention_ops.from_groups(out, start, seq_len, left)
