"""RETRO (arXiv 2112.04426) as a transformers model, with a transformer or a RetNet decoder.

    tokens --token_emb (enc_dim) [+ absolute positions] --> to_decoder_model_dim --> decoder layers:
        x = x + SelfAttention(norm(x))           causal attention, or multi-scale retention (RetNet)
        [first CCA layer: encode the neighbours of every completed chunk, conditioned on x of that chunk]
        x = x + CCA(norm(x), encoded neighbours)  at dec_cross_attn_layers
        x = x + FFN(norm(x))
    --> norm --> to_logits

Encoder (per neighbour + continuation, bidirectional): self-attention over the neighbour's tokens,
cross-attention to the decoder states of the chunk that retrieved it, FFN; then norm and a projection
to dec_dim. CCA alignment and causality are described in :mod:`retlm.ops.attention`: the tokens of
chunk u+1 (and the last token of chunk u) read the neighbours of chunk u, never a neighbour
retrieved with their own future.

Incremental decoding (the generation loop drives it):

    cache = None
    out = model(input_ids=prompt, retrieved=neighbours_of_prompt_chunks, use_cache=True)
    cache = out.past_key_values                     # RetroCache
    out = model(input_ids=next_tokens, past_key_values=cache, retrieved=r)

A call must receive, in ``retrieved``, the neighbours of every chunk whose LAST token is among its
``input_ids`` (chunk u ends at position u*c + c - 1): shape ``(batch, num_completed, k, 2c)``, or
``(batch, k, 2c)`` for one chunk when a cache is passed. The caller can retrieve for chunk u before the
call because all of chunk u's tokens are then known. ``retrieved=None`` means "no retrieval" for those
chunks (their groups skip cross-attention). Token-by-token decoding gives the same logits as one full
forward with the same neighbours (tested).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init

from retlm.compat import BaseModelOutputWithCache, CausalLMOutputWithCache, cache_kwargs, resolve_cache
from retlm.layers.attention import Attention, ChunkedCrossAttention, KVCache
from retlm.layers.feedforward import FeedForward
from retlm.layers.norm import ScaledL2Norm
from retlm.models.retro.configuration_retro import RetroConfig
from retlm.ops.attention import cca_groups, chunks_completed
from retlm.ops.retention import RETENTION_MODES

# -- cache --------------------------------------------------------------------------------------------


@dataclass
class RetroCache:
    """Decoding state of a RETRO model (all rows of the batch share one position).

    Attributes:
        position: number of tokens processed so far (absolute position of the next token).
        layers: per decoder layer, the rotated self-attention keys and values (a growing ``KVCache``,
            ``(batch, heads, position, dim_head)``; transformer decoder), or the retention state
            (RetNet decoder: constant size), or None before the first call.
        context: ``(batch, position % chunk_size, dec_dim)`` decoder states, at the first CCA layer, of
            the current incomplete chunk; the encoder is conditioned on them once the chunk completes.
        neighbours: ``(batch, k, r, dec_dim)`` encoded neighbours of the last completed chunk (read by the
            tokens up to the end of the following chunk), or None when that chunk had no retrieval.
        neighbour_mask: ``(batch, k, r)`` bool, True = real neighbour token.
    """

    position: int = 0
    layers: list[Any] = field(default_factory=list)
    context: Tensor | None = None
    neighbours: Tensor | None = None
    neighbour_mask: Tensor | None = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.position

    def batch_select_indices(self, indices: Tensor) -> None:
        """Keep (or reorder, e.g. for beam search) the batch rows ``indices``."""

        def select(value: Any) -> Any:
            if isinstance(value, KVCache):  # moves the indices to its own device
                return value.index_select(0, indices)
            if isinstance(value, Tensor):
                return value.index_select(0, indices.to(value.device))
            if isinstance(value, (tuple, list)):
                return type(value)(select(v) for v in value)
            return value

        self.layers = [select(state) for state in self.layers]
        self.context, self.neighbours, self.neighbour_mask = (
            select(self.context),
            select(self.neighbours),
            select(self.neighbour_mask),
        )

    reorder_cache = batch_select_indices


# -- building blocks ----------------------------------------------------------------------------------


class GatedScaledL2Norm(ScaledL2Norm):
    """retro-pytorch's gated RMSNorm: ``ScaledL2Norm(x) * sigmoid(x * weight)``."""

    def __init__(self, dim: int, eps: float = 1e-8) -> None:
        super().__init__(dim, eps)
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) * (x * self.weight).sigmoid()


