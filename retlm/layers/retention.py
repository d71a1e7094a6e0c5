"""Multi-scale retention (MSR), the token mixer of RetNet (arXiv 2307.08621, section 2.2).

    q = rotate(x Wq),  k = rotate(x Wk) * dk^-1/2,  v = x Wv,  g = x Wg
    y = out_proj( swish(g) * RMSNorm_head( retention(q, k, v) ) )

The retention itself (one definition, three interchangeable modes) lives in
:mod:`retlm.ops.retention`; this module only owns the projections, the position rotation, the
per-head normalisation and the gate. Parameter names are torchscale's (``q_proj``, ``k_proj``,
``v_proj``, ``g_proj``, ``out_proj``) so its weights load without renaming.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retlm.ops import retention as retention_ops
from retlm.ops.retention import USE_DEFAULT_GAMMA, RetentionState, token_positions
from retlm.ops.rotary import (
    apply_interleaved_rotation,
    interleaved_rotation,
    standard_inv_freq,
    torchscale_inv_freq,
    xpos_scale,
)

POSITION_ENCODINGS = ("rotary", "xpos")


class MultiScaleRetention(nn.Module):
    """Gated multi-scale retention.

    Args:
        hidden_size: model width d (input and output features).
        num_heads: H; head h decays with gamma_h from :func:`retlm.ops.retention.decay_gammas`.
        qk_dim: total query/key width (H * dk); torchscale uses d.
        v_dim: total value width (H * hv); the paper uses 2d.
        use_default_gamma: gamma_h = 1 - 2^(-5-h) (torchscale) instead of the paper's LM schedule.
        bias: biases on q, k, v, g projections; ``out_bias``: on the output projection.
        norm_eps: epsilon of the per-head RMSNorm (torchscale: ``layernorm_eps``).
        position_encoding: "rotary" (torchscale's interleaved frequencies ``base^-linspace(0, 1, dk/2)``)
            or "xpos" (standard frequencies plus the xpos magnitude, scale base ``xpos_scale_base``).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        qk_dim: int | None = None,
        v_dim: int | None = None,
        *,
        use_default_gamma: bool = USE_DEFAULT_GAMMA,
        bias: bool = False,
        out_bias: bool = False,
        norm_eps: float = 1e-6,
        position_encoding: str = "rotary",
        rotary_base: float = 10000.0,
        xpos_scale_base: float = 512.0,
    ) -> None:
        super().__init__()
        qk_dim = qk_dim or hidden_size
        v_dim = v_dim or 2 * hidden_size
        if qk_dim % num_heads or v_dim % num_heads:
            raise ValueError(
                f"qk_dim ({qk_dim}) and v_dim ({v_dim}) must both be divisible by num_heads ({num_heads})"
            )
        if (qk_dim // num_heads) % 2:
            raise ValueError(f"the key head dim qk_dim/num_heads = {qk_dim // num_heads} must be even")
        if position_encoding not in POSITION_ENCODINGS:
            raise ValueError(
                f"unknown position_encoding {position_encoding!r}; expected one of {POSITION_ENCODINGS}"
            )

        self.num_heads = num_heads
        self.key_dim = qk_dim // num_heads
        self.head_value_dim = v_dim // num_heads
        self.use_default_gamma = use_default_gamma
        self.position_encoding = position_encoding
        self.rotary_base = rotary_base
        self.xpos_scale_base = xpos_scale_base
        self.norm_eps = norm_eps

        self.q_proj = nn.Linear(hidden_size, qk_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, qk_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, v_dim, bias=bias)
        self.g_proj = nn.Linear(hidden_size, v_dim, bias=bias)
        self.out_proj = nn.Linear(v_dim, hidden_size, bias=out_bias)
        # Decays and frequencies are derived from the config, never trained or saved: kept as plain
        # float64 tensors (not buffers) so that model.half() cannot round them and meta-device
        # construction in from_pretrained cannot leave them empty.
        self._constants: dict[torch.device, tuple[Tensor, Tensor]] = {}
        self._step_constants: dict[tuple[torch.device, torch.dtype], StepConstants] = {}

    def constants(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """``(log_gamma (heads,), inv_freq (key_dim/2,))`` in float64 on ``device``."""
        if device not in self._constants:
            self._constants[device] = self._build_constants(device)
        return self._constants[device]

    # Cached constants are built outside inference mode even when first asked for inside it: tensors made
    # in inference mode cannot be saved for backward, and the same layer may be trained afterwards.
    @torch.inference_mode(False)
    def _build_constants(self, device: torch.device) -> tuple[Tensor, Tensor]:
        gammas = retention_ops.decay_gammas(self.num_heads, use_default_gamma=self.use_default_gamma)
        if self.position_encoding == "rotary":
            inv_freq = torchscale_inv_freq(self.key_dim, self.rotary_base)
        else:
            inv_freq = standard_inv_freq(self.key_dim, self.rotary_base)
        return gammas.to(torch.float64).log().to(device), inv_freq.to(device)

    def step_constants(self, device: torch.device, dtype: torch.dtype) -> StepConstants:
        """What :meth:`decode_step` would otherwise rebuild every token, for compute dtype ``dtype``."""
        key = (device, dtype)
        if key not in self._step_constants:
            self._step_constants[key] = self._build_step_constants(device, dtype)
        return self._step_constants[key]

    @torch.inference_mode(False)  # see _build_constants
    def _build_step_constants(self, device: torch.device, dtype: torch.dtype) -> StepConstants:
        log_gamma, inv_freq = self.constants(device)
        decay = retention_ops.step_decay(log_gamma, dtype)
        return StepConstants(decay, inv_freq.repeat_interleave(2))

    def rotation_tables(self, positions: int | Tensor, device: torch.device, dtype: torch.dtype) -> Rotation:
        """The rotation (and xpos magnitude) at ``positions`` for q, k of dtype ``dtype``: an int (one
        token, every row at that position), or an integer tensor ``(seq,)`` or ``(batch, seq)``.

        Angles are formed in float64 (large offsets lose nothing before the cast); cos/sin are laid out
        for the interleaved pairs (x0, x1), (x2, x3), ... (see :func:`retlm.ops.rotary.interleaved_rotation`).
        """
        constants = self.step_constants(device, dtype)
        angle_positions: int | Tensor = positions
        if isinstance(positions, Tensor):  # (seq,) -> (seq, 1); (batch, seq) -> (batch, 1, seq, 1)
            angle_positions = positions.to(device, torch.float64)[..., None]
            if angle_positions.dim() == 3:
                angle_positions = angle_positions[:, None]
        angles = angle_positions * constants.inv_freq_pairs
        xpos = None
        if self.position_encoding == "xpos":
            if not isinstance(positions, Tensor):
                positions = token_positions(positions, 1, device)
            xpos = xpos_scale(positions, self.key_dim, self.xpos_scale_base, dtype)
        return Rotation(*interleaved_rotation(angles, dtype), xpos)

    def rotate(self, q: Tensor, k: Tensor, rotation: Rotation) -> tuple[Tensor, Tensor]:
        """Apply the position rotation (and xpos magnitude) to q, k ``(batch, heads, seq, key_dim)``."""
        q = apply_interleaved_rotation(q, rotation.cos, rotation.signed_sin)
        k = apply_interleaved_rotation(k, rotation.cos, rotation.signed_sin)
        if rotation.xpos is not None:
            q, k = q * rotation.xpos, k / rotation.xpos
        return q, k

    def step_tables(
        self, position_offset: int | Tensor, device: torch.device, dtype: torch.dtype, memo: dict | None
    ) -> StepTables:
        """The position-dependent tables of one decoding step (rotation, normaliser) for compute dtype
        ``dtype``. They depend only on the position and this layer's constants, so every layer of a
        model computes the same ones: ``memo``, a dict that lives for one forward call, lets the first
        layer build them and the others reuse them."""
        key = (self.num_heads, self.key_dim, self.use_default_gamma, self.position_encoding,
               self.rotary_base, self.xpos_scale_base, device, dtype)  # fmt: skip
        if memo is not None and key in memo:
            return memo[key]
        positions = position_offset[:, None] if isinstance(position_offset, Tensor) else position_offset
        rotation = self.rotation_tables(positions, device, dtype)  # per row: (batch, 1, 1, key_dim)
        decay = self.step_constants(device, dtype).decay
        tables = StepTables(rotation, retention_ops.step_inv_sqrt_rowsum(decay, position_offset, dtype))
        if memo is not None:
            memo[key] = tables
        return tables

    def head_norm(self, x: Tensor) -> Tensor:
        """RMSNorm over each head's values, in float32 (float64 stays float64), no affine weight."""
        if x.dtype in (torch.float32, torch.float64):  # no casts: a no-op .to() still costs a dispatch
            return F.rms_norm(x, (x.shape[-1],), eps=self.norm_eps)
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.norm_eps).to(x.dtype)

    def forward(
        self,
        hidden_states: Tensor,
        position_offset: int | Tensor = 0,
        attention_mask: Tensor | None = None,
        state: RetentionState | None = None,
        retention_mode: str = "parallel",
        block_size: int | None = None,
        return_state: bool = False,
        step_memo: dict | None = None,
    ) -> tuple[Tensor, RetentionState | None]:
        """
        Args:
            hidden_states: ``(batch, seq, hidden_size)``.
            position_offset: absolute position of the first token, an int or a LongTensor ``(batch,)``
                (negative for left-padded rows: their first real token sits at position 0).
            attention_mask: ``(batch, seq)``, 1 for real tokens, 0 for padding, or None. Padded positions
                get zero keys and values, so they leave no trace in later tokens or in the state.
            state: the retention state ``(kv (batch, heads, key_dim, head_value_dim), z (batch, heads,
                key_dim))`` after the previous token, or None for a fresh start.
            retention_mode: "parallel", "chunkwise" or "recurrent"; all compute the same function.
            block_size: block length for "chunkwise".
            return_state: also return the state after the last token.
            step_memo: a dict shared by the layers of one model call; one-token recurrent steps keep
                their position tables there (see :meth:`step_tables`).

        Returns:
            ``(output (batch, seq, hidden_size), new_state or None)``.
        """
        seq_len = hidden_states.shape[1]
        if retention_mode == "recurrent" and seq_len == 1:
            out, new_state = self.decode_step(
                hidden_states, position_offset, attention_mask, state, step_memo
            )
            return out, (new_state if return_state else None)
        log_gamma, _ = self.constants(hidden_states.device)
        q, k, v = self.project(hidden_states)
        positions = token_positions(position_offset, seq_len, hidden_states.device)
        q, k = self.rotate(q, k, self.rotation_tables(positions, q.device, q.dtype))
        k, v = mask_padding(k, v, attention_mask)
        out, new_state = retention_ops.run_retention(
            q,
            k,
            v,
            log_gamma,
            retention_mode=retention_mode,
            block_size=block_size,
            position_offset=position_offset,
            state=state,
            return_state=return_state,
        )
        return self.gate_and_project(out, hidden_states), new_state

    def decode_step(
        self,
        hidden_states: Tensor,
        position_offset: int | Tensor,
        attention_mask: Tensor | None,
        state: RetentionState | None,
        step_memo: dict | None = None,
    ) -> tuple[Tensor, RetentionState]:
        """:meth:`forward` for one token in recurrent mode, i.e. one step of decoding; same result bit for
        bit, always with the new state. ``hidden_states (batch, 1, hidden_size)``.

        Decoding a small model is dominated by per-call overhead, not arithmetic, so this differs from
        :meth:`forward` where that pays: the position tables are built once per step for all layers
        (:meth:`step_tables`, ``step_memo``) from constants cached per (device, dtype), and
        :meth:`step` runs the rest with fused projections and one
        :func:`retlm.ops.retention.recurrent_step` instead of the general loop.
        """
        dtype = step_dtype(hidden_states.dtype)
        tables = self.step_tables(position_offset, hidden_states.device, dtype, step_memo)
        return self.step(hidden_states, tables, state, attention_mask)

    def step(
        self,
        hidden_states: Tensor,
        tables: StepTables,
        state: RetentionState | None,
        attention_mask: Tensor | None = None,
    ) -> tuple[Tensor, RetentionState]:
        """:meth:`decode_step` given the position tables of the step (:meth:`step_tables`, for compute dtype
        :func:`step_dtype` of ``hidden_states (batch, 1, hidden_size)``): ``(output, new_state)``.

        The projections are the modules of :meth:`forward`; ``torch.compile`` (:meth:`compile_decoding`)
        fuses the step's small ops on its own.
        """
        q, k, v = self.project(hidden_states)
        q, k = self.rotate(q, k, tables.rotation)
        gate = self.g_proj(hidden_states)
        k, v = mask_padding(k, v, attention_mask)
        decay = self.step_constants(q.device, q.dtype).decay
        out, new_state = retention_ops.recurrent_step(q, k, v, decay, inverse=tables.inverse, state=state)
        return self.gate_and_project(out, hidden_states, gate), new_state

    def project(self, hidden_states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``hidden_states (batch, seq, hidden_size)`` -> q, k ``(batch, heads, seq, key_dim)`` (k scaled by
        key_dim^-1/2) and v ``(batch, heads, seq, head_value_dim)``.

        Half-precision q, k come back in float32, to be rotated there: the xpos magnitudes
        zeta^(+-n/512) leave the fp16 range after a few thousand positions, and the retention ops score in
        float32 anyway.
        """
        q = split_heads(self.q_proj(hidden_states), self.num_heads)
        k = split_heads(self.k_proj(hidden_states), self.num_heads) * self.key_dim**-0.5
        v = split_heads(self.v_proj(hidden_states), self.num_heads)
        if q.dtype in (torch.float16, torch.bfloat16):
            q, k = q.float(), k.float()
        return q, k, v

    def gate_and_project(self, out: Tensor, hidden_states: Tensor, gate: Tensor | None = None) -> Tensor:
        """Retention ``out (batch, heads, seq, head_value_dim)`` -> ``(batch, seq, hidden_size)``: per-head
        RMSNorm, the swish gate of ``hidden_states (batch, seq, hidden_size)``, the output projection.
        ``gate``: ``g_proj(hidden_states)`` when already computed."""
        out = merge_heads(self.head_norm(out))
        if gate is None:
            gate = self.g_proj(hidden_states)
        return self.out_proj(F.silu(gate) * out)


def step_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype q, k are rotated and scored in for hidden states of ``dtype``: float32 for half precision
    (see :meth:`MultiScaleRetention.project`), else ``dtype`` itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """``(batch, seq, heads * dim)`` -> ``(batch, heads, seq, dim)``, a view."""
    batch, seq_len, width = x.shape
    if seq_len == 1:  # one token (every decoding step): a plain view, no transpose to dispatch
        return x.view(batch, num_heads, 1, width // num_heads)
    return x.view(batch, seq_len, num_heads, width // num_heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """``(batch, heads, seq, dim)`` -> ``(batch, seq, heads * dim)``."""
    batch, heads, seq_len, dim = x.shape
    if seq_len == 1:  # as in split_heads
        return x.reshape(batch, 1, heads * dim)
    return x.transpose(1, 2).reshape(batch, seq_len, heads * dim)


def mask_padding(k: Tensor, v: Tensor, attention_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Zero the keys and values ``(batch, heads, seq, dim)`` of padded positions (``attention_mask (batch,
    seq)`` 0), so that they leave no trace in later tokens or in the state; None: no padding."""
    if attention_mask is None:
        return k, v
    keep = attention_mask[:, None, :, None]
    return k * keep.to(k.dtype), v * keep.to(v.dtype)  # k may be float32 while v is half


class StepConstants(NamedTuple):
    """Per (device, dtype) constants of :meth:`MultiScaleRetention.decode_step`."""

    decay: retention_ops.StepDecay
    inv_freq_pairs: Tensor  # (key_dim,) float64: each rotary frequency twice, for its pair (x0, x1)


class Rotation(NamedTuple):
    """Rotation tables in q's dtype (see :meth:`MultiScaleRetention.rotation_tables`), shaped to broadcast
    against ``(batch, heads, seq, key_dim)``."""

    cos: Tensor  # cos of each pair's angle, twice
    signed_sin: Tensor  # -sin, +sin per pair
    xpos: Tensor | None  # xpos magnitude, or None for plain rotary


class StepTables(NamedTuple):
    """Position tables of one decoding step (see :meth:`MultiScaleRetention.step_tables`)."""

    rotation: Rotation
    inverse: Tensor  # (heads, 1) or (batch, heads, 1): 1 / sqrt(S_n) of the normaliser, compute dtype
