"""RetroConfig: retro-pytorch 0.3.9's constructor arguments (same names; defaults as retro-pytorch's but
the vocabulary, GPT-2's) plus the decoder choice ("transformer" or "retnet") and the switches needed to
reproduce retro-pytorch exactly. transformers' dataclass style, as :class:`RetNetConfig`."""

import warnings
from dataclasses import field, fields
from typing import Any

from huggingface_hub.dataclasses import type_validator
from transformers import PreTrainedConfig

from retlm.layers.neighbor_encoder import CCA_QUERY_POSITIONS, RetrievalLayersConfig
from retlm.ops.retention import RETENTION_MODES, USE_DEFAULT_GAMMA

DECODERS = ("transformer", "retnet")
GPT2_VOCAB_SIZE = 50257  # the default tokenizer's (retlm.tokenization.GPT2_VOCAB_SIZE; tested equal)
BERT_CASED_VOCAB_SIZE = 28996  # retro-pytorch's default num_tokens (bert-base-cased)
# config.json keys of earlier releases, loaded with a DeprecationWarning: old name -> new name
RENAMED_KEYS = {"retnet_mode": "retention_mode", "retnet_chunk_size": "retention_block_size"}
POSITIVE_INTEGERS = (
    "chunk_size", "max_seq_len", "heads", "dim_head", "enc_depth", "dec_depth", "num_tokens", "enc_dim",
    "dec_dim", "ff_mult",
)  # fmt: skip


def _layer_list(layers: list[int] | None, depth: int, name: str) -> list[int] | None:
    if layers is None:
        return None
    bad = [layer for layer in layers if not 1 <= layer <= depth]
    if bad:
        raise ValueError(f"{name} must hold layer numbers in 1..{depth} (1-based), got {bad} in {layers}")
    return sorted(set(layers))