class Residual(nn.Module):
    """A residual around a sub-layer: pre-norm ``x + f(norm(x))``, or DeepNet post-norm
    ``norm(f(x) + scale * x)``. Call ``pre(x)`` for the sub-layer input, ``post(x, f_out)`` after it."""

    def __init__(self, dim: int, config: RetroConfig, scale: float | None) -> None:
        super().__init__()
        if config.gated_rmsnorm:
            self.norm: nn.Module = GatedScaledL2Norm(dim, config.norm_eps)
        elif config.use_deepnet:
            self.norm = nn.LayerNorm(dim)
        else:
            self.norm = ScaledL2Norm(dim, config.norm_eps)
        self.post_norm = config.use_deepnet
        self.scale = 1.0 if scale is None else scale

    def pre(self, x: Tensor) -> Tensor:
        return x if self.post_norm else self.norm(x)

    def post(self, x: Tensor, out: Tensor) -> Tensor:
        return self.norm(out + x * self.scale) if self.post_norm else x + out


def final_norm(dim: int, config: RetroConfig) -> nn.Module:
    if config.use_deepnet:  # post-norm blocks end normalised already
        return nn.Identity()
    return Residual(dim, config, None).norm


def feed_forward(dim: int, config: RetroConfig, dropout: float) -> FeedForward:
    return FeedForward(
        dim, int(config.ff_mult * dim), activation="gelu", bias=True, activation_dropout=dropout
    )


class RetroEncoderLayer(nn.Module):
    def __init__(self, config: RetroConfig, has_cross_attn: bool) -> None:
        super().__init__()
        dim, scale = config.enc_dim, config.enc_scale_residual
        common = dict(
            heads=config.heads,
            dim_head=config.dim_head,
            dropout=config.enc_attn_dropout,
            rotary_dim=config.rotary_dim,
        )
        self.self_attn = Attention(dim, **common)
        self.self_attn_norm = Residual(dim, config, scale)
        self.cross_attn = Attention(dim, context_dim=config.dec_dim, **common) if has_cross_attn else None
        self.cross_attn_norm = Residual(dim, config, scale) if has_cross_attn else None
        self.ff = feed_forward(dim, config, config.enc_ff_dropout)
        self.ff_norm = Residual(dim, config, scale)


class RetroEncoder(nn.Module):
    """Encodes neighbours (+ continuations) bidirectionally, cross-attending to the retrieving chunk."""

    def __init__(self, config: RetroConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            RetroEncoderLayer(config, config.enc_has_cross_attn(i)) for i in range(1, config.enc_depth + 1)
        )
        self.norm_out = final_norm(config.enc_dim, config)
        self.project_out = nn.Linear(config.enc_dim, config.dec_dim)

    def forward(self, x: Tensor, mask: Tensor, context: Tensor) -> Tensor:
        """
        Args:
            x: ``(chunks, k, r, enc_dim)`` embedded neighbours of ``chunks`` retrieving chunks.
            mask: ``(chunks, k, r)`` bool, True = real token.
            context: ``(chunks, chunk_size, dec_dim)`` decoder states of each retrieving chunk.

        Returns ``(chunks, k, r, dec_dim)``.
        """
        num_neighbours, r = x.shape[1:3]
        positions = torch.arange(r, device=x.device)
        # all k neighbours of a chunk attend to the same context: one query block of k * r tokens
        neighbour_positions = positions.repeat(num_neighbours)
        context_positions = torch.arange(context.shape[1], device=x.device)
        x = rearrange(x, "u k r d -> (u k) r d")
        key_mask = rearrange(mask, "u k r -> (u k) r")
        for layer in self.layers:
            h, _ = layer.self_attn(layer.self_attn_norm.pre(x), key_mask=key_mask, q_positions=positions)
            x = layer.self_attn_norm.post(x, h)
            if layer.cross_attn is not None:
                h = rearrange(layer.cross_attn_norm.pre(x), "(u k) r d -> u (k r) d", k=num_neighbours)
                h, _ = layer.cross_attn(
                    h, context, q_positions=neighbour_positions, k_positions=context_positions
                )
                x = layer.cross_attn_norm.post(x, rearrange(h, "u (k r) d -> (u k) r d", k=num_neighbours))
            x = layer.ff_norm.post(x, layer.ff(layer.ff_norm.pre(x)))
        x = self.project_out(self.norm_out(x))
        return rearrange(x, "(u k) r d -> u k r d", k=num_neighbours)


