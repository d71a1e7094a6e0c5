"""Chunkwise retention: ``block_size`` x ``block_size`` scores inside a block, the carried state
``(kv, z)`` for everything before it. The one place that picks the fla GPU backend
(:mod:`retlm.ops.retention.fla`) over the reference below."""

from __future__ import annotations

import torch
from torch import Tensor

from retlm.ops.retention.common import (
    RetentionState,
    check_block_size,
    check_inputs,
    normalise,
    prepare,
    retention_chunks,
    token_positions,
)
from retlm.ops.retention.fla import fla_available, fla_chunkwise_retention
from retlm.utils import renamed_argument


def chunkwise_retention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_gamma: Tensor,
    *,
    block_size: int | None = None,
    position_offset: int | Tensor = 0,
    state: RetentionState | None = None,
    return_state: bool = False,
    chunk_size: int | None = None,
) -> tuple[Tensor, RetentionState | None]:
    """Retention block by block: ``block_size`` x ``block_size`` scores inside a block, the carried state
    ``(kv, z)`` for everything before it. Same arguments and result as
    :func:`~retlm.ops.retention.parallel_retention`; ``block_size`` need not divide the sequence length
    (``chunk_size``: its deprecated name). CUDA inputs may go through fla's kernel
    (:mod:`retlm.ops.retention.fla`) when it is installed and passes its self-check.
    """
    block_size = renamed_argument("chunkwise_retention", "chunk_size", "block_size", chunk_size, block_size)
    check_inputs(q, k, v, log_gamma, position_offset, state)
    check_block_size(block_size)
    return run_chunkwise(q, k, v, log_gamma, block_size, position_offset, state, return_state)


def run_chunkwise(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_gamma: Tensor,
    block_size: int,
    position_offset: int | Tensor,
    state: RetentionState | None,
    return_state: bool,
) -> tuple[Tensor, RetentionState | None]:
    """:func:`chunkwise_retention` without the input checks: fla's kernel where it is available, else
    the reference."""
    if fla_available(q, log_gamma):
        return fla_chunkwise_retention(q, k, v, log_gamma, position_offset, state, return_state)
    out_dtype, seq_len = v.dtype, q.shape[2]
    q, k, v, state = prepare(q, k, v, state)

    # All full blocks in one batched pass, then the remainder (if any) as one shorter block.
    decay_log_gamma = log_gamma.to(q.device, q.dtype)
    block_size = min(block_size, seq_len)
    split = seq_len - seq_len % block_size
    numerator, denominator, state = retention_chunks(
        q[:, :, :split], k[:, :, :split], v[:, :, :split], state, decay_log_gamma, block_size
    )
    if split < seq_len:
        tail_numerator, tail_denominator, state = retention_chunks(
            q[:, :, split:], k[:, :, split:], v[:, :, split:], state, decay_log_gamma, seq_len - split
        )
        numerator = torch.cat([numerator, tail_numerator], dim=2)
        denominator = torch.cat([denominator, tail_denominator], dim=2)

    positions = token_positions(position_offset, seq_len, q.device)
    out = normalise(numerator, denominator, log_gamma, positions)
    return out.to(out_dtype), (state if return_state else None)
