"""Recurrent retention: one token at a time, kv <- gamma kv + k v^T, z <- gamma z + k (the decoding
path). :func:`recurrent_step` is one token of it, with its constants (:func:`step_decay`) precomputed."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from retlm.ops.retention.common import (
    RetentionState,
    apply_normaliser,
    check_inputs,
    inv_sqrt_rowsum,
    prepare,
)


def recurrent_retention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_gamma: Tensor,
    *,
    position_offset: int | Tensor = 0,
    state: RetentionState | None = None,
    return_state: bool = False,
) -> tuple[Tensor, RetentionState | None]:
    """Retention one token at a time (seq may be > 1): kv <- gamma kv + k v^T, z <- gamma z + k.
    Same arguments and result as
    :func:`~retlm.ops.retention.parallel_retention`; the per-token cost is independent of the
    context length. Each token is one :func:`recurrent_step` (the decoding path), so the two cannot
    drift apart.
    """
    check_inputs(q, k, v, log_gamma, position_offset, state)
    return run_recurrent(q, k, v, log_gamma, position_offset, state, return_state)


def run_recurrent(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_gamma: Tensor,
    position_offset: int | Tensor,
    state: RetentionState | None,
    return_state: bool,
) -> tuple[Tensor, RetentionState | None]:
    """:func:`recurrent_retention` without the input checks."""
    out_dtype = v.dtype
    q, k, v, state = prepare(q, k, v, state)
    decay = step_decay(log_gamma.to(q.device), q.dtype)
    outputs = []
    for t in range(q.shape[2]):
        q_t, k_t, v_t = q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1]
        out, state = recurrent_step(q_t, k_t, v_t, decay, position_offset=position_offset + t, state=state)
        outputs.append(out)
    return torch.cat(outputs, dim=2).to(out_dtype), (state if return_state else None)


class StepDecay(NamedTuple):
    """Per-head constants of the recurrent update, each ``(heads, 1)``; built by :func:`step_decay`."""

    gamma_hi: Tensor  # gamma rounded to the compute dtype
    gamma_lo: Tensor  # gamma - gamma_hi, in the compute dtype (see recurrent_update)
    log_gamma: Tensor  # float64
    log_one_minus_gamma: Tensor  # float64: log(1 - gamma), the constant part of log S_n
    gamma_hi_kv: Tensor  # gamma_hi as (heads, 1, 1), against kv (batch, heads, key_dim, value_dim)
    gamma_lo_kv: Tensor  # gamma_lo as (heads, 1, 1)


def step_decay(log_gamma: Tensor, dtype: torch.dtype) -> StepDecay:
    """The constants of :func:`recurrent_update` and of the normalisation for ``log_gamma (heads,)``,
    on its device, for compute dtype ``dtype`` (float32 or float64). Cache it to decode cheaply."""
    log_gamma = log_gamma.to(torch.float64)[:, None]
    gamma = log_gamma.exp()
    gamma_hi = gamma.to(dtype)
    gamma_lo = (gamma - gamma_hi.to(torch.float64)).to(dtype)
    log_one_minus_gamma = torch.log(-torch.expm1(log_gamma))
    return StepDecay(
        gamma_hi, gamma_lo, log_gamma, log_one_minus_gamma, gamma_hi[..., None], gamma_lo[..., None]
    )


def step_inv_sqrt_rowsum(decay: StepDecay, position_offset: int | Tensor, dtype: torch.dtype) -> Tensor:
    """The normaliser's ``1 / sqrt(S_n)`` of one token at ``position_offset`` (an int, or a LongTensor
    ``(batch,)``), in ``dtype``: ``(heads, 1)``, or ``(batch, heads, 1)`` per row; negative n as n = 0."""
    if isinstance(position_offset, Tensor):  # per row: (batch,) -> (batch, 1, 1) against (heads, 1)
        n = position_offset.to(decay.log_gamma.device).clamp(min=0).to(torch.float64)[:, None, None]
    else:
        n = max(position_offset, 0)
    return inv_sqrt_rowsum(decay.log_gamma, decay.log_one_minus_gamma, n).to(dtype)


def recurrent_update(
    q_t: Tensor, k_t: Tensor, v_t: Tensor, kv: Tensor, z: Tensor, decay: StepDecay
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One token: kv <- gamma kv + k v^T, z <- gamma z + k, and the unnormalised outputs.

    ``q_t, k_t (b, h, 1, dk)``, ``v_t (b, h, 1, dv)``, state ``kv (b, h, dk, dv)``, ``z (b, h, dk)``, all in
    the compute dtype. Returns ``(numerator q kv (b, h, 1, dv), denominator q . z (b, h, 1), kv, z)``.
    """
    # gamma = gamma_hi + gamma_lo. Multiplying by a rounded gamma at every step biases a contribution of
    # age a by a * ulp(gamma) (up to 1e-5 relative in float32 for slow heads). The low part restores
    # it, but only if added together with the new k v^T (bracketed): added on its own to the rounded
    # gamma_hi * kv, it is below half an ulp and always rounds away.
    k_row = k_t.squeeze(2)  # (b, h, dk)
    kv = decay.gamma_hi_kv * kv + (decay.gamma_lo_kv * kv + k_t.transpose(-1, -2) * v_t)
    z = decay.gamma_hi * z + (decay.gamma_lo * z + k_row)
    return q_t @ kv, (q_t.squeeze(2) * z).sum(-1, keepdim=True), kv, z


def recurrent_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    decay: StepDecay,
    *,
    position_offset: int | Tensor = 0,
    state: RetentionState | None = None,
    inverse: Tensor | None = None,
) -> tuple[Tensor, RetentionState]:
    """:func:`recurrent_retention` for a single token, always returning the new state: the decoding
    hot path. Same result, bit for bit, with fewer small ops: ``decay = step_decay(log_gamma, dtype)``
    is precomputed by the caller, and there is no loop, stacking or position table. ``inverse``, the
    normaliser's ``1 / sqrt(S_n)`` at this position in the compute dtype, may be precomputed too (it is
    the same for every layer); otherwise it is derived from ``position_offset``.

    q, k ``(batch, heads, 1, key_dim)``, v ``(batch, heads, 1, value_dim)``; ``dtype`` of the decay must be
    the compute dtype (float64 if any of q, k, v is float64, else float32). Nothing is checked here,
    at every token: the model checks its inputs once on entry, :func:`recurrent_retention` on its own.
    """
    out_dtype = v.dtype
    q, k, v, (kv, z) = prepare(q, k, v, state)
    numerator, denominator, kv, z = recurrent_update(q, k, v, kv, z, decay)

    if inverse is None:
        inverse = step_inv_sqrt_rowsum(decay, position_offset, q.dtype)
    out = apply_normaliser(numerator, denominator, inverse)
    return (out if out.dtype == out_dtype else out.to(out_dtype)), (kv, z)  # a no-op .to still dispatches