class RetroDecoderLayer(nn.Module):
    """Self-attention (or retention), optional chunked cross-attention, feed-forward; each residual."""

    def __init__(self, config: RetroConfig, has_cca: bool) -> None:
        super().__init__()
        dim, scale = config.dec_dim, config.dec_scale_residual
        self.is_retnet = config.decoder_type == "retnet"
        if self.is_retnet:
            from retlm.layers.retention import MultiScaleRetention  # the RetNet decoder only

            self.self_attn: nn.Module = MultiScaleRetention(
                dim,
                config.retnet_heads,
                config.retnet_qk_dim,
                config.retnet_v_dim,
                use_default_gamma=config.retnet_use_default_gamma,
            )
        else:
            self.self_attn = Attention(
                dim,
                heads=config.heads,
                dim_head=config.dim_head,
                causal=True,
                dropout=config.dec_attn_dropout,
                rotary_dim=config.rotary_dim,
            )
        self.self_attn_norm = Residual(dim, config, scale)
        self.cca = (
            ChunkedCrossAttention(
                dim,
                config.chunk_size,
                heads=config.heads,
                dim_head=config.dim_head,
                dropout=config.dec_attn_dropout,
                rotary_dim=config.rotary_dim,
                query_positions=config.cca_query_positions,
            )
            if has_cca
            else None
        )
        self.cca_norm = Residual(dim, config, scale) if has_cca else None
        if self.cca is not None and config.zero_init_cca:
            self.cca.attn.to_out.zero_init = True  # read by RetroPreTrainedModel._init_weights
        self.ff = feed_forward(dim, config, config.dec_ff_dropout)
        self.ff_norm = Residual(dim, config, scale)

    def mix(
        self, x: Tensor, start: int, state: Any, *, keep_state: bool, mode: str, retnet_chunk_size: int
    ) -> tuple[Tensor, Any]:
        """Self-attention / retention sub-layer for positions ``start ..``; returns ``(x, new_state)``."""
        h = self.self_attn_norm.pre(x)
        if self.is_retnet:
            h, state = self.self_attn(
                h, start, None, state, mode=mode, chunk_size=retnet_chunk_size, return_state=keep_state
            )
        else:
            positions = torch.arange(start, start + x.shape[1], device=x.device)
            h, state = self.self_attn(h, q_positions=positions, kv_cache=state, return_kv=keep_state)
        return self.self_attn_norm.post(x, h), state

    def cross(self, x: Tensor, start: int, neighbours: tuple[Tensor, Tensor, Tensor | None]) -> Tensor:
        return cross_attend(self.cca, self.cca_norm, x, start, neighbours)

    def feed_forward(self, x: Tensor) -> Tensor:
        return self.ff_norm.post(x, self.ff(self.ff_norm.pre(x)))

    def forward(
        self,
        x: Tensor,
        start: int,
        state: Any,
        *,
        keep_state: bool,
        mode: str,
        retnet_chunk_size: int,
        neighbours: Any = None,
    ) -> tuple[Tensor, Any]:
        """One decoder layer for positions ``start ..``: ``x (batch, seq, dec_dim)`` -> ``(x, new_state)``.

        ``neighbours``: the encoded neighbours of the groups these positions touch (see
        :meth:`RetroModel.neighbours_for_call`), or a callable that computes them from this layer's
        post-attention states (the first CCA layer conditions the encoder on them), or None.
        """
        x, state = self.mix(
            x, start, state, keep_state=keep_state, mode=mode, retnet_chunk_size=retnet_chunk_size
        )
        if callable(neighbours):
            neighbours = neighbours(x)
        if self.cca is not None and neighbours is not None:
            x = self.cross(x, start, neighbours)
        return self.feed_forward(x), state


def cross_attend(
    cca: ChunkedCrossAttention,
    cca_norm: Residual,
    x: Tensor,
    start: int,
    neighbours: tuple[Tensor, Tensor, Tensor | None],
) -> Tensor:
    """The residual CCA sub-layer ``x + CCA(norm(x), neighbours)`` for positions ``start ..`` of
    ``x (batch, seq, dim)``; ``neighbours`` as returned by :func:`neighbours_for_call`."""
    encoded, mask, group_valid = neighbours
    h = cca(cca_norm.pre(x), encoded, mask, start=start, group_valid=group_valid)
    return cca_norm.post(x, h)


