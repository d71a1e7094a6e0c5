"""Parallel retention: the whole call at once (T x T scores), i.e. the chunk formula with one block."""

from __future__ import annotations

from torch import Tensor

from retlm.ops.retention.common import (
    RetentionState,
    check_inputs,
    normalise,
    prepare,
    retention_chunks,
    token_positions,
)


def parallel_retention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_gamma: Tensor,
    *,
    position_offset: int | Tensor = 0,
    state: RetentionState | None = None,
    return_state: bool = False,
) -> tuple[Tensor, RetentionState | None]:
    """Retention over the whole call at once (T x T scores): the chunk formula with one chunk.

    Args:
        q, k: ``(batch, heads, seq, key_dim)``, already rotated and scaled.
        v: ``(batch, heads, seq, value_dim)``.
        log_gamma: ``(heads,)``, log of each head's decay.
        position_offset: absolute position of the first token, an int or a LongTensor ``(batch,)``.
        state: ``(kv, z)`` after the previous token, or None for a fresh start.
        return_state: also return the state after the last token.

    Returns:
        ``(out (batch, heads, seq, value_dim) in v's dtype, state or None)``.
    """
    check_inputs(q, k, v, log_gamma, position_offset, state)
    return run_parallel(q, k, v, log_gamma, position_offset, state, return_state)


def run_parallel(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_gamma: Tensor,
    position_offset: int | Tensor,
    state: RetentionState | None,
    return_state: bool,
) -> tuple[Tensor, RetentionState | None]:
    """:func:`parallel_retention` without the input checks."""
    out_dtype, seq_len = v.dtype, q.shape[2]
    q, k, v, state = prepare(q, k, v, state)
    decay_log_gamma = log_gamma.to(q.device, q.dtype)
    numerator, denominator, state = retention_chunks(q, k, v, state, decay_log_gamma, seq_len)
    out = normalise(numerator, denominator, log_gamma, token_positions(position_offset, seq_len, q.device))
    return out.to(out_dtype), (state if return_state else None)
