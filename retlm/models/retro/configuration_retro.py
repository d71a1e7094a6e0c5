"""RetroConfig: retro-pytorch 0.3.9's constructor arguments (same names and defaults) plus the decoder
choice ("transformer" or "retnet") and the switches needed to reproduce retro-pytorch exactly."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import fields
from typing import Any

from transformers import PretrainedConfig

from retlm.layers.neighbor_encoder import CCA_QUERY_POSITIONS, RetrievalLayersConfig
from retlm.ops.retention import RETENTION_MODES, USE_DEFAULT_GAMMA

DECODERS = ("transformer", "retnet")
BERT_CASED_VOCAB_SIZE = 28996  # retro-pytorch's default num_tokens (bert-base-cased)


def _layer_list(layers: Iterable[int] | None, depth: int, name: str) -> list[int] | None:
    if layers is None:
        return None
    layers = [int(layer) for layer in layers]
    bad = [layer for layer in layers if not 1 <= layer <= depth]
    if bad:
        raise ValueError(f"{name} must hold layer numbers in 1..{depth} (1-based), got {bad} in {layers}")
    return sorted(set(layers))


class RetroConfig(PretrainedConfig):
    """Configuration of :class:`~retlm.models.retro.RetroForCausalLM` and :class:`~retlm.models.retro.RETRO`.

    retro-pytorch's arguments: ``num_tokens, max_seq_len, enc_dim, enc_depth, enc_cross_attn_layers
    (None = every encoder layer), dec_depth, dec_cross_attn_layers (1-based; None = every layer), heads,
    dec_dim, dim_head, enc_attn_dropout, enc_ff_dropout, dec_attn_dropout, dec_ff_dropout, chunk_size,
    pad_id, enc_scale_residual, dec_scale_residual, norm_klass (only None: a class cannot be stored),
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
        retnet_mode: default retention mode "parallel" | "chunkwise" | "recurrent" (same function).
        retnet_chunk_size: block length of the chunkwise mode (default ``chunk_size``).
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

    def __init__(
        self,
        num_tokens: int = BERT_CASED_VOCAB_SIZE,
        max_seq_len: int = 2048,
        enc_dim: int = 896,
        enc_depth: int = 2,
        enc_cross_attn_layers: Iterable[int] | None = None,
        dec_depth: int = 12,
        dec_cross_attn_layers: Iterable[int] | None = (1, 3, 6, 9),
        heads: int = 8,
        dec_dim: int = 768,
        dim_head: int = 64,
        enc_attn_dropout: float = 0.0,
        enc_ff_dropout: float = 0.0,
        dec_attn_dropout: float = 0.0,
        dec_ff_dropout: float = 0.0,
        chunk_size: int = 64,
        pad_id: int = 0,
        enc_scale_residual: float | None = None,
        dec_scale_residual: float | None = None,
        norm_klass: Any = None,
        gated_rmsnorm: bool = False,
        use_deepnet: bool = False,
        decoder: str | None = None,
        ff_mult: int = 4,
        rotary_dim: int | None = None,
        cca_query_positions: str = "paper",
        absolute_position_embedding: bool = False,
        norm_eps: float = 1e-8,
        retnet_heads: int | None = None,
        retnet_qk_dim: int | None = None,
        retnet_v_dim: int | None = None,
        retnet_use_default_gamma: bool = USE_DEFAULT_GAMMA,
        retnet_mode: str = "parallel",
        retnet_chunk_size: int | None = None,
        zero_init_cca: bool = False,
        decoder_type: str | None = None,
        **kwargs: Any,
    ) -> None:
        check_argument_types({k: v for k, v in locals().items() if k not in ("self", "kwargs", "__class__")})
        # stored as ``decoder_type``: transformers reserves a ``decoder`` attribute for sub-configs
        decoder = decoder or decoder_type or "transformer"
        if norm_klass is not None:
            raise ValueError(
                "norm_klass cannot be stored in a config; use gated_rmsnorm=True or use_deepnet=True "
                "(LayerNorm, post-norm) instead, or leave it None (RMSNorm)"
            )
        if decoder not in DECODERS:
            raise ValueError(f"unknown decoder {decoder!r}; expected one of {DECODERS}")
        if cca_query_positions not in CCA_QUERY_POSITIONS:
            raise ValueError(
                f"unknown cca_query_positions {cca_query_positions!r}; expected one of {CCA_QUERY_POSITIONS}"
            )
        if retnet_mode not in RETENTION_MODES:
            raise ValueError(f"unknown retnet_mode {retnet_mode!r}; expected one of {RETENTION_MODES}")
        for name, value in (
            ("chunk_size", chunk_size),
            ("max_seq_len", max_seq_len),
            ("heads", heads),
            ("dim_head", dim_head),
            ("enc_depth", enc_depth),
            ("dec_depth", dec_depth),
            ("num_tokens", num_tokens),
            ("enc_dim", enc_dim),
            ("dec_dim", dec_dim),
            ("ff_mult", ff_mult),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        rotary_dim = min(dim_head, 32) if rotary_dim is None else rotary_dim
        if rotary_dim % 2 or not 0 <= rotary_dim <= dim_head:
            raise ValueError(f"rotary_dim must be even and in 0..dim_head={dim_head}, got {rotary_dim}")

        self.num_tokens = num_tokens
        self.max_seq_len = max_seq_len
        self.enc_dim = enc_dim
        self.enc_depth = enc_depth
        self.enc_cross_attn_layers = _layer_list(enc_cross_attn_layers, enc_depth, "enc_cross_attn_layers")
        self.dec_depth = dec_depth
        self.dec_cross_attn_layers = _layer_list(dec_cross_attn_layers, dec_depth, "dec_cross_attn_layers")
        self.heads = heads
        self.dec_dim = dec_dim
        self.dim_head = dim_head
        self.enc_attn_dropout = enc_attn_dropout
        self.enc_ff_dropout = enc_ff_dropout
        self.dec_attn_dropout = dec_attn_dropout
        self.dec_ff_dropout = dec_ff_dropout
        self.chunk_size = chunk_size
        self.pad_id = pad_id
        if use_deepnet:  # DeepNet residual scales (arXiv 2203.00555, figure 2), as retro-pytorch
            enc_scale_residual = enc_scale_residual or 0.81 * ((enc_depth**4) * dec_depth) ** 0.0625
            dec_scale_residual = dec_scale_residual or (3 * dec_depth) ** 0.25
        self.enc_scale_residual = enc_scale_residual
        self.dec_scale_residual = dec_scale_residual
        self.norm_klass = None
        self.gated_rmsnorm = gated_rmsnorm
        self.use_deepnet = use_deepnet
        self.decoder_type = decoder
        self.ff_mult = ff_mult
        self.rotary_dim = rotary_dim
        self.cca_query_positions = cca_query_positions
        self.absolute_position_embedding = absolute_position_embedding
        self.norm_eps = norm_eps
        self.retnet_heads = retnet_heads or heads
        self.retnet_qk_dim = retnet_qk_dim or dec_dim
        self.retnet_v_dim = retnet_v_dim or 2 * dec_dim
        self.zero_init_cca = bool(zero_init_cca)
        self.retnet_use_default_gamma = retnet_use_default_gamma
        self.retnet_mode = retnet_mode
        self.retnet_chunk_size = retnet_chunk_size or chunk_size
        kwargs.setdefault("pad_token_id", pad_id)
        kwargs.setdefault("tie_word_embeddings", False)
        if kwargs["tie_word_embeddings"] and enc_dim != dec_dim:
            raise ValueError(
                f"tie_word_embeddings needs enc_dim == dec_dim (the token embedding is enc_dim wide and "
                f"the LM head reads dec_dim), got enc_dim={enc_dim}, dec_dim={dec_dim}"
            )
        super().__init__(**kwargs)

    def dec_has_cca(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` (1-based) has chunked cross-attention."""
        return self.dec_cross_attn_layers is None or layer in self.dec_cross_attn_layers

    def retrieval_layers(self) -> RetrievalLayersConfig:
        """The fields of this config that the shared retrieval layers (encoder, CCA, norms) read."""
        return RetrievalLayersConfig(**{f.name: getattr(self, f.name) for f in fields(RetrievalLayersConfig)})


# ---- what a config mapping may hold, and of which types (a yaml file, a config.json) ----

# PretrainedConfig's own arguments that a RETRO config may set
_BASE_KEYS = ("tie_word_embeddings", "pad_token_id", "bos_token_id", "eos_token_id", "dtype", "torch_dtype")


def config_keys() -> list[str]:
    """Every key a model config may give: ``RetroConfig``'s arguments, their HF aliases
    (``hidden_size`` ...) and the few ``PretrainedConfig`` arguments that apply."""
    import inspect

    names = [p for p in inspect.signature(RetroConfig.__init__).parameters if p not in ("self", "kwargs")]
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


def _kinds(annotation: str) -> set[str]:
    return {part.strip() for part in str(annotation).split("|")}


def check_argument_types(values: dict[str, Any]) -> None:
    """Refuse an argument of the wrong type (a string for ``dec_dim``, ...) with its name, before a
    tensor constructor reports it as ``empty(): argument 'size' ...``."""
    import inspect

    parameters = inspect.signature(RetroConfig.__init__).parameters
    for name, value in values.items():
        parameter = parameters.get(name)
        if parameter is None or value is None and "None" in _kinds(parameter.annotation):
            continue
        kinds = _kinds(parameter.annotation) - {"None"}
        ok = True
        if kinds == {"int"}:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kinds == {"float"}:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        elif kinds == {"bool"}:
            ok = isinstance(value, bool)
        elif kinds == {"str"}:
            ok = isinstance(value, str)
        elif kinds == {"Iterable[int]"}:
            ok = isinstance(value, list | tuple) and all(
                isinstance(v, int) and not isinstance(v, bool) for v in value
            )
        if not ok:
            wanted = " or ".join(sorted(_kinds(parameter.annotation)))
            raise ValueError(f"model config: {name} must be {wanted}, got {value!r} ({type(value).__name__})")
