"""Chunkwise retention through flash-linear-attention (fla)'s GPU kernel: an optional fast path.

:func:`retlm.ops.retention.chunkwise.run_chunkwise` takes this path only when :func:`fla_available`
says so; it is never taken on CPU (fla itself is imported only then). UNTESTED on a GPU: none was
available when this was written (the glue is tested on CPU against an emulated kernel).

fla's kernel computes only the unnormalised decayed sums, with the fixed decays gamma_h = 1 - 2^(-5-h)
(``decay_gammas(heads, use_default_gamma=True)``). We feed it an extra all-ones value channel, whose
output is the denominator (z is the state of that channel), and normalise ourselves. The path is used
only after a one-time numerical comparison with the reference chunk formula
(:func:`retlm.ops.retention.common.retention_chunks`) succeeds for the device and dtype.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from retlm.ops.retention.common import (
    RetentionState,
    decay_gammas,
    empty_state,
    normalise,
    retention_chunks,
    token_positions,
)

_FLA_CHECKED: dict[tuple[torch.device, torch.dtype], bool] = {}


@functools.cache
def _fla_kernel():
    try:
        from fla.ops.retention import chunk_retention
    except Exception:  # noqa: BLE001 - any import failure (no triton, no fla) means "not available"
        return None
    return chunk_retention


def fla_log_gamma(num_heads: int) -> Tensor:
    """fla's fixed per-head log decays ``(heads,)`` in float64: log(1 - 2^(-5-h))."""
    return decay_gammas(num_heads, use_default_gamma=True).log()


def fla_available(q: Tensor, log_gamma: Tensor) -> bool:
    """True only for CUDA inputs, with fla installed, fla's decay schedule, and a passed self-check."""
    if not q.is_cuda or q.dtype == torch.float64 or _fla_kernel() is None:
        return False
    expected = fla_log_gamma(log_gamma.shape[0]).to(log_gamma.device)
    if not torch.allclose(log_gamma.to(torch.float64), expected, rtol=0, atol=1e-12):
        return False
    key = (q.device, q.dtype)
    if key not in _FLA_CHECKED:
        _FLA_CHECKED[key] = _fla_self_check(q.device, q.dtype)
    return _FLA_CHECKED[key]


def _fla_unnormalised(
    q: Tensor, k: Tensor, v: Tensor, state: RetentionState
) -> tuple[Tensor, Tensor, RetentionState]:
    """fla's decayed sums with a ones channel appended to v: ``(numerator, denominator, new state)``."""
    kv, z = state
    ones = torch.ones_like(v[..., :1])
    values = torch.cat([v, ones], dim=-1)
    initial = torch.cat([kv, z[..., None]], dim=-1)
    layout = (0, 2, 1, 3)  # (b, h, t, d) <-> fla's (b, t, h, d)
    out, final = _fla_kernel()(
        q.permute(layout),
        k.permute(layout),
        values.permute(layout),
        scale=1.0,
        initial_state=initial,
        output_final_state=True,
    )
    out = out.permute(layout).float()
    return out[..., :-1], out[..., -1], (final[..., :-1].float(), final[..., -1].float())


def _fla_self_check(device: torch.device, dtype: torch.dtype) -> bool:
    try:
        gen = torch.Generator(device="cpu").manual_seed(0)
        b, h, t, dk, dv = 2, 4, 100, 32, 32
        q, k, v = (torch.randn(b, h, t, d, generator=gen) for d in (dk, dk, dv))
        state = (torch.randn(b, h, dk, dv, generator=gen), torch.randn(b, h, dk, generator=gen))
        log_gamma = fla_log_gamma(h).float()
        want_num, want_den, (want_kv, want_z) = retention_chunks(q, k, v, state, log_gamma, t)
        got_num, got_den, (got_kv, got_z) = _fla_unnormalised(
            *(x.to(device, dtype) for x in (q, k, v)), tuple(s.to(device) for s in state)
        )
        # float32 must meet the modes' own agreement (so TF32 kernels are refused); half precision only
        # has to be as close as rounding the inputs allows.
        tolerance = 1e-5 if dtype == torch.float32 else 1e-2
        return all(
            ((got.cpu() - want).norm() / want.norm()).item() < tolerance
            for got, want in ((got_num, want_num), (got_den, want_den), (got_kv, want_kv), (got_z, want_z))
        )
    except Exception:  # noqa: BLE001 - a failing kernel simply disables the fast path
        return False


def fla_chunkwise_retention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_gamma: Tensor,
    position_offset: int | Tensor,
    state: RetentionState | None,
    return_state: bool,
) -> tuple[Tensor, RetentionState | None]:
    """:func:`retlm.ops.retention.chunkwise_retention` through fla's kernel (state kept in float32).

    ``q, k (batch, heads, seq, key_dim)``, ``v (batch, heads, seq, value_dim)``, ``log_gamma (heads,)``;
    inputs are not checked here (the public entry did). Returns ``(out (batch, heads, seq, value_dim) in
    v's dtype, state or None)``.
    """
    out_dtype = v.dtype
    state = empty_state(q, v, torch.float32) if state is None else tuple(s.float() for s in state)
    numerator, denominator, state = _fla_unnormalised(q, k, v, state)
    positions = token_positions(position_offset, q.shape[2], q.device)
    out = normalise(numerator, denominator, log_gamma, positions)
    return out.to(out_dtype), (state if return_state else None)
