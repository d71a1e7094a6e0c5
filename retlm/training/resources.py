"""Will a training step fit in memory? A lower bound, checked before the model is built.

The largest tensor of a step is one decoder layer's attention (transformer) or retention (RetNet,
parallel mode) score matrix: ``batch x heads x seq_len x seq_len`` float32 values, kept for the backward
pass. Chunkwise retention keeps ``batch x heads x seq_len x chunk`` per layer, recurrent mode
``batch x heads x seq_len`` per state update (it is not used for training, but bounded the same way).
The parameters, their gradients and AdamW's two moments add ``16`` bytes per parameter. Both are
lower bounds (activations of every layer add more), so a refusal is never wrong; a pass is not a
promise.
"""

from __future__ import annotations

from typing import Any

from retlm.errors import ResourceError, format_bytes
from retlm.utils import available_memory_bytes


def parameter_count_lower_bound(config: Any) -> int:
    """Token embedding, LM head and the decoder's projection matrices (at least ``4 dim^2`` a layer)."""
    vocab, enc, dec = int(config.num_tokens), int(config.enc_dim), int(config.dec_dim)
    return vocab * enc + vocab * dec + int(config.dec_depth) * 4 * dec * dec


def score_bytes(config: Any, batch_size: int, seq_len: int) -> tuple[int, str]:
    """Bytes of one decoder layer's score matrix for a batch, and how it was counted."""
    retnet = getattr(config, "decoder_type", "transformer") == "retnet"
    heads = int(config.retnet_heads if retnet else config.heads)
    mode = getattr(config, "retention_mode", "parallel") if retnet else "attention"
    if mode == "chunkwise":
        width = min(seq_len, int(config.retention_block_size))
    elif mode == "recurrent":
        width = 1
    else:
        width = seq_len
    return (
        batch_size * heads * seq_len * width * 4,
        f"batch {batch_size} x {heads} heads x {seq_len} x {width}",
    )


def check_training_memory(
    config: Any, batch_size: int, seq_len: int, *, available: int | None = None, training: bool = True
) -> None:
    """Refuse a (config, batch, sequence length) whose step cannot fit in the available memory
    (``training=False``: a forward pass, with the weights alone). The bound reads RetroConfig's fields;
    other models (a RETRO-fitted base) are not checked."""
    if getattr(config, "model_type", None) != "retro":
        return
    scores, how = score_bytes(config, batch_size, seq_len)
    params = (16 if training else 4) * parameter_count_lower_bound(config)
    needed = scores + params
    available = available_memory_bytes() if available is None else available
    if needed > available:
        what = "a training step" if training else "a forward pass"
        state = "parameters with gradients and AdamW state" if training else "parameters"
        raise ResourceError(
            f"{what} at seq_len {seq_len} needs at least {format_bytes(needed)} of memory (one layer's "
            f"score matrix, {how} float32 values: {format_bytes(scores)}; {state}: {format_bytes(params)}), "
            f"but {format_bytes(available)} are available; lower --seq-len or --batch-size"
        )