# -- models -------------------------------------------------------------------------------------------


class RetroPreTrainedModel(PreTrainedModel):
    config: RetroConfig
    config_class = RetroConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["RetroDecoderLayer", "RetroEncoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _is_stateful = True

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> Any:
        """transformers' ``from_pretrained``, but a checkpoint that does not fit the model's config (missing,
        unexpected or differently shaped tensors) is refused with a ValueError instead of being patched
        with fresh weights."""
        want_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs
            )
        except RuntimeError as error:
            if "mismatched" not in str(error):
                raise
            raise ValueError(
                f"the checkpoint in {pretrained_model_name_or_path} was saved from another RETRO config "
                f"(tensor shapes differ{config_difference(pretrained_model_name_or_path, kwargs)}); "
                "load it with the config.json saved beside it"
            ) from error
        wrong = {name: info.get(name) for name in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        wrong = {name: sorted(map(str, keys))[:6] for name, keys in wrong.items() if keys}
        if wrong:
            raise ValueError(
                f"the checkpoint in {pretrained_model_name_or_path} does not fit this RETRO config "
                f"({wrong}{config_difference(pretrained_model_name_or_path, kwargs)}); "
                "load it with the config.json saved beside it"
            )
        return (model, info) if want_info else model

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        init_retro_module(module)


def init_retro_module(module: nn.Module) -> None:
    """RETRO's initialisation beyond transformers' default (which runs first): zeroed CCA output
    projections (``zero_init``), unit norm gains, normal null keys and values."""
    if getattr(module, "zero_init", False):  # RetroConfig.zero_init_cca; drawn first, so that every
        init.zeros_(module.weight)  # other weight is initialised exactly as without the option
        init.zeros_(module.bias)
    if isinstance(module, ScaledL2Norm):
        init.ones_(module.gamma)
    if isinstance(module, GatedScaledL2Norm):
        init.ones_(module.weight)
    if isinstance(module, Attention) and module.null_k is not None:
        init.normal_(module.null_k)
        init.normal_(module.null_v)


def at_least_float32(logits: Tensor) -> Tensor:
    """Half-precision logits are upcast for the loss; float64 stays float64."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def config_difference(path: Any, kwargs: dict[str, Any]) -> str:
    """``"; config differs from the saved one in {field: (saved, given)}"`` when a config was passed."""
    given = kwargs.get("config")
    if not isinstance(given, RetroConfig):
        return ""
    try:
        saved = RetroConfig.from_pretrained(path).to_dict()
    except (OSError, ValueError):
        return ""
    ignored = {"transformers_version", "architectures", "dtype", "torch_dtype"}
    diff = {
        key: (saved.get(key), value)
        for key, value in given.to_dict().items()
        if key not in ignored and saved.get(key) != value
    }
    return f"; the config differs from the saved one in {{field: (saved, given)}} = {diff}" if diff else ""


def check_right_padding(attention_mask: Tensor | None) -> None:
    """Only right padding is supported: a causal model never looks at the padding after a row's end."""
    if attention_mask is None:
        return
    mask = attention_mask.bool()
    if (mask[:, 1:] & ~mask[:, :-1]).any():
        raise ValueError(
            "RETRO supports right padding only (attention_mask of ones followed by zeros); "
            "left-padded rows would shift positions and chunk boundaries"
        )


def _mix_only(layer: RetroDecoderLayer, x: Tensor, start: int, mode: str, chunk_size: int) -> Tensor:
    """A decoder layer's self-attention / retention sub-layer without a cache ``(batch, seq, dim)``."""
    return layer.mix(x, start, None, keep_state=False, mode=mode, retnet_chunk_size=chunk_size)[0]


def _cross_and_feed_forward(
    layer: RetroDecoderLayer,
    x: Tensor,
    start: int,
    encoded: Tensor | None,
    mask: Tensor | None,
    group_valid: Tensor | None,
) -> Tensor:
    """A decoder layer's chunked cross-attention (when it has one and there are neighbours: ``encoded
    (batch, groups, k, r, dim)``, ``mask (batch, groups, k, r)``) and its feed-forward."""
    if layer.cca is not None and encoded is not None:
        x = layer.cross(x, start, (encoded, mask, group_valid))
    return layer.feed_forward(x)


def check_retrieved(
    retrieved: Tensor | None, chunk_size: int, batch: int, start: int, seq_len: int, incremental: bool
) -> Tensor | None:
    """Validate the ``retrieved`` argument of a call that feeds positions ``start .. start+seq_len-1`` and
    return it as ``(batch, completed_chunks, k, r)`` (see :meth:`RetroModel.forward`)."""
    if retrieved is None:
        return None
    c = chunk_size
    _, num_new = chunks_completed(start, seq_len, c)
    if retrieved.dim() == 3:  # one chunk's k neighbours (decoding), or the seed's single neighbour
        retrieved = retrieved[:, None] if incremental else retrieved[:, :, None]
    where = f"positions {start}..{start + seq_len - 1}" if incremental else f"sequence length {seq_len}"
    expected = f"(batch={batch}, num_chunks={num_new}, num_neighbours, {2 * c})"
    if retrieved.dim() != 4 or retrieved.shape[0] != batch or retrieved.shape[1] != num_new:
        raise ValueError(
            f"retrieved must have shape {expected} for {where} with chunk_size={c} "
            f"(one entry per chunk completed by these tokens), got {tuple(retrieved.shape)}"
        )
    if retrieved.shape[3] < c:
        raise ValueError(
            f"retrieved chunks must hold at least chunk_size={c} tokens (neighbour + continuation: "
            f"{2 * c}); expected shape {expected}, got {tuple(retrieved.shape)}"
        )
    if retrieved.is_floating_point():
        raise ValueError(f"retrieved must hold token ids (an integer tensor), got {retrieved.dtype}")
    return retrieved


def encode_neighbours(
    embed: Callable[[Tensor], Tensor], encoder: RetroEncoder, pad_id: int, retrieved: Tensor, context: Tensor
) -> tuple[Tensor, Tensor]:
    """Embed (``embed``: token ids -> ``enc_dim`` vectors) and encode neighbours.

    ``retrieved (batch, u, k, r)`` token ids (``pad_id`` or -1 = missing), ``context (batch, u, c, dec_dim)``
    decoder states of the retrieving chunks -> ``(encoded (batch, u, k, r, dec_dim), mask (batch, u, k, r))``.
    """
    batch = retrieved.shape[0]
    mask = (retrieved != pad_id) & (retrieved >= 0)
    tokens = embed(retrieved.clamp(min=0).long())
    encoded = encoder(
        rearrange(tokens, "b u k r d -> (b u) k r d"),
        rearrange(mask, "b u k r -> (b u) k r"),
        rearrange(context, "b u n d -> (b u) n d"),
    )
    return rearrange(encoded, "(b u) k r d -> b u k r d", b=batch), mask


def neighbours_for_call(
    x: Tensor,
    retrieved: Tensor | None,
    start: int,
    cache: RetroCache | None,
    chunk_size: int,
    encode: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]],
) -> tuple[Tensor, Tensor, Tensor | None] | None:
    """Encode the neighbours of the chunks completed by this call and collect, for every CCA group the
    call's positions touch, its encoded neighbours.

    ``x (batch, seq, dec_dim)``: decoder states of positions ``start ..`` at the layer that conditions the
    encoder; ``retrieved (batch, completed_chunks, k, r)`` or None; ``cache``: the decoding state (its
    ``context``, ``neighbours`` and ``neighbour_mask`` are read and updated), or None for a full forward;
    ``encode(retrieved, context)`` as :func:`encode_neighbours`. Returns ``(encoded (b, g, k, r, d),
    mask (b, g, k, r), group_valid (g,) or None)`` or None when no group has neighbours.
    """
    c = chunk_size
    _, num_new = chunks_completed(start, x.shape[1], c)
    context = x if cache is None or cache.context is None else torch.cat((cache.context, x), dim=1)
    new = None
    if retrieved is not None and num_new > 0:
        chunk_context = rearrange(context[:, : num_new * c], "b (u n) d -> b u n d", n=c)
        new = encode(retrieved, chunk_context)
    _, num_groups = cca_groups(start, x.shape[1], c)
    from_cache = num_groups - num_new  # 1 when the first group's chunk was completed earlier
    old = None
    if from_cache and cache is not None and cache.neighbours is not None:
        old = (cache.neighbours[:, None], cache.neighbour_mask[:, None])
    if cache is not None:
        cache.context = context[:, num_new * c :]
        if num_new > 0:
            cache.neighbours = None if new is None else new[0][:, -1]
            cache.neighbour_mask = None if new is None else new[1][:, -1]
    if num_groups == 0 or (new is None and old is None):
        return None
    template = new if new is not None else old
    if new is not None and old is not None and new[1].shape[2:] != old[1].shape[2:]:
        raise ValueError(
            "the neighbours of consecutive chunks must have the same (num_neighbours, length); "
            f"cached {tuple(old[1].shape[2:])}, new {tuple(new[1].shape[2:])}"
        )
    encoded, masks, flags = [], [], []
    for part, count in ((old, from_cache), (new, num_new)):
        if count == 0:
            continue
        flags += [part is not None] * count
        if part is None:  # these groups had no retrieval: zeros in, and their output is dropped
            part = tuple(t[:, :1].new_zeros(t[:, :1].shape).expand(-1, count, *t.shape[2:]) for t in template)
        encoded.append(part[0])
        masks.append(part[1])
    group_valid = None if all(flags) else torch.tensor(flags, device=x.device)
    return torch.cat(encoded, dim=1), torch.cat(masks, dim=1), group_valid


