"""The one place a retention mode is chosen: :func:`retention` (checked) and :func:`run_retention` (for
callers whose inputs are valid by construction) call the mode's implementation."""

from __future__ import annotations

from torch import Tensor

from retlm.ops.retention.chunkwise import run_chunkwise
from retlm.ops.retention.common import RetentionState, check_inputs, check_mode
from retlm.ops.retention.parallel import run_parallel
from retlm.ops.retention.recurrent import run_recurrent
from retlm.utils import renamed_argument


def retention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_gamma: Tensor,
    *,
    retention_mode: str | None = None,
    block_size: int | None = None,
    position_offset: int | Tensor = 0,
    state: RetentionState | None = None,
    return_state: bool = False,
    mode: str | None = None,
    chunk_size: int | None = None,
) -> tuple[Tensor, RetentionState | None]:
    """Dispatch to the ``retention_mode`` ("parallel", "chunkwise" or "recurrent") implementation; all
    three compute the same function. ``block_size`` is required for "chunkwise" and ignored otherwise.
    Shapes as in :func:`~retlm.ops.retention.parallel_retention`. ``mode`` and ``chunk_size`` are the
    deprecated names of ``retention_mode`` and ``block_size``.
    """
    retention_mode = renamed_argument("retention", "mode", "retention_mode", mode, retention_mode)
    block_size = renamed_argument("retention", "chunk_size", "block_size", chunk_size, block_size)
    check_mode(retention_mode, block_size)
    check_inputs(q, k, v, log_gamma, position_offset, state)
    kwargs = dict(position_offset=position_offset, state=state, return_state=return_state)
    return run_retention(q, k, v, log_gamma, retention_mode=retention_mode, block_size=block_size, **kwargs)


def run_retention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_gamma: Tensor,
    *,
    retention_mode: str,
    block_size: int | None = None,
    position_offset: int | Tensor = 0,
    state: RetentionState | None = None,
    return_state: bool = False,
) -> tuple[Tensor, RetentionState | None]:
    """:func:`retention` without the input checks, for callers whose inputs are valid by construction
    (:class:`retlm.layers.retention.MultiScaleRetention`). Same arguments, shapes and result."""
    if retention_mode == "parallel":
        return run_parallel(q, k, v, log_gamma, position_offset, state, return_state)
    if retention_mode == "chunkwise":
        return run_chunkwise(q, k, v, log_gamma, block_size, position_offset, state, return_state)
    if retention_mode == "recurrent":
        return run_recurrent(q, k, v, log_gamma, position_offset, state, return_state)
    check_mode(retention_mode, block_size)  # raises: not one of RETENTION_MODES
    raise AssertionError(retention_mode)
