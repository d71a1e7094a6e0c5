"""Feed-forward blocks: the plain two-layer MLP and the gated (GLU) variant.

Parameter names follow torchscale (``fc1``, ``gate``, ``fc2``) so that imports are a rename-free
copy for RetNet; retro-pytorch's ``ff.0`` / ``ff.3`` map onto ``fc1`` / ``fc2``.
"""

from __future__ import annotations

from torch import Tensor, nn
from transformers.activations import ACT2FN


class FeedForward(nn.Module):
    """``fc2(act(fc1 x) [* gate x])`` with dropout.

    x: ``(..., dim)`` -> ``(..., dim)``. ``activation`` is any key of ``transformers.ACT2FN``
    ("gelu" is the exact erf GELU, "swish"/"silu", "relu", ...).
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        *,
        activation: str = "gelu",
        glu: bool = False,
        bias: bool = False,
        dropout: float = 0.0,
        activation_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if activation not in ACT2FN:
            raise ValueError(f"unknown activation {activation!r}; expected one of {sorted(ACT2FN)}")
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.gate = nn.Linear(dim, hidden_dim, bias=bias) if glu else None
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias)
        self.act = ACT2FN[activation]
        self.activation_dropout = nn.Dropout(activation_dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.act(self.fc1(x))
        if self.gate is not None:
            hidden = hidden * self.gate(x)
        if not self.training:  # both dropouts are the identity; decoding skips the calls
            return self.fc2(hidden)
        return self.dropout(self.fc2(self.activation_dropout(hidden)))
