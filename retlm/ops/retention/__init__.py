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

- parallel:  the whole call is one block of the chunk formula below (T x T scores)   parallel.py
- chunkwise: blocks of ``block_size`` tokens: scores inside each block, and the state  chunkwise.py
             (kv, z) carried from block to block for everything before it; on CUDA,
             flash-linear-attention's kernel when installed and self-checked        fla.py
- recurrent: a loop over tokens, updating (kv, z) one token at a time (decoding)      recurrent.py

:func:`retention` (dispatch.py) picks the mode by name; common.py holds what the modes share.

Chunk formula, for a block of L tokens with incoming state (kv, z) (the state after the token
just before the block), block-local indices i, j in [0, L):

    A[i,j]   = (q_i . k_j) gamma^(i-j)  for j <= i, else 0
    num_i    = sum_j A[i,j] v_j + gamma^(i+1) q_i kv
    den_i    = sum_j A[i,j]     + gamma^(i+1) q_i . z
    kv'      = gamma^L kv + sum_j gamma^(L-1-j) k_j v_j^T,   z' likewise with v_j -> 1

and then out = (num / sqrt(S)) / max(|den| / sqrt(S), 1) per token. Only decay differences
(i - j >= 0) are ever exponentiated, so nothing overflows at any length or offset.

Half-precision inputs are computed in float32 (scores, decays and state); float64 stays float64.
"""

from retlm.ops.retention.chunkwise import chunkwise_retention
from retlm.ops.retention.common import (
    RETENTION_MODES,
    USE_DEFAULT_GAMMA,
    RetentionState,
    check_block_size,
    check_mode,
    decay_gammas,
    token_positions,
)
from retlm.ops.retention.dispatch import retention, run_retention
from retlm.ops.retention.parallel import parallel_retention
from retlm.ops.retention.recurrent import (
    StepDecay,
    recurrent_retention,
    recurrent_step,
    step_decay,
    step_inv_sqrt_rowsum,
)

__all__ = [
    "RETENTION_MODES",
    "USE_DEFAULT_GAMMA",
    "RetentionState",
    "StepDecay",
    "check_block_size",
    "check_mode",
    "chunkwise_retention",
    "decay_gammas",
    "parallel_retention",
    "recurrent_retention",
    "recurrent_step",
    "retention",
    "run_retention",
    "step_decay",
    "step_inv_sqrt_rowsum",
    "token_positions",
]
