"""Retention (RetNet, arXiv 2307.08621): one definition, three interchangeable ways to compute it.

The definition is the paper's / torchscale 0.3.0's parallel form. For one batch row and one head with
decay gamma in (0, 1), at absolute positions n (the row's first token ever seen is position 0):

    S_n    = sum_{m=0..n} gamma^(n-m) = (1 - gamma^(n+1)) / (1 - gamma)
    R[n,m] = (q_n . k_m) * gamma^(n-m) / sqrt(S_n)            for m <= n, else 0
    out_n  = (sum_m R[n,m] v_m) / max(|sum_m R[n,m]|, 1)

Everything before position n enters through two decayed running sums, the recurrent state

    kv_n = sum_{m<=n} gamma^(n-m) k_m v_m^T        (batch, heads, key_dim, value_dim)
    z_n  = sum_{m<=n} gamma^(n-m) k_m              (batch, heads, key_dim)

because sum_m R[n,m] v_m = q_n kv_n / sqrt(S_n) and sum_m R[n,m] = q_n . z_n / sqrt(S_n). S_n has a
closed form. So the numerator, the denominator and hence the clamp are exact in every mode:

- parallel:  the whole call is one chunk of the chunk formula below (T x T scores).
- chunkwise: chunks of ``chunk_size`` tokens: scores inside each chunk, and the state (kv, z)
             carried from chunk to chunk for everything before it.
- recurrent: a loop over tokens, updating (kv, z) one token at a time (the decoding path).

Chunk formula, for a chunk of L tokens with incoming state (kv, z) (the state after the token
just before the chunk), chunk-local indices i, j in [0, L):

    A[i,j]   = (q_i . k_j) gamma^(i-j)  for j <= i, else 0
    num_i    = sum_j A[i,j] v_j + gamma^(i+1) q_i kv
    den_i    = sum_j A[i,j]     + gamma^(i+1) q_i . z
    kv'      = gamma^L kv + sum_j gamma^(L-1-j) k_j v_j^T,   z' likewise with v_j -> 1

and then out = (num / sqrt(S)) / max(|den| / sqrt(S), 1) per token. Only decay differences
(i - j >= 0) are ever exponentiated, so nothing overflows at any length or offset.

Half-precision inputs are computed in float32 (scores, decays and state); float64 stays float64.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from einops import rearrange
from torch import Tensor

RetentionState = tuple[Tensor, Tensor]  # (kv (batch, heads, key_dim, value_dim), z (batch, heads, key_dim))

# The three ways to compute retention; models call the choice `forward_impl` (RetNet: syncdoth/RetNet's
# argument name, kept so its code runs unchanged) or `retnet_mode` (RETRO's RetNet decoder). This tuple
# is their one definition.
RETENTION_MODES = ("parallel", "chunkwise", "recurrent")

# The decay schedule every entry point (ops, MultiScaleRetention, RetNetConfig, RetroConfig) uses unless
# told otherwise: the paper's language-model schedule 1 - exp(linspace(log 1/32, log 1/512, H)). It is
# syncdoth/RetNet's RetNetConfig default (its configs load unchanged), and it spreads the heads' memory
# spans from 32 to 512 tokens whatever the head count. torchscale's schedule (1 - 2^(-5-h)) is
# use_default_gamma=True, which the torchscale importer sets explicitly.
USE_DEFAULT_GAMMA = False


def decay_gammas(num_heads: int, *, use_default_gamma: bool = USE_DEFAULT_GAMMA) -> Tensor:
    """Per-head decays ``(heads,)`` in float64.

    ``use_default_gamma``: 1 - 2^(-5-h) (torchscale's schedule); otherwise the paper's language-model
    schedule 1 - exp(linspace(log 1/32, log 1/512, heads)).
    """
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive integer, got {num_heads!r}")
    if use_default_gamma:
        return 1 - 2.0 ** (-5.0 - torch.arange(num_heads, dtype=torch.float64))
    log_rates = torch.linspace(math.log(1 / 32), math.log(1 / 512), num_heads, dtype=torch.float64)
    return 1 - log_rates.exp()


# --------------------------------------------------------------------------------------------------
# Building blocks shared by the three modes
# --------------------------------------------------------------------------------------------------


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half precision is widened)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def chunk_decays(log_gamma: Tensor, length: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Decay factors of a chunk of ``length`` tokens, for ``log_gamma (heads,)``.

    Returns ``inner (heads, L, L)`` = gamma^(i-j) for j <= i else 0, ``query_decay (heads, L)`` =
    gamma^(i+1), ``key_decay (heads, L)`` = gamma^(L-1-j), ``chunk_decay (heads,)`` = gamma^L.
    """
    steps = torch.arange(length, device=log_gamma.device, dtype=log_gamma.dtype)
    distance = steps[:, None] - steps[None, :]
    log_gamma = log_gamma[:, None]
    inner = torch.exp(log_gamma[..., None] * distance.clamp(min=0)).tril()
    query_decay = torch.exp(log_gamma * (steps + 1))
    key_decay = torch.exp(log_gamma * (length - 1 - steps))
    chunk_decay = torch.exp(log_gamma[:, 0] * length)
    return inner, query_decay, key_decay, chunk_decay


def retention_chunks(
    q: Tensor, k: Tensor, v: Tensor, state: RetentionState, log_gamma: Tensor, chunk_size: int
) -> tuple[Tensor, Tensor, RetentionState]:
    """The chunk formula over a sequence of equal chunks (seq must be a multiple of ``chunk_size``).

    ``q, k (b, h, seq, dk)``, ``v (b, h, seq, dv)``, ``state`` before the first token, ``log_gamma
    (heads,)`` in the compute dtype. Returns the unnormalised ``numerator (b, h, seq, dv)`` and
    ``denominator (b, h, seq)``, and the state after the last token. The state is carried from chunk to
    chunk in a loop; the per-chunk work is batched over all chunks at once.
    """
    inner, query_decay, key_decay, chunk_decay = chunk_decays(log_gamma, chunk_size)
    q, k, v = (rearrange(x, "b h (n c) d -> b h n c d", c=chunk_size) for x in (q, k, v))

    # What each chunk adds to the state, then the state entering each chunk (the only sequential part).
    decayed_k = k * key_decay[:, None, :, None]
    chunk_kv, chunk_z = decayed_k.transpose(-1, -2) @ v, decayed_k.sum(-2)
    kv, z = state
    kv_in, z_in = [], []
    for c in range(q.shape[2]):
        kv_in.append(kv)
        z_in.append(z)
        kv = chunk_decay[:, None, None] * kv + chunk_kv[:, :, c]
        z = chunk_decay[:, None] * z + chunk_z[:, :, c]
    kv_in, z_in = torch.stack(kv_in, dim=2), torch.stack(z_in, dim=2)

    # Inner part (the chunk's own keys) + cross part (everything before the chunk, via its state).
    scores = (q @ k.transpose(-1, -2)) * inner[:, None]
    numerator = scores @ v + query_decay[:, None, :, None] * (q @ kv_in)
    denominator = scores.sum(-1) + query_decay[:, None] * (q @ z_in[..., None]).squeeze(-1)
    numerator = rearrange(numerator, "b h n c d -> b h (n c) d")
    return numerator, rearrange(denominator, "b h n c -> b h (n c)"), (kv, z)


def token_positions(position_offset: int | Tensor, seq_len: int, device: torch.device) -> Tensor:
    """Absolute positions of a call's tokens: ``(seq,)`` for an int offset, ``(batch, seq)`` for a per-row
    ``(batch,)`` one (left padding puts a row's pads at negative positions)."""
    steps = torch.arange(seq_len, device=device)
    if isinstance(position_offset, Tensor):
        return position_offset.to(device)[:, None] + steps
    return steps + position_offset


def inv_sqrt_rowsum(log_gamma: Tensor, log_one_minus_gamma: Tensor, n: Tensor | int) -> Tensor:
    """1 / sqrt(S_n) = exp(-(log(1 - gamma^(n+1)) - log(1 - gamma)) / 2), in float64.

    ``log_gamma``, ``log_one_minus_gamma (heads, 1)`` float64; ``n >= 0``: an int or a float64 tensor that
    broadcasts against them. expm1 keeps 1 - gamma^(n+1) accurate for slow decays and small n.
    """
    log_rowsum = torch.log(-torch.expm1(log_gamma * (n + 1))) - log_one_minus_gamma
    return torch.exp(-0.5 * log_rowsum)


def apply_normaliser(numerator: Tensor, denominator: Tensor, inv_sqrt_rowsum: Tensor) -> Tensor:
    """(num / sqrt(S)) / max(|den| / sqrt(S), 1); ``numerator (b, h, T, dv)``, ``denominator (b, h, T)``."""
    denominator = (denominator * inv_sqrt_rowsum).abs().clamp(min=1)
    return numerator * (inv_sqrt_rowsum / denominator)[..., None]


def normalise(numerator: Tensor, denominator: Tensor, log_gamma: Tensor, positions: Tensor) -> Tensor:
    """out = (num / sqrt(S_n)) / max(|den| / sqrt(S_n), 1), with S_n = (1 - gamma^(n+1)) / (1 - gamma).

    ``numerator (b, h, T, dv)``, ``denominator (b, h, T)``, ``positions (T,)`` or ``(b, T)``. Padding sits at
    negative positions; there S is taken at n = 0 (those outputs are don't-care, but stay finite).
    """
    log_gamma = log_gamma.to(torch.float64)[:, None]  # (h, 1)
    n = positions.clamp(min=0).to(torch.float64)[..., None, :]  # (1, T) or (b, 1, T)
    inverse = inv_sqrt_rowsum(log_gamma, torch.log(-torch.expm1(log_gamma)), n)
    return apply_normaliser(numerator, denominator, inverse.to(numerator.dtype))


def empty_state(q: Tensor, v: Tensor, dtype: torch.dtype) -> RetentionState:
    batch, heads, _, key_dim = q.shape
    kv = q.new_zeros(batch, heads, key_dim, v.shape[-1], dtype=dtype)
    return kv, q.new_zeros(batch, heads, key_dim, dtype=dtype)


def check_inputs(
    q: Tensor, k: Tensor, v: Tensor, log_gamma: Tensor, position_offset: int | Tensor, state
) -> None:
    """Raise ValueError on shapes or values that do not fit the contract."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            "q, k, v must be 4-D (batch, heads, seq, dim); got shapes "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape != k.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            "expected q, k of the same shape (batch, heads, seq, key_dim) and v of shape (batch, heads, "
            f"seq, value_dim); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[2] < 1:
        raise ValueError("the sequence length (dim 2 of q, k, v) must be >= 1, got 0")
    if not (q.is_floating_point() and k.is_floating_point() and v.is_floating_point()):
        raise ValueError(f"q, k, v must be floating point; got {q.dtype}, {k.dtype}, {v.dtype}")
    batch, heads, _, key_dim = q.shape
    if log_gamma.shape != (heads,):
        raise ValueError(f"log_gamma must have shape (heads,) = ({heads},), got {tuple(log_gamma.shape)}")
    if not bool((log_gamma < 0).all()):
        raise ValueError("log_gamma must be negative (decays gamma in (0, 1))")
    if isinstance(position_offset, Tensor):
        if position_offset.is_floating_point() or position_offset.shape not in ((batch,), ()):
            raise ValueError(
                f"a tensor position_offset must be an integer tensor of shape (batch,) = ({batch},), got "
                f"{position_offset.dtype} {tuple(position_offset.shape)}"
            )
    elif isinstance(position_offset, bool) or not isinstance(position_offset, int):
        raise ValueError(f"position_offset must be an int or a LongTensor (batch,), got {position_offset!r}")
    if state is None:
        return
    if not isinstance(state, (tuple, list)) or len(state) != 2:
        raise ValueError("state must be a pair (kv, z)")
    kv, z = state
    expected_kv, expected_z = (batch, heads, key_dim, v.shape[-1]), (batch, heads, key_dim)
    if tuple(kv.shape) != expected_kv or tuple(z.shape) != expected_z:
        raise ValueError(
            f"state shapes must be kv {expected_kv} and z {expected_z} (batch, heads, key_dim, "
            f"value_dim); got {tuple(kv.shape)} and {tuple(z.shape)}"
        )


def check_chunk_size(chunk_size) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer (>= 1), got {chunk_size!r}")


def check_mode(mode: str, chunk_size: int | None) -> None:
    """Raise ValueError unless ``mode`` is one of :data:`RETENTION_MODES` (with a valid ``chunk_size`` for
    "chunkwise")."""
    if mode not in RETENTION_MODES:
        raise ValueError(f"unknown retention mode {mode!r}; expected one of {RETENTION_MODES}")
    if mode == "chunkwise":
        check_chunk_size(chunk_size)


def prepare(q: Tensor, k: Tensor, v: Tensor, state: RetentionState | None):
    """Cast q, k, v and the state to the compute dtype, and fill in an empty state."""
    dtype = compute_dtype(q, k, v)
    q, k, v = (x if x.dtype == dtype else x.to(dtype) for x in (q, k, v))  # a no-op .to still dispatches
    if state is None:
        return q, k, v, empty_state(q, v, dtype)
    kv, z = (x if x.dtype == dtype else x.to(dtype) for x in state)
    return q, k, v, (kv, z)


# --------------------------------------------------------------------------------------------------
# The three modes. Each public function checks its inputs once, at its entry, then runs the unchecked
# implementation of its mode. Layers call :func:`run_retention`, which skips the checks: their q, k, v
# and decays are valid by construction, and the model checked its own inputs (cache, mode) on entry.
# --------------------------------------------------------------------------------------------------


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
    return _parallel(q, k, v, log_gamma, position_offset, state, return_state)


def chunkwise_retention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_gamma: Tensor,
    *,
    chunk_size: int,
    position_offset: int | Tensor = 0,
    state: RetentionState | None = None,
    return_state: bool = False,
) -> tuple[Tensor, RetentionState | None]:
    """Retention chunk by chunk: ``chunk_size`` x ``chunk_size`` scores inside a chunk, the carried state
    ``(kv, z)`` for everything before it. Same arguments and result as :func:`parallel_retention`;
    ``chunk_size`` need not divide the sequence length. CUDA inputs may go through fla's kernel
    (:mod:`retlm.ops.retention_fla`) when it is installed and passes its self-check.
    """
    check_inputs(q, k, v, log_gamma, position_offset, state)
    check_chunk_size(chunk_size)
    return _chunkwise(q, k, v, log_gamma, chunk_size, position_offset, state, return_state)


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
    Same arguments and result as :func:`parallel_retention`; the per-token cost is independent of the
    context length. Each token is one :func:`recurrent_step` (the decoding path), so the two cannot
    drift apart.
    """
    check_inputs(q, k, v, log_gamma, position_offset, state)
    return _recurrent(q, k, v, log_gamma, position_offset, state, return_state)


def retention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_gamma: Tensor,
    *,
    mode: str,
    chunk_size: int | None = None,
    position_offset: int | Tensor = 0,
    state: RetentionState | None = None,
    return_state: bool = False,
) -> tuple[Tensor, RetentionState | None]:
    """Dispatch to the ``mode`` ("parallel", "chunkwise" or "recurrent") implementation; all three
    compute the same function. ``chunk_size`` is required for "chunkwise" and ignored otherwise.
    Shapes as in :func:`parallel_retention`.
    """
    check_mode(mode, chunk_size)
    check_inputs(q, k, v, log_gamma, position_offset, state)
    kwargs = dict(position_offset=position_offset, state=state, return_state=return_state)
    return run_retention(q, k, v, log_gamma, mode=mode, chunk_size=chunk_size, **kwargs)


