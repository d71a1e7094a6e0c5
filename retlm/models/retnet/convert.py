"""Import a torchscale 0.3.0 ``RetNetDecoder`` into :class:`RetNetForCausalLM`.

torchscale's parameter names are ours under a ``model.`` prefix (``output_projection`` becomes
``lm_head``), so the import is a rename plus a config translation. Its buffers
``retnet_rel_pos.angle`` / ``retnet_rel_pos.decay`` are recomputed by our model from the config; they
are checked, not copied.

torchscale's parallel mode is the definition our three modes share; its own chunkwise mode
normalises differently (see docs/retnet.md), so imported models agree with torchscale's parallel
logits, and, through our exact chunkwise and recurrent modes, everywhere else too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from retlm.models.retnet.configuration_retnet import RetNetConfig
from retlm.models.retnet.modeling_retnet import RetNetForCausalLM
from retlm.ops.retention import decay_gammas
from retlm.ops.rotary import torchscale_inv_freq

TORCHSCALE_ACTIVATIONS = ("gelu", "swish")


def _arg(args: Any, name: str, default: Any) -> Any:
    return getattr(args, name, default)


def check_supported(args: Any) -> None:
    """Raise ValueError for the torchscale options our model does not express."""
    unsupported = {
        "deepnorm": (_arg(args, "deepnorm", False), "post-norm DeepNet blocks"),
        "decoder_normalize_before": (not _arg(args, "decoder_normalize_before", True), "post-norm blocks"),
        "moe_freq": (_arg(args, "moe_freq", 0) != 0, "mixture-of-experts layers"),
        "multiway": (_arg(args, "multiway", False), "multiway (BEiT-3) projections"),
        "no_output_layer": (_arg(args, "no_output_layer", False), "a decoder without output projection"),
    }
    for name, (present, what) in unsupported.items():
        if present:
            raise ValueError(f"torchscale option {name}={_arg(args, name, None)!r} ({what}) is not supported")
    activation = _arg(args, "activation_fn", "gelu")
    if activation not in TORCHSCALE_ACTIVATIONS:
        raise ValueError(
            f"unknown torchscale activation_fn {activation!r}; expected one of {TORCHSCALE_ACTIVATIONS}"
        )


def config_from_torchscale(args: Any, vocab_size: int, **overrides: Any) -> RetNetConfig:
    """Translate a ``torchscale.architecture.config.RetNetConfig`` into ours."""
    check_supported(args)
    fields = dict(
        vocab_size=vocab_size,
        hidden_size=args.decoder_embed_dim,
        num_layers=args.decoder_layers,
        num_heads=args.decoder_retention_heads,
        qk_dim=args.decoder_embed_dim,
        v_dim=args.decoder_value_embed_dim,
        ffn_proj_size=args.decoder_ffn_embed_dim,
        use_default_gamma=True,
        norm_type="rmsnorm",
        norm_eps=_arg(args, "layernorm_eps", 1e-6),
        use_glu=True,
        activation=_arg(args, "activation_fn", "gelu"),
        use_bias_in_msr=False,
        use_bias_in_msr_out=False,
        use_bias_in_mlp=False,
        scale_embedding=not _arg(args, "no_scale_embedding", True),
        layernorm_embedding=_arg(args, "layernorm_embedding", False),
        position_encoding="rotary",
        retention_block_size=_arg(args, "recurrent_chunk_size", 512),
        dropout=_arg(args, "dropout", 0.0),
        activation_dropout=_arg(args, "activation_dropout", 0.0),
        tie_word_embeddings=_arg(args, "share_decoder_input_output_embed", False),
    )
    fields.update(overrides)
    return RetNetConfig(**fields)


def rename_key(key: str) -> str | None:
    """torchscale decoder key -> our RetNetForCausalLM key (None: a derived buffer, not copied)."""
    if key.startswith("decoder."):  # a fairseq language model wraps the decoder
        key = key[len("decoder.") :]
    if key.startswith("retnet_rel_pos.") or key.endswith(".version"):
        return None
    if key.startswith("output_projection."):
        return "lm_head." + key[len("output_projection.") :]
    return "model." + key


def check_buffers(state_dict: Mapping[str, Tensor], config: RetNetConfig) -> None:
    """The decays and angles torchscale saved must be the ones our config derives."""
    for key, value in state_dict.items():
        if key.endswith("retnet_rel_pos.decay"):
            ours = decay_gammas(config.num_heads, use_default_gamma=True).log()
            if not torch.allclose(value.double().cpu(), ours, rtol=1e-5, atol=1e-7):
                raise ValueError(f"{key} does not hold torchscale's default decays log(1 - 2^(-5-h))")
        if key.endswith("retnet_rel_pos.angle"):
            ours = torchscale_inv_freq(config.key_dim).repeat_interleave(2)
            if not torch.allclose(value.double().cpu(), ours, rtol=1e-5, atol=1e-7):
                raise ValueError(f"{key} does not hold torchscale's rotation angles")


def from_torchscale(
    args: Any, state_dict: Mapping[str, Tensor], **config_overrides: Any
) -> RetNetForCausalLM:
    """Build a model equal to torchscale's ``RetNetDecoder(args, embed_tokens, output_projection)``.

    Args:
        args: the ``torchscale.architecture.config.RetNetConfig`` the decoder was built with.
        state_dict: ``decoder.state_dict()`` (keys may carry a fairseq ``decoder.`` prefix).
        config_overrides: RetNetConfig fields to set on top (e.g. ``retention_mode="chunkwise"``,
            ``pad_token_id``).
    """
    embed_key = next((k for k in state_dict if k.endswith("embed_tokens.weight")), None)
    if embed_key is None:
        raise ValueError("state_dict has no embed_tokens.weight: build the RetNetDecoder with embed_tokens")
    vocab_size, dim = state_dict[embed_key].shape
    if dim != args.decoder_embed_dim:
        raise ValueError(f"embed_tokens has width {dim}, args.decoder_embed_dim is {args.decoder_embed_dim}")
    config = config_from_torchscale(args, vocab_size, **config_overrides)
    check_buffers(state_dict, config)

    renamed = {new: value for key, value in state_dict.items() if (new := rename_key(key)) is not None}
    if config.tie_word_embeddings:
        renamed.pop("lm_head.weight", None)
    model = RetNetForCausalLM(config)
    missing, unexpected = model.load_state_dict(renamed, strict=False)
    if config.tie_word_embeddings:
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"torchscale state_dict does not fit: missing {missing}, unexpected {unexpected}")
    return model.eval()
