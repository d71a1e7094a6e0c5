"""Normalisation layers.

For standard RMSNorm and LayerNorm use ``torch.nn.RMSNorm`` / ``torch.nn.LayerNorm`` directly
(see :func:`build_norm`). :class:`ScaledL2Norm` is the RMSNorm variant that retro-pytorch uses,
needed to reproduce its logits exactly, and :class:`GatedScaledL2Norm` its gated variant.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ScaledL2Norm(nn.Module):
    """``x / clamp(||x|| * dim^-1/2, eps) * gamma`` over the last dim (retro-pytorch's RMSNorm).

    Unlike ``nn.RMSNorm`` the epsilon clamps the norm instead of being added under the root.
    """

    def __init__(self, dim: int, eps: float = 1e-8) -> None:
        super().__init__()
        self.scale = dim**-0.5
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        norm = x.norm(dim=-1, keepdim=True) * self.scale
        return x / norm.clamp(min=self.eps) * self.gamma


class GatedScaledL2Norm(ScaledL2Norm):
    """retro-pytorch's gated RMSNorm: ``ScaledL2Norm(x) * sigmoid(x * weight)``."""

    def __init__(self, dim: int, eps: float = 1e-8) -> None:
        super().__init__(dim, eps)
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) * (x * self.weight).sigmoid()


def build_norm(kind: str, dim: int, eps: float, *, elementwise_affine: bool = True) -> nn.Module:
    """``kind``: "rmsnorm" (torch.nn.RMSNorm), "layernorm" (torch.nn.LayerNorm) or "scaled_l2"."""
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps, elementwise_affine=elementwise_affine)
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, elementwise_affine=elementwise_affine)
    if kind == "scaled_l2":
        return ScaledL2Norm(dim, eps=eps)
    raise ValueError(f"unknown norm {kind!r}; expected one of 'rmsnorm', 'layernorm', 'scaled_l2'")
