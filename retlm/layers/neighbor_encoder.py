"""RETRO's retrieval layers, shared by RETRO and RETRO-fitting: the residual wrapper with its norm, the
feed-forward, the chunked cross-attention sub-layer's factory, and the neighbor encoder (each neighbor
+ continuation encoded bidirectionally, cross-attending to the decoder states of the chunk that
retrieved it). :class:`RetrievalLayersConfig` is what they read; a model's config builds one."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor, nn
from transformers import initialization as init

from retlm.layers.attention import Attention, ChunkedCrossAttention
from retlm.layers.feedforward import FeedForward
from retlm.layers.norm import GatedScaledL2Norm, ScaledL2Norm

CCA_QUERY_POSITIONS = ("paper", "retro_pytorch")


@dataclass(frozen=True)
class RetrievalLayersConfig:
    """The shape of RETRO's retrieval layers (field names and meanings as
    :class:`~retlm.models.retro.RetroConfig`'s): the encoder reads ``enc_dim`` vectors and cross-attends
    to, and projects out to, ``dec_dim`` decoder states; ``enc_cross_attn_layers`` (1-based, None =
    all) cross-attend; ``gated_rmsnorm`` / ``use_deepnet`` choose the norm (scaled L2 by default);
    ``rotary_dim`` None is ``min(dim_head, 32)``, as retro-pytorch."""

    enc_dim: int
    dec_dim: int
    enc_depth: int
    heads: int
    dim_head: int
    chunk_size: int
    rotary_dim: int | None = None
    enc_cross_attn_layers: list[int] | None = None
    ff_mult: int = 4
    norm_eps: float = 1e-8
    gated_rmsnorm: bool = False
    use_deepnet: bool = False
    enc_scale_residual: float | None = None
    dec_scale_residual: float | None = None
    enc_attn_dropout: float = 0.0
    enc_ff_dropout: float = 0.0
    dec_attn_dropout: float = 0.0
    cca_query_positions: str = "paper"

    def __post_init__(self) -> None:
        rotary_dim = min(self.dim_head, 32) if self.rotary_dim is None else self.rotary_dim
        object.__setattr__(self, "rotary_dim", rotary_dim)
        if rotary_dim % 2 or not 0 <= rotary_dim <= self.dim_head:
            raise ValueError(f"rotary_dim must be even and in 0..dim_head={self.dim_head}, got {rotary_dim}")
        if self.cca_query_positions not in CCA_QUERY_POSITIONS:
            raise ValueError(
                f"unknown cca_query_positions {self.cca_query_positions!r}; "
                f"expected one of {CCA_QUERY_POSITIONS}"
            )

    def enc_has_cross_attn(self, layer: int) -> bool:
        """Whether encoder layer ``layer`` (1-based) cross-attends to the retrieving chunk."""
        return self.enc_cross_attn_layers is None or layer in self.enc_cross_attn_layers


class Residual(nn.Module):
    """A residual around a sub-layer: pre-norm ``x + f(norm(x))``, or DeepNet post-norm
    ``norm(f(x) + scale * x)``. Call ``pre(x)`` for the sub-layer input, ``post(x, f_out)`` after it."""

    def __init__(self, dim: int, config: RetrievalLayersConfig, scale: float | None) -> None:
        super().__init__()
        if config.gated_rmsnorm:
            self.norm: nn.Module = GatedScaledL2Norm(dim, config.norm_eps)
        elif config.use_deepnet:
            self.norm = nn.LayerNorm(dim)
        else:
            self.norm = ScaledL2Norm(dim, config.norm_eps)
        self.post_norm = config.use_deepnet
        self.scale = 1.0 if scale is None else scale

    def pre(self, x: Tensor) -> Tensor:
        return x if self.post_norm else self.norm(x)

    def post(self, x: Tensor, out: Tensor) -> Tensor:
        return self.norm(out + x * self.scale) if self.post_norm else x + out


def final_norm(dim: int, config: RetrievalLayersConfig) -> nn.Module:
    if config.use_deepnet:  # post-norm blocks end normalised already
        return nn.Identity()
    return Residual(dim, config, None).norm


def feed_forward(dim: int, config: RetrievalLayersConfig, dropout: float) -> FeedForward:
    return FeedForward(
        dim, int(config.ff_mult * dim), activation="gelu", bias=True, activation_dropout=dropout
    )


def chunked_cross_attention(dim: int, config: RetrievalLayersConfig) -> ChunkedCrossAttention:
    """A decoder's CCA over ``dim``-wide hidden states (RETRO's decoder layers and a RETRO-fitted base's)."""
    return ChunkedCrossAttention(
        dim,
        config.chunk_size,
        heads=config.heads,
        dim_head=config.dim_head,
        dropout=config.dec_attn_dropout,
        rotary_dim=config.rotary_dim,
        query_positions=config.cca_query_positions,
    )


class RetroEncoderLayer(nn.Module):
    def __init__(self, config: RetrievalLayersConfig, has_cross_attn: bool) -> None:
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

    def __init__(self, config: RetrievalLayersConfig) -> None:
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


def init_retrieval_weights(module: nn.Module) -> None:
    """RETRO's initialisation beyond transformers' default (which runs first): zeroed CCA output
    projections (``zero_init``), unit norm gains, normal null keys and values."""
    if getattr(module, "zero_init", False):  # RetroConfig.zero_init_cca; drawn first, so that every
        init.zeros_(module.weight)  # other weight is initialised exactly as without the option
        init.zeros_(module.bias)
    if isinstance(module, ScaledL2Norm):
        init.ones_(module.gamma)
    if isinstance(module, GatedScaledL2Norm):
        init.ones_(module.weight)
    if isinstance(module, Attention) and module.null_k is not None:
        init.normal_(module.null_k)
        init.normal_(module.null_v)