class RetroConfig(PreTrainedConfig):
    """Configuration of :class:`~retlm.models.retro.RetroForCausalLM` and :class:`~retlm.models.retro.RETRO`.

    retro-pytorch's arguments: ``num_tokens (default GPT-2's 50257, the default tokenizer's; retro-pytorch:
    28996), max_seq_len, enc_dim, enc_depth, enc_cross_attn_layers (None = every encoder layer),
    dec_depth, dec_cross_attn_layers (1-based; None = every layer), heads, dec_dim, dim_head,
    enc_attn_dropout, enc_ff_dropout, dec_attn_dropout, dec_ff_dropout, chunk_size, pad_id,
    enc_scale_residual, dec_scale_residual, norm_klass (only None: a class cannot be stored),
    gated_rmsnorm, use_deepnet``. Unlike retro-pytorch, ``heads`` is honoured.

    Additional:
        decoder: "transformer" (causal self-attention) or "retnet" (multi-scale retention); stored as
            ``config.decoder_type``.
        ff_mult: feed-forward width multiplier (4).
        rotary_dim: rotated features per head (default ``min(dim_head, 32)``, as retro-pytorch).
        cca_query_positions: "paper" (queries at their true offsets c-1..2c-2 from the neighbor's chunk
            start) or "retro_pytorch" ([2c-2, 0, ..., 0], needed for exact imports).
        absolute_position_embedding: add a learned absolute position table to the token embeddings
            (retro-pytorch does; the native model relies on rotary positions only).
        norm_eps: epsilon of the RMS norms (retro-pytorch: 1e-8, clamping the norm).
        retnet_heads, retnet_qk_dim, retnet_v_dim, retnet_use_default_gamma: retention layer shape
            (defaults: ``heads``, ``dec_dim``, ``2 * dec_dim``, torchscale's gammas).
        retention_mode: default retention mode "parallel" | "chunkwise" | "recurrent" (same function;
            formerly ``retnet_mode``).
        retention_block_size: block length of the chunkwise mode (default ``chunk_size``; formerly
            ``retnet_chunk_size``).
        zero_init_cca: start every chunked cross-attention with a zero output projection, so that a
            freshly initialised RETRO computes exactly its decoder alone and retrieval is added only as
            far as training finds it useful (as Flamingo's zero-initialised gates; retro-pytorch does not).
        tie_word_embeddings: the LM head's weight is the token embedding (GPT-2's choice; needs
            ``enc_dim == dec_dim``, the embedding's width). Default False, as retro-pytorch.
    """

    model_type = "retro"
    attribute_map = {
        "vocab_size": "num_tokens",
        "hidden_size": "dec_dim",
        "num_hidden_layers": "dec_depth",
        "num_attention_heads": "heads",
        "max_position_embeddings": "max_seq_len",
    }

    num_tokens: int = GPT2_VOCAB_SIZE
    max_seq_len: int = 2048
    enc_dim: int = 896
    enc_depth: int = 2
    enc_cross_attn_layers: list[int] | None = None
    dec_depth: int = 12
    dec_cross_attn_layers: list[int] | None = field(default_factory=lambda: [1, 3, 6, 9])
    heads: int = 8
    dec_dim: int = 768
    dim_head: int = 64
    enc_attn_dropout: float = 0.0
    enc_ff_dropout: float = 0.0
    dec_attn_dropout: float = 0.0
    dec_ff_dropout: float = 0.0
    chunk_size: int = 64
    pad_id: int = 0
    enc_scale_residual: float | None = None
    dec_scale_residual: float | None = None
    gated_rmsnorm: bool = False
    use_deepnet: bool = False
    decoder_type: str = "transformer"
    ff_mult: int = 4
    rotary_dim: int | None = None
    cca_query_positions: str = "paper"
    absolute_position_embedding: bool = False
    norm_eps: float = 1e-8
    retnet_heads: int | None = None
    retnet_qk_dim: int | None = None
    retnet_v_dim: int | None = None
    retnet_use_default_gamma: bool = USE_DEFAULT_GAMMA
    retention_mode: str = "parallel"
    retention_block_size: int | None = None
    zero_init_cca: bool = False
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        # ``decoder`` is stored as ``decoder_type``: transformers reserves a ``decoder`` attribute
        self.decoder_type = kwargs.pop("decoder", None) or self.decoder_type
        if kwargs.pop("norm_klass", None) is not None:
            raise ValueError(
                "norm_klass cannot be stored in a config; use gated_rmsnorm=True or use_deepnet=True "
                "(LayerNorm, post-norm) instead, or leave it None (RMSNorm)"
            )
        for old, new in RENAMED_KEYS.items():
            if old in kwargs:
                warnings.warn(
                    f"RetroConfig: {old} is deprecated; use {new}", DeprecationWarning, stacklevel=3
                )
                setattr(self, new, kwargs.pop(old))
        self.validate_field_types()
        self.validate_retro()
        self.enc_cross_attn_layers = _layer_list(
            self.enc_cross_attn_layers, self.enc_depth, "enc_cross_attn_layers"
        )
        self.dec_cross_attn_layers = _layer_list(
            self.dec_cross_attn_layers, self.dec_depth, "dec_cross_attn_layers"
        )
        if self.use_deepnet:  # DeepNet residual scales (arXiv 2203.00555, figure 2), as retro-pytorch
            depths = (self.enc_depth**4) * self.dec_depth
            self.enc_scale_residual = self.enc_scale_residual or 0.81 * depths**0.0625
            self.dec_scale_residual = self.dec_scale_residual or (3 * self.dec_depth) ** 0.25
        self.rotary_dim = self.retrieval_layers().rotary_dim  # checked there; default min(dim_head, 32)
        self.retnet_heads = self.retnet_heads or self.heads
        self.retnet_qk_dim = self.retnet_qk_dim or self.dec_dim
        self.retnet_v_dim = self.retnet_v_dim or 2 * self.dec_dim
        self.retention_block_size = self.retention_block_size or self.chunk_size
        self.pad_token_id = self.pad_id if self.pad_token_id is None else self.pad_token_id
        super().__post_init__(**kwargs)

    def validate_field_types(self) -> None:
        """Refuse a field of the wrong type (a string for ``dec_dim``, ...) with its name, before a tensor
        constructor reports it as ``empty(): argument 'size' ...`` (huggingface_hub's type validator; an
        int is a float, a tuple of layers a list)."""
        hints = RetroConfig.__annotations__  # types, not strings: no ``from __future__ import annotations``
        for name in hints:
            value = getattr(self, name)
            if isinstance(value, tuple):
                value = list(value)
            if isinstance(value, int) and not isinstance(value, bool) and "float" in str(hints[name]):
                value = float(value)
            try:
                type_validator(name, value, hints[name])
            except TypeError:
                wanted = str(hints[name]).replace("typing.", "").replace("<class '", "").replace("'>", "")
                raise ValueError(
                    f"model config: {name} must be {wanted}, got {value!r} ({type(value).__name__})"
                ) from None
            setattr(self, name, value)

    def validate_retro(self) -> None:
        """Raise ValueError naming the first inconsistent field and its allowed values."""
        choices = {
            "decoder_type": DECODERS,
            "cca_query_positions": CCA_QUERY_POSITIONS,
            "retention_mode": RETENTION_MODES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                shown = "decoder" if name == "decoder_type" else name
                raise ValueError(f"unknown {shown} {getattr(self, name)!r}; expected one of {allowed}")
        for name in POSITIVE_INTEGERS:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.tie_word_embeddings and self.enc_dim != self.dec_dim:
            raise ValueError(
                f"tie_word_embeddings needs enc_dim == dec_dim (the token embedding is enc_dim wide and "
                f"the LM head reads dec_dim), got enc_dim={self.enc_dim}, dec_dim={self.dec_dim}"
            )

    def dec_has_cca(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` (1-based) has chunked cross-attention."""
        return self.dec_cross_attn_layers is None or layer in self.dec_cross_attn_layers

    def enc_has_cross_attn(self, layer: int) -> bool:
        """Deprecated: ``config.retrieval_layers().enc_has_cross_attn(layer)``."""
        warnings.warn(
            "use RetroConfig.retrieval_layers().enc_has_cross_attn", DeprecationWarning, stacklevel=2
        )
        return self.retrieval_layers().enc_has_cross_attn(layer)

    def retrieval_layers(self) -> RetrievalLayersConfig:
        """The fields of this config that the shared retrieval layers (encoder, CCA, norms) read."""
        return RetrievalLayersConfig(**{f.name: getattr(self, f.name) for f in fields(RetrievalLayersConfig)})


# ---- what a config mapping may hold, and of which types (a yaml file, a config.json) ----

# PretrainedConfig's own arguments that a RETRO config may set
_BASE_KEYS = ("tie_word_embeddings", "pad_token_id", "bos_token_id", "eos_token_id", "dtype", "torch_dtype")


def config_keys() -> list[str]:
    """Every key a model config may give: ``RetroConfig``'s fields (and ``decoder``, ``norm_klass``), their
    HF aliases (``hidden_size`` ...), the renamed keys of earlier releases and the few
    ``PreTrainedConfig`` arguments that apply."""
    names = [*RetroConfig.__annotations__, "decoder", "norm_klass", *RENAMED_KEYS]
    return sorted({*names, *RetroConfig.attribute_map, *_BASE_KEYS})


def check_config_keys(mapping: dict[str, Any], source: str) -> None:
    """Refuse a key ``RetroConfig`` does not know (instead of storing it unused), suggesting the closest."""
    from retlm.errors import OptionError, did_you_mean

    valid = config_keys()
    for key in mapping:
        if key not in valid:
            raise OptionError(
                f"{source}: unknown model config key {key!r}{did_you_mean(str(key), valid)} "
                f"(valid keys: {', '.join(valid)})"
            )