class RetroModel(RetroPreTrainedModel):
    """Embeddings, encoder, decoder and final norm. Returns decoder hidden states and the cache."""

    def __init__(self, config: RetroConfig) -> None:
        super().__init__(config)
        self.token_emb = nn.Embedding(config.num_tokens, config.enc_dim)
        self.pos_emb = (
            nn.Embedding(config.max_seq_len, config.enc_dim) if config.absolute_position_embedding else None
        )
        self.to_decoder_model_dim = (
            nn.Linear(config.enc_dim, config.dec_dim) if config.enc_dim != config.dec_dim else nn.Identity()
        )
        self.encoder = RetroEncoder(config)
        self.layers = nn.ModuleList(
            RetroDecoderLayer(config, config.dec_has_cca(i)) for i in range(1, config.dec_depth + 1)
        )
        self.norm_out = final_norm(config.dec_dim, config)
        cca_layers = [i for i, layer in enumerate(self.layers) if layer.cca is not None]
        self.context_layer = cca_layers[0] if cca_layers else None
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.token_emb

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.token_emb = value

    # -- input checks ---------------------------------------------------------------------------------

    def check_retrieved(
        self, retrieved: Tensor | None, batch: int, start: int, seq_len: int, incremental: bool
    ) -> Tensor | None:
        """Validate ``retrieved`` and return it as ``(batch, completed_chunks, k, r)``."""
        return check_retrieved(retrieved, self.config.chunk_size, batch, start, seq_len, incremental)

    # -- pieces ---------------------------------------------------------------------------------------

    def embed(self, input_ids: Tensor, start: int) -> Tensor:
        x = self.token_emb(input_ids)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(start, start + input_ids.shape[1], device=x.device))
        return self.to_decoder_model_dim(x)

    def encode_neighbours(self, retrieved: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
        """``retrieved (batch, u, k, r)`` token ids (pad or -1 = missing), ``context (batch, u, c, dec_dim)``
        -> ``(encoded (batch, u, k, r, dec_dim), mask (batch, u, k, r))``."""
        return encode_neighbours(self.token_emb, self.encoder, self.config.pad_id, retrieved, context)

    def neighbours_for_call(
        self, x: Tensor, retrieved: Tensor | None, start: int, cache: RetroCache | None
    ) -> tuple[Tensor, Tensor, Tensor | None] | None:
        """See :func:`neighbours_for_call`."""
        return neighbours_for_call(x, retrieved, start, cache, self.config.chunk_size, self.encode_neighbours)

    # -- forward --------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: Tensor,
        retrieved: Tensor | None = None,
        attention_mask: Tensor | None = None,
        past_key_values: RetroCache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        retnet_mode: str | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithCache | tuple:
        """
        Args:
            input_ids: ``(batch, seq)`` new tokens (after those already in ``past_key_values``).
            retrieved: neighbours (+ continuations) token ids of the chunks completed by these tokens,
                ``(batch, num_chunks, k, 2 * chunk_size)`` (without a cache: ``num_chunks = seq //
                chunk_size``; a 3-D tensor is ``(batch, num_chunks, r)``, one neighbour), or with a cache
                ``(batch, k, r)`` for one chunk. ``pad_id`` and -1 tokens are masked. None = no retrieval.
            attention_mask: ``(batch, seq)``; only right padding is accepted (and needs no masking).
            past_key_values: a :class:`RetroCache` from an earlier call, continued in place (or
                ``cache=``, transformers >= 5.24's name).
            use_cache: return a cache (always True when ``past_key_values`` is given: it is continued).
            retnet_mode: "parallel" | "chunkwise" | "recurrent" for the RetNet decoder (default from the
                config); all give the same result.
        """
        config = self.config
        if input_ids is None or input_ids.dim() != 2:
            raise ValueError("input_ids must be a (batch, seq) tensor of token ids")
        check_right_padding(attention_mask)
        batch, seq_len = input_ids.shape
        cache = resolve_cache(past_key_values, kwargs)
        start = cache.position if cache is not None else 0
        if start + seq_len > config.max_seq_len:
            raise ValueError(
                f"sequence length {start + seq_len} exceeds max_seq_len={config.max_seq_len}; "
                f"expected at most (batch, {config.max_seq_len}) tokens in all"
            )
        retrieved = self.check_retrieved(retrieved, batch, start, seq_len, incremental=cache is not None)
        mode = retnet_mode or config.retnet_mode
        if mode not in RETENTION_MODES:
            raise ValueError(f"unknown retnet_mode {mode!r}; expected one of {RETENTION_MODES}")
        use_cache = cache is not None or bool(use_cache)  # a passed cache is always continued
        if use_cache and cache is None:
            cache = RetroCache()
        if cache is not None and not cache.layers:
            cache.layers = [None] * len(self.layers)
        keep = cache if use_cache else None

        x = self.embed(input_ids, start)
        hidden_states = [x] if output_hidden_states else None
        found: dict[str, Any] = {}  # the encoded neighbours, once the first CCA layer has computed them

        def encode_at_context_layer(h: Tensor) -> tuple[Tensor, Tensor, Tensor | None] | None:
            found["neighbours"] = self.neighbours_for_call(h, retrieved, start, keep)
            return found["neighbours"]

        # Gradient checkpointing (training without a cache): each layer's sublayers, and the encoder run,
        # keep only their inputs and are recomputed in backward (dropout replays the same masks).
        checkpointing = self.gradient_checkpointing and self.training and keep is None
        neighbours = None
        for i, layer in enumerate(self.layers):
            state = cache.layers[i] if cache is not None else None
            if not checkpointing:
                x, state = layer(
                    x,
                    start,
                    state,
                    keep_state=keep is not None,
                    mode=mode,
                    retnet_chunk_size=config.retnet_chunk_size,
                    neighbours=encode_at_context_layer
                    if i == self.context_layer
                    else found.get("neighbours"),
                )
            else:
                x = self._gradient_checkpointing_func(
                    _mix_only, layer, x, start, mode, config.retnet_chunk_size
                )
                if i == self.context_layer and retrieved is not None:
                    neighbours = self._gradient_checkpointing_func(
                        self.neighbours_for_call, x, retrieved, start, None
                    )
                # the neighbours go in as separate tensors: a reentrant checkpoint tracks only top-level ones
                parts = neighbours if neighbours is not None else (None, None, None)
                x = self._gradient_checkpointing_func(_cross_and_feed_forward, layer, x, start, *parts)
            if keep is not None:
                keep.layers[i] = state
            if hidden_states is not None:
                hidden_states.append(x)
        x = self.norm_out(x)
        if keep is not None:
            keep.position = start + seq_len
        out = BaseModelOutputWithCache(
            last_hidden_state=x,
            hidden_states=tuple(hidden_states) if hidden_states is not None else None,
            **cache_kwargs(keep),
        )
        return out if return_dict is not False else out.to_tuple()


class RetroForCausalLM(RetroPreTrainedModel, GenerationMixin):
    """RetroModel + a linear LM head (``to_logits``, with bias; its weight is the token embedding's when
    ``config.tie_word_embeddings``, else its own, as retro-pytorch).

    ``forward(input_ids, retrieved=None, attention_mask=None, labels=None, past_key_values=None,
    use_cache=None, ...)`` returns :class:`CausalLMOutputWithCache`; ``labels (batch, seq)`` are shifted
    inside (-100 = ignored). See the module docstring for incremental decoding.
    """

    _tied_weights_keys = {"to_logits.weight": "model.token_emb.weight"}  # only if tie_word_embeddings

    def __init__(self, config: RetroConfig) -> None:
        super().__init__(config)
        self.model = RetroModel(config)
        self.to_logits = nn.Linear(config.dec_dim, config.num_tokens)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.token_emb

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.token_emb = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.to_logits

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.to_logits = value

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model builds its own RetroCache

    def generate(self, *args: Any, retrieval_database: Any = None, **kwargs: Any) -> Any:
        """HF ``generate``, or, with ``retrieval_database=db``, generation that retrieves from ``db`` at
        every chunk boundary (see :func:`retlm.models.retro.generation.generate_with_retrieval`, whose
        keyword options it takes: ``max_new_tokens, do_sample, temperature, top_k, top_p, ...``); it then
        returns a :class:`RetrievalGenerateOutput` with the sequences and the neighbours used per chunk."""
        if retrieval_database is None:
            return super().generate(*args, **kwargs)
        from retlm.models.retro.generation import generate_with_retrieval

        input_ids = kwargs.pop("input_ids", args[0] if args else None)
        kwargs.pop("attention_mask", None)
        return generate_with_retrieval(self, retrieval_database, input_ids, **kwargs)

    def forward(
        self,
        input_ids: Tensor | None = None,
        retrieved: Tensor | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        past_key_values: RetroCache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        retnet_mode: str | None = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithCache | tuple:
        outputs = self.model(
            input_ids=input_ids,
            retrieved=retrieved,
            attention_mask=attention_mask,
            past_key_values=resolve_cache(past_key_values, kwargs),
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            retnet_mode=retnet_mode,
        )
        hidden = outputs.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.to_logits(hidden)
        loss = None
        shift_labels = kwargs.pop("shift_labels", None)
        if labels is not None or shift_labels is not None:
            # HF's convention: ``labels`` are shifted here; ``shift_labels`` (as HF's loss functions take
            # them) are already aligned with the logits and hold the last position's target too.
            if shift_labels is None:
                logits_for_loss, shift_labels = logits[:, :-1], labels[:, 1:]
            else:
                logits_for_loss = logits
            loss = F.cross_entropy(
                rearrange(at_least_float32(logits_for_loss), "b n v -> (b n) v"),
                rearrange(shift_labels.to(logits.device), "b n -> (b n)"),
                ignore_index=-100,
            )
        out = CausalLMOutputWithCache(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            **cache_kwargs(outputs.past_key_values),
        )
        return out.to_tuple() if return_dict is False else out


class RETRO(RetroForCausalLM):
    """The seed's interface: ``RETRO(chunk_size=..., max_seq_len=..., enc_dim=..., ...)`` (any
    :class:`RetroConfig` argument) and ``forward(seq, retrieved=None, return_loss=False)``.

    ``seq``: ``(batch, n)``, or ``(batch, n + 1)`` when ``return_loss`` (split into inputs and labels;
    ``pad_id`` labels are ignored). ``retrieved``: ``(batch, n // chunk_size, k, 2 * chunk_size)`` or None.
    Returns logits ``(batch, n, num_tokens)`` or the scalar loss. Called with HF keywords
    (``input_ids=...``) it behaves as :class:`RetroForCausalLM`.
    """

    def __init__(self, config: RetroConfig | None = None, **kwargs: Any) -> None:
        if config is None:
            config = RetroConfig(**kwargs)
        elif kwargs:
            raise ValueError(
                f"pass either a RetroConfig or keyword arguments, not both (got {sorted(kwargs)})"
            )
        super().__init__(config)

    def forward(  # type: ignore[override]
        self,
        seq: Tensor | None = None,
        retrieved: Tensor | None = None,
        return_loss: bool = False,
        **kwargs: Any,
    ) -> Tensor | CausalLMOutputWithCache | tuple:
        if seq is None or kwargs:
            return super().forward(input_ids=kwargs.pop("input_ids", seq), retrieved=retrieved, **kwargs)
        if not return_loss:
            return super().forward(input_ids=seq, retrieved=retrieved).logits
        # the seed's loss is the model's, with its targets mapped onto HF's: pad_id targets are ignored
        targets = seq[:, 1:].long().masked_fill(seq[:, 1:] == self.config.pad_id, -100)
        return super().forward(input_ids=seq[:, :-1], retrieved=retrieved, shift_labels=targets).loss
