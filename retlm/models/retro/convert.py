"""Import a retro-pytorch 0.3.9 ``RETRO`` into :class:`~retlm.models.retro.RETRO`.

    from retlm.models.retro.convert import from_retro_pytorch
    model = from_retro_pytorch(kwargs, retro_pytorch_model.state_dict())

The imported model reproduces retro-pytorch's logits (float32, within 1e-5) because its config turns
on what retro-pytorch does differently from the native model: 8 heads whatever ``heads`` says, a learned
absolute position table, and CCA query positions [2c-2, 0, ..., 0].
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from retlm.models.retro.compat_retro_pytorch import RETRO
from retlm.models.retro.configuration_retro import BERT_CASED_VOCAB_SIZE, RetroConfig

RETRO_PYTORCH_HEADS = 8  # retro-pytorch 0.3.9 never passes `heads` on to its attention layers
RETRO_PYTORCH_MIN_DIM_HEAD = 32
RETRO_PYTORCH_ARGS = (
    "num_tokens",
    "max_seq_len",
    "enc_dim",
    "enc_depth",
    "enc_cross_attn_layers",
    "dec_depth",
    "dec_cross_attn_layers",
    "heads",
    "dec_dim",
    "dim_head",
    "enc_attn_dropout",
    "enc_ff_dropout",
    "dec_attn_dropout",
    "dec_ff_dropout",
    "chunk_size",
    "pad_id",
    "enc_scale_residual",
    "dec_scale_residual",
    "norm_klass",
    "gated_rmsnorm",
    "use_deepnet",
)

# (retro-pytorch key pattern, our key template); layer sub-modules are 0 = attention, 1 = cross, 2 = ff
_SUBLAYERS = {
    "encoder": {"0": "self_attn", "1": "cross_attn", "2": "ff"},
    "decoder": {"0": "self_attn", "1": "cca", "2": "ff"},
}
_RENAMES = (
    (r"^(token_emb|pos_emb|to_decoder_model_dim)\.", r"model.\1."),
    (r"^encoder\.(norm_out|project_out)\.", r"model.encoder.\1."),
    (r"^decoder\.norm_out\.", "model.norm_out."),
    (r"\.ff\.ff\.0\.", ".ff.fc1."),
    (r"\.ff\.ff\.3\.", ".ff.fc2."),
    (r"\.cca\.cross_attn\.", ".cca.attn."),
)
_DROPPED = re.compile(r"^(encoder|decoder)\.rotary_pos_emb\.inv_freq$")


def config_from_retro_pytorch(kwargs: Mapping[str, Any]) -> RetroConfig:
    """The :class:`RetroConfig` that reproduces ``retro_pytorch.RETRO(**kwargs)``."""
    unknown = sorted(set(kwargs) - set(RETRO_PYTORCH_ARGS))
    if unknown:
        raise ValueError(
            f"not retro-pytorch 0.3.9 RETRO arguments: {unknown}; expected some of {RETRO_PYTORCH_ARGS}"
        )
    if kwargs.get("dim_head", 64) < RETRO_PYTORCH_MIN_DIM_HEAD:
        raise ValueError(
            f"retro-pytorch requires dim_head >= {RETRO_PYTORCH_MIN_DIM_HEAD}, got {kwargs['dim_head']}"
        )
    args = {"num_tokens": BERT_CASED_VOCAB_SIZE, **kwargs}  # retro-pytorch's default vocabulary
    args["heads"] = RETRO_PYTORCH_HEADS
    return RetroConfig(
        **args,
        rotary_dim=RETRO_PYTORCH_MIN_DIM_HEAD,
        cca_query_positions="retro_pytorch",
        absolute_position_embedding=True,
        norm_eps=1e-8,
    )


def rename_key(key: str) -> str:
    """retro-pytorch state_dict key -> ours."""
    match = re.match(r"^(encoder|decoder)\.layers\.(\d+)\.([012])\.(fn|norm)\.(.*)$", key)
    if match:
        stack, layer, sub, part, rest = match.groups()
        name = _SUBLAYERS[stack][sub]
        prefix = "model.encoder.layers" if stack == "encoder" else "model.layers"
        key = (
            f"{prefix}.{layer}.{name}.{rest}" if part == "fn" else f"{prefix}.{layer}.{name}_norm.norm.{rest}"
        )
    for pattern, replacement in _RENAMES:
        key = re.sub(pattern, replacement, key)
    return key


def from_retro_pytorch(kwargs: Mapping[str, Any], state_dict: Mapping[str, Tensor]) -> RETRO:
    """Build our RETRO from retro-pytorch 0.3.9 constructor ``kwargs`` and its ``state_dict``.

    Raises ValueError when the weights do not fit the architecture the kwargs describe.
    """
    config = config_from_retro_pytorch(kwargs)
    model = RETRO(config)
    renamed = {rename_key(k): v for k, v in state_dict.items() if not _DROPPED.match(k)}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(renamed))
    unexpected = sorted(set(renamed) - set(expected))
    wrong_shape = [
        f"{k}: checkpoint {tuple(renamed[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(renamed))
        if renamed[k].shape != expected[k].shape
    ]
    if missing or unexpected or wrong_shape:
        raise ValueError(
            "the retro-pytorch state_dict does not match the kwargs' architecture: "
            f"missing {missing[:8]}, unexpected {unexpected[:8]}, wrong shapes {wrong_shape[:8]}"
        )
    with torch.no_grad():
        model.load_state_dict(renamed, strict=True)
    return model
