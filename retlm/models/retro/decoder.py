"""RETRO's decoder layer: self-attention (or multi-scale retention for the RetNet decoder), optional
chunked cross-attention, feed-forward, each in its residual (an HF ``GradientCheckpointingLayer``); and
what one forward call gives every layer (:class:`RetroCall`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers.modeling_layers import GradientCheckpointingLayer

from retlm.layers.attention import Attention
from retlm.layers.neighbor_encoder import Residual, chunked_cross_attention, feed_forward
from retlm.layers.neighbors import cross_attend
from retlm.models.padding import RowPadding
from retlm.models.retro.cache import RetroCache, RetroCacheLayer
from retlm.models.retro.configuration_retro import RetroConfig


@dataclass
class RetroCall:
    """One forward call's inputs, checked (:meth:`RetroModel.validate_inputs`): its first column
    ``start``, ``retrieved (batch, chunks, k, r)`` or None, the left padding, the retention mode and the
    cache it continues or fills (None: none is kept)."""

    start: int
    retrieved: Tensor | None
    padding: RowPadding | None
    mode: str
    cache: RetroCache | None


class RetroDecoderLayer(GradientCheckpointingLayer):
    """Self-attention (or retention), optional chunked cross-attention, feed-forward; each residual."""

    def __init__(self, config: RetroConfig, has_cca: bool) -> None:
        super().__init__()
        dim, scale = config.dec_dim, config.dec_scale_residual
        layers = config.retrieval_layers()
        self.block_size = config.retention_block_size  # of the RetNet decoder's chunkwise mode
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
        block_size: int,
        padding: RowPadding | None = None,
    ) -> tuple[Tensor, Any]:
        """Self-attention / retention sub-layer for columns ``start ..``; returns ``(x, new_state)``.

        ``padding``: a left-padded batch's per-row positions and masks (see :class:`RowPadding`)."""
        h = self.self_attn_norm.pre(x)
        if self.is_retnet:
            offset: int | Tensor = start if padding is None else padding.retention_offset
            mask = None if padding is None else padding.token_mask
            h, state = self.self_attn(h, offset, mask, state, mode, block_size, keep_state)
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
        *neighbors: Any,
        call: RetroCall,
        cache_layer: RetroCacheLayer | None = None,
        encode: Callable[[Tensor], Any] | None = None,
    ) -> tuple[Any, ...]:
        """One decoder layer for the call's positions ``call.start ..``: ``x (batch, seq, dec_dim)`` ->
        ``(x, *neighbors)``; ``cache_layer``: this layer's state in the call's cache, read and updated.

        ``neighbors``: the encoded neighbors of the groups these positions touch (see
        :meth:`RetroModel.neighbors_for_call`), as the tensors ``(encoded, mask, group_valid)``, positional
        so that a gradient checkpoint tracks them, or one ``RowNeighbors`` (a left-padded batch), or
        nothing. ``encode``: at the first CCA layer, computes them from this layer's post-attention states
        (the encoder is conditioned on them). They are returned after ``x``, for the next layers.
        """
        start, mode, padding, keep_state = call.start, call.mode, call.padding, cache_layer is not None
        state = cache_layer.state if keep_state else None
        x, state = self.mix(
            x, start, state, keep_state=keep_state, mode=mode, block_size=self.block_size, padding=padding
        )
        if keep_state:
            cache_layer.state = state
        if encode is not None:
            found = encode(x)
            neighbors = () if found is None else found if isinstance(found, tuple) else (found,)
        if self.cca is not None and neighbors:
            x = self.cross(x, start, neighbors if len(neighbors) > 1 else neighbors[0])
        return (self.feed_forward(x), *neighbors)
