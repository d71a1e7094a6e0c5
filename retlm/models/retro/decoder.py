"""RETRO's decoder layer: self-attention (or multi-scale retention for the RetNet decoder), optional
chunked cross-attention, feed-forward, each in its residual; and the two halves a gradient-checkpointed
forward runs separately."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from retlm.layers.attention import Attention
from retlm.layers.neighbor_encoder import Residual, chunked_cross_attention, feed_forward
from retlm.layers.neighbors import cross_attend
from retlm.models.padding import RowPadding
from retlm.models.retro.configuration_retro import RetroConfig


class RetroDecoderLayer(nn.Module):
    """Self-attention (or retention), optional chunked cross-attention, feed-forward; each residual."""

    def __init__(self, config: RetroConfig, has_cca: bool) -> None:
        super().__init__()
        dim, scale = config.dec_dim, config.dec_scale_residual
        layers = config.retrieval_layers()
        self.is_retnet = config.decoder_type == "retnet"
        if self.is_retnet:
            from retlm.layers.retention import MultiScaleRetention  # the RetNet decoder only

            self.self_attn: nn.Module = MultiScaleRetention(
                dim,
                config.retnet_heads,
                config.retnet_qk_dim,
                config.retnet_v_dim,
                use_default_gamma=config.retnet_use_default_gamma,
            )
        else:
            self.self_attn = Attention(
                dim,
                heads=config.heads,
                dim_head=config.dim_head,
                causal=True,
                dropout=config.dec_attn_dropout,
                rotary_dim=config.rotary_dim,
            )
        self.self_attn_norm = Residual(dim, layers, scale)
        self.cca = chunked_cross_attention(dim, layers) if has_cca else None
        self.cca_norm = Residual(dim, layers, scale) if has_cca else None
        if self.cca is not None and config.zero_init_cca:
            self.cca.attn.to_out.zero_init = True  # read by RetroPreTrainedModel._init_weights
        self.ff = feed_forward(dim, layers, config.dec_ff_dropout)
        self.ff_norm = Residual(dim, layers, scale)

    def mix(
        self,
        x: Tensor,
        start: int,
        state: Any,
        *,
        keep_state: bool,
        mode: str,
        retnet_chunk_size: int,
        padding: RowPadding | None = None,
    ) -> tuple[Tensor, Any]:
        """Self-attention / retention sub-layer for columns ``start ..``; returns ``(x, new_state)``.

        ``padding``: a left-padded batch's per-row positions and masks (see :class:`RowPadding`)."""
        h = self.self_attn_norm.pre(x)
        if self.is_retnet:
            offset: int | Tensor = start if padding is None else padding.retention_offset
            mask = None if padding is None else padding.token_mask
            h, state = self.self_attn(
                h, offset, mask, state, mode=mode, chunk_size=retnet_chunk_size, return_state=keep_state
            )
        else:
            # rotary positions are relative: the columns give a padded row the same scores as its own
            # positions; the padding columns are masked as keys
            positions = torch.arange(start, start + x.shape[1], device=x.device)
            key_mask = None if padding is None else padding.key_mask
            h, state = self.self_attn(
                h, q_positions=positions, kv_cache=state, return_kv=keep_state, key_mask=key_mask
            )
        return self.self_attn_norm.post(x, h), state

    def cross(self, x: Tensor, start: int, neighbors: tuple[Tensor, Tensor, Tensor | None]) -> Tensor:
        return cross_attend(self.cca, self.cca_norm, x, start, neighbors)

    def feed_forward(self, x: Tensor) -> Tensor:
        return self.ff_norm.post(x, self.ff(self.ff_norm.pre(x)))

    def forward(
        self,
        x: Tensor,
        start: int,
        state: Any,
        *,
        keep_state: bool,
        mode: str,
        retnet_chunk_size: int,
        neighbors: Any = None,
        padding: RowPadding | None = None,
    ) -> tuple[Tensor, Any]:
        """One decoder layer for positions ``start ..``: ``x (batch, seq, dec_dim)`` -> ``(x, new_state)``.

        ``neighbors``: the encoded neighbors of the groups these positions touch (see
        :meth:`RetroModel.neighbors_for_call`), or a callable that computes them from this layer's
        post-attention states (the first CCA layer conditions the encoder on them), or None.
        """
        x, state = self.mix(
            x,
            start,
            state,
            keep_state=keep_state,
            mode=mode,
            retnet_chunk_size=retnet_chunk_size,
            padding=padding,
        )
        if callable(neighbors):
            neighbors = neighbors(x)
        if self.cca is not None and neighbors is not None:
            x = self.cross(x, start, neighbors)
        return self.feed_forward(x), state


# -- models -------------------------------------------------------------------------------------------


def mix_only(layer: RetroDecoderLayer, x: Tensor, start: int, mode: str, chunk_size: int) -> Tensor:
    """A decoder layer's self-attention / retention sub-layer without a cache ``(batch, seq, dim)``."""
    return layer.mix(x, start, None, keep_state=False, mode=mode, retnet_chunk_size=chunk_size)[0]


def cross_and_feed_forward(
    layer: RetroDecoderLayer,
    x: Tensor,
    start: int,
    encoded: Tensor | None,
    mask: Tensor | None,
    group_valid: Tensor | None,
) -> Tensor:
    """A decoder layer's chunked cross-attention (when it has one and there are neighbors: ``encoded
    (batch, groups, k, r, dim)``, ``mask (batch, groups, k, r)``) and its feed-forward."""
    if layer.cca is not None and encoded is not None:
        x = layer.cross(x, start, (encoded, mask, group_valid))
    return layer.feed_forward(x)
