"""Rotary position rotation (RoPE) and its xpos variant, usable at any absolute offset.

Two layouts exist in the wild and both are needed to import peer weights exactly:
- interleaved: pairs are (x0, x1), (x2, x3), ... (torchscale / RetNet): :func:`interleaved_rotation`
  and :func:`apply_interleaved_rotation`.
- rotate half: pairs are (x_i, x_{i + d/2}) (GPT-NeoX, retro-pytorch): :func:`rotary_angles` and
  :func:`apply_rotary`.

Only the first ``2 * len(inv_freq)`` features of each head are rotated; the rest pass through
(retro-pytorch rotates only the first 32 dims of a head).
"""

from __future__ import annotations

import torch
from torch import Tensor


def standard_inv_freq(rotary_dim: int, base: float = 10000.0) -> Tensor:
    """Frequencies ``base^(-2i/rotary_dim)`` for i in [0, rotary_dim/2). Shape ``(rotary_dim // 2,)``."""
    return 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)


def torchscale_inv_freq(rotary_dim: int, base: float = 10000.0) -> Tensor:
    """torchscale's RetNet frequencies ``base^(-linspace(0, 1, rotary_dim/2))`` (note: the last
    frequency is exactly ``1/base``). Shape ``(rotary_dim // 2,)``."""
    return 1.0 / base ** torch.linspace(0, 1, rotary_dim // 2, dtype=torch.float64)


def rotary_angles(positions: Tensor, inv_freq: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin of ``position * inv_freq``.

    positions: ``(seq,)`` or ``(batch, seq)`` absolute positions (any integer, also negative).
    Returns cos, sin of shape ``(seq, rotary_dim // 2)`` or ``(batch, 1, seq, rotary_dim // 2)``,
    ready to broadcast against ``(batch, heads, seq, rotary_dim // 2)``.
    The angle is formed in float64 so that large offsets lose no precision before the cast.
    """
    angles = positions.to(torch.float64)[..., None] * inv_freq.to(positions.device, torch.float64)
    if angles.dim() == 3:
        angles = angles[:, None]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the leading ``2 * cos.shape[-1]`` features of x, "rotate half" layout.

    x: ``(batch, heads, seq, head_dim)``; cos/sin from :func:`rotary_angles`.
    """
    rot = 2 * cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
    x1, x2 = x_rot.chunk(2, dim=-1)
    out = x_rot * cos + torch.cat((-x2, x1), dim=-1) * sin
    return torch.cat((out, x_pass), dim=-1) if x_pass.shape[-1] else out


def interleaved_rotation(angles: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(cos, signed_sin)`` in ``dtype`` for float64 ``angles (..., head_dim)`` that hold each pair's angle
    twice (``positions * inv_freq.repeat_interleave(2)``): with pairs (x0, x1) and angle a,
    x0' = x0 cos a - x1 sin a and x1' = x1 cos a + x0 sin a."""
    sign = pair_signs(angles.shape[-1], angles.dtype, angles.device)
    return angles.cos().to(dtype), (angles.sin() * sign).to(dtype)


_PAIR_SIGNS: dict[tuple, Tensor] = {}


def pair_signs(width: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``(-1, 1, -1, 1, ...)`` of length ``width`` (a constant, built once per width, dtype and device)."""
    key = (width, dtype, device)
    sign = _PAIR_SIGNS.get(key)
    if sign is None:
        with torch.inference_mode(False):  # usable inside and outside inference mode
            sign = torch.tensor([-1.0, 1.0], dtype=dtype, device=device).repeat(width // 2)
        _PAIR_SIGNS[key] = sign
    return sign


def apply_interleaved_rotation(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """``x * cos + swap_pairs(x) * signed_sin``: the interleaved rotation of ``x (..., head_dim)``."""
    return x * cos + swap_pairs(x) * signed_sin


def swap_pairs(x: Tensor) -> Tensor:
    """(x0, x1, x2, x3, ...) -> (x1, x0, x3, x2, ...) over the last dim."""
    return x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)


def xpos_scale(positions: Tensor, rotary_dim: int, scale_base: float, dtype: torch.dtype) -> Tensor:
    """xpos magnitude ``zeta_i ^ (position / scale_base)``, zeta_i = (2i + 0.4 d) / (1.4 d).

    Multiply q by it and divide k by it: q·k then depends on the relative position only.
    Shape ``(seq, rotary_dim)`` or ``(batch, 1, seq, rotary_dim)`` (interleaved pairs share a value).
    """
    zeta = (torch.arange(0, rotary_dim, 2, dtype=torch.float64) + 0.4 * rotary_dim) / (1.4 * rotary_dim)
    power = positions.to(torch.float64)[..., None] / scale_base
    scale = (zeta.to(positions.device) ** power).repeat_interleave(2, dim=-1)
    if scale.dim() == 3:
        scale = scale[:, None]
    return scale.to(dtype)
