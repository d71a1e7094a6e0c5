"""RETRO's encoder: each neighbor (+ continuation) is encoded bidirectionally, cross-attending to the
decoder states of the chunk that retrieved it (used by RETRO and by RETRO-fitting)."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from retlm.layers.attention import Attention
from retlm.models.retro.configuration_retro import RetroConfig
from retlm.models.retro.sublayers import Residual, feed_forward, final_norm


class RetroEncoderLayer(nn.Module):
    def __init__(self, config: RetroConfig, has_cross_attn: bool) -> None:
        super().__init__()
        dim, scale = config.enc_dim, config.enc_scale_residual
        common = dict(
            heads=config.heads,
            dim_head=config.dim_head,
            dropout=config.enc_attn_dropout,
            rotary_dim=config.rotary_dim,
        )
        self.self_attn = Attention(dim, **common)
        self.self_attn_norm = Residual(dim, config, scale)
        self.cross_attn = Attention(dim, context_dim=config.dec_dim, **common) if has_cross_attn else None
        self.cross_attn_norm = Residual(dim, config, scale) if has_cross_attn else None
        self.ff = feed_forward(dim, config, config.enc_ff_dropout)
        self.ff_norm = Residual(dim, config, scale)

    def forward(
        self,
        x: Tensor,
        key_mask: Tensor,
        context: Tensor,
        positions: Tensor,
        neighbor_positions: Tensor,
        context_positions: Tensor,
    ) -> Tensor:
        """One encoder layer: ``x ((chunks * k), r, enc_dim)`` -> same shape.

        ``key_mask ((chunks * k), r)`` bool, True = real token; ``context (chunks, chunk_size, dec_dim)``;
        ``positions (r,)`` of a neighbor's tokens, ``neighbor_positions (k * r,)`` the same for all k
        neighbors of a chunk (one query block), ``context_positions (chunk_size,)``.
        """
        num_neighbors = neighbor_positions.shape[0] // positions.shape[0]
        h, _ = self.self_attn(self.self_attn_norm.pre(x), key_mask=key_mask, q_positions=positions)
        x = self.self_attn_norm.post(x, h)
        if self.cross_attn is not None:
            h = rearrange(self.cross_attn_norm.pre(x), "(u k) r d -> u (k r) d", k=num_neighbors)
            h, _ = self.cross_attn(h, context, q_positions=neighbor_positions, k_positions=context_positions)
            x = self.cross_attn_norm.post(x, rearrange(h, "u (k r) d -> (u k) r d", k=num_neighbors))
        return self.ff_norm.post(x, self.ff(self.ff_norm.pre(x)))


class RetroEncoder(nn.Module):
    """Encodes neighbors (+ continuations) bidirectionally, cross-attending to the retrieving chunk."""

    def __init__(self, config: RetroConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            RetroEncoderLayer(config, config.enc_has_cross_attn(i)) for i in range(1, config.enc_depth + 1)
        )
        self.norm_out = final_norm(config.enc_dim, config)
        self.project_out = nn.Linear(config.enc_dim, config.dec_dim)

    def forward(self, x: Tensor, mask: Tensor, context: Tensor) -> Tensor:
        """
        Args:
            x: ``(chunks, k, r, enc_dim)`` embedded neighbors of ``chunks`` retrieving chunks.
            mask: ``(chunks, k, r)`` bool, True = real token.
            context: ``(chunks, chunk_size, dec_dim)`` decoder states of each retrieving chunk.

        Returns ``(chunks, k, r, dec_dim)``.
        """
        num_neighbors, r = x.shape[1:3]
        positions = torch.arange(r, device=x.device)
        # all k neighbors of a chunk attend to the same context: one query block of k * r tokens
        neighbor_positions = positions.repeat(num_neighbors)
        context_positions = torch.arange(context.shape[1], device=x.device)
        x = rearrange(x, "u k r d -> (u k) r d")
        key_mask = rearrange(mask, "u k r -> (u k) r")
        for layer in self.layers:
            x = layer(x, key_mask, context, positions, neighbor_positions, context_positions)
        x = self.project_out(self.norm_out(x))
        return rearrange(x, "(u k) r d -> u k r d", k=num_neighbors)
