"""What the three retention modes share: the decay schedule, the chunk formula, the normaliser, the
compute dtype and the input checks (the definition itself: :mod:`retlm.ops.retention`)."""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import Tensor

RetentionState = tuple[Tensor, Tensor]  # (kv (batch, heads, key_dim, value_dim), z (batch, heads, key_dim))

# The three ways to compute retention; every model, layer and op calls the choice `retention_mode`. This
# tuple is its one definition.
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
    q: Tensor, k: Tensor, v: Tensor, state: RetentionState, log_gamma: Tensor, block_size: int
) -> tuple[Tensor, Tensor, RetentionState]:
    """The chunk formula over a sequence of equal chunks (seq must be a multiple of ``block_size``).

    ``q, k (b, h, seq, dk)``, ``v (b, h, seq, dv)``, ``state`` before the first token, ``log_gamma
    (heads,)`` in the compute dtype. Returns the unnormalised ``numerator (b, h, seq, dv)`` and
    ``denominator (b, h, seq)``, and the state after the last token. The state is carried from chunk to
    chunk in a loop; the per-chunk work is batched over all chunks at once.
    """
    inner, query_decay, key_decay, chunk_decay = chunk_decays(log_gamma, block_size)
    q, k, v = (rearrange(x, "b h (n c) d -> b h n c d", c=block_size) for x in (q, k, v))

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


def check_block_size(block_size: object, name: str = "block_size") -> None:
    """Raise ValueError unless ``block_size`` (the chunkwise mode's block length) is an int >= 1."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"{name} must be a positive integer (>= 1), got {block_size!r}")


def check_mode(retention_mode: str, block_size: int | None) -> None:
    """Raise ValueError unless ``retention_mode`` is one of :data:`RETENTION_MODES` (with a valid
    ``block_size`` for "chunkwise")."""
    if retention_mode not in RETENTION_MODES:
        raise ValueError(f"unknown retention mode {retention_mode!r}; expected one of {RETENTION_MODES}")
    if retention_mode == "chunkwise":
        check_block_size(block_size)


def prepare(q: Tensor, k: Tensor, v: Tensor, state: RetentionState | None):
    """Cast q, k, v and the state to the compute dtype, and fill in an empty state."""
    dtype = compute_dtype(q, k, v)
    q, k, v = (x if x.dtype == dtype else x.to(dtype) for x in (q, k, v))  # a no-op .to still dispatches
    if state is None:
        return q, k, v, empty_state(q, v, dtype)
    kv, z = (x if x.dtype == dtype else x.to(dtype) for x in state)
    return q, k, v, (kv, z)