def run_retention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_gamma: Tensor,
    *,
    mode: str,
    chunk_size: int | None = None,
    position_offset: int | Tensor = 0,
    state: RetentionState | None = None,
    return_state: bool = False,
) -> tuple[Tensor, RetentionState | None]:
    """:func:`retention` without the input checks, for callers whose inputs are valid by construction
    (:class:`retlm.layers.retention.MultiScaleRetention`). Same arguments, shapes and result."""
    if mode == "parallel":
        return _parallel(q, k, v, log_gamma, position_offset, state, return_state)
    if mode == "chunkwise":
        return _chunkwise(q, k, v, log_gamma, chunk_size, position_offset, state, return_state)
    if mode == "recurrent":
        return _recurrent(q, k, v, log_gamma, position_offset, state, return_state)
    check_mode(mode, chunk_size)  # raises: not one of RETENTION_MODES
    raise AssertionError(mode)


def _parallel(q, k, v, log_gamma, position_offset, state, return_state):
    out_dtype, seq_len = v.dtype, q.shape[2]
    q, k, v, state = prepare(q, k, v, state)
    decay_log_gamma = log_gamma.to(q.device, q.dtype)
    numerator, denominator, state = retention_chunks(q, k, v, state, decay_log_gamma, seq_len)
    out = normalise(numerator, denominator, log_gamma, token_positions(position_offset, seq_len, q.device))
    return out.to(out_dtype), (state if return_state else None)


def _chunkwise(q, k, v, log_gamma, chunk_size, position_offset, state, return_state):
    if q.is_cuda:  # the optional GPU kernel; its module (and fla) is imported only here
        from retlm.ops import retention_fla

        if retention_fla.fla_available(q, log_gamma):
            return retention_fla.fla_chunkwise_retention(
                q, k, v, log_gamma, position_offset, state, return_state
            )
    out_dtype, seq_len = v.dtype, q.shape[2]
    q, k, v, state = prepare(q, k, v, state)

    # All full chunks in one batched pass, then the remainder (if any) as one shorter chunk.
    decay_log_gamma = log_gamma.to(q.device, q.dtype)
    chunk_size = min(chunk_size, seq_len)
    split = seq_len - seq_len % chunk_size
    numerator, denominator, state = retention_chunks(
        q[:, :, :split], k[:, :, :split], v[:, :, :split], state, decay_log_gamma, chunk_size
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


def _recurrent(q, k, v, log_gamma, position_offset, state, return_state):
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
