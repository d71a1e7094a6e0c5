"""The sub-layers RETRO's encoder and decoder layers are built from, as the config sets them: the residual
wrapper with its norm (pre-norm, or DeepNet post-norm; retro-pytorch's scaled L2 norm, its gated variant,
or LayerNorm for DeepNet), the final norm, the decoder's chunked cross-attention, and the feed-forward."""

from __future__ import annotations

from torch import Tensor, nn

from retlm.layers.attention import ChunkedCrossAttention
from retlm.layers.feedforward import FeedForward
from retlm.layers.norm import GatedScaledL2Norm, ScaledL2Norm
from retlm.models.retro.configuration_retro import RetroConfig

__all__ = ["GatedScaledL2Norm", "Residual", "chunked_cross_attention", "feed_forward", "final_norm"]


class Residual(nn.Module):
    """A residual around a sub-layer: pre-norm ``x + f(norm(x))``, or DeepNet post-norm
    ``norm(f(x) + scale * x)``. Call ``pre(x)`` for the sub-layer input, ``post(x, f_out)`` after it."""

    def __init__(self, dim: int, config: RetroConfig, scale: float | None) -> None:
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


def final_norm(dim: int, config: RetroConfig) -> nn.Module:
    if config.use_deepnet:  # post-norm blocks end normalised already
        return nn.Identity()
    return Residual(dim, config, None).norm


def feed_forward(dim: int, config: RetroConfig, dropout: float) -> FeedForward:
    return FeedForward(
        dim, int(config.ff_mult * dim), activation="gelu", bias=True, activation_dropout=dropout
    )


def chunked_cross_attention(dim: int, config: RetroConfig) -> ChunkedCrossAttention:
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
