"""RETRO (arXiv 2112.04426) as a transformers model, with a transformer or a RetNet decoder.

    tokens --token_emb (enc_dim) [+ absolute positions] --> to_decoder_model_dim --> decoder layers:
        x = x + SelfAttention(norm(x))           causal attention, or multi-scale retention (RetNet)
        [first CCA layer: encode the neighbors of every completed chunk, conditioned on x of that chunk]
        x = x + CCA(norm(x), encoded neighbors)  at dec_cross_attn_layers
        x = x + FFN(norm(x))
    --> norm --> to_logits

Encoder (per neighbor + continuation, bidirectional): self-attention over the neighbor's tokens,
cross-attention to the decoder states of the chunk that retrieved it, FFN; then norm and a projection
to dec_dim. CCA alignment and causality are described in :mod:`retlm.ops.attention`: the tokens of
chunk u+1 (and the last token of chunk u) read the neighbors of chunk u, never a neighbor
retrieved with their own future.

Incremental decoding (the generation loop drives it):

    cache = None
    out = model(input_ids=prompt, retrieved=neighbors_of_prompt_chunks, use_cache=True)
    cache = out.past_key_values                     # RetroCache
    out = model(input_ids=next_tokens, past_key_values=cache, retrieved=r)

A call must receive, in ``retrieved``, the neighbors of every chunk whose LAST token is among its
``input_ids`` (chunk u ends at position u*c + c - 1): shape ``(batch, num_completed, k, 2c)``, or
``(batch, k, 2c)`` for one chunk when a cache is passed. The caller can retrieve for chunk u before the
call because all of chunk u's tokens are then known. ``retrieved=None`` means "no retrieval" for those
chunks (their groups skip cross-attention). Token-by-token decoding gives the same logits as one full
forward with the same neighbors (tested).

Left padding (``attention_mask`` of zeros, then ones) batches prompts of different lengths: each row's
positions, chunks and neighbors are counted from its first real token, as if it ran alone
(:mod:`retlm.models.padding`, :func:`retlm.layers.neighbors.row_neighbors_for_call`).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.loss.loss_utils import fixed_cross_entropy
from transformers.utils import logging

from retlm.compat import BaseModelOutputWithCache, CausalLMOutputWithCache, cache_kwargs, resolve_cache
from retlm.layers.neighbor_encoder import RetroEncoder, final_norm, init_retrieval_weights
from retlm.layers.neighbors import (
    check_retrieved,
    encode_neighbors,
    neighbors_for_call,
    row_neighbors_for_call,
)
from retlm.models.padding import RowPadding, left_padding, row_padding
from retlm.models.retro.cache import RetroCache, RetroCacheLayer
from retlm.models.retro.configuration_retro import RetroConfig
from retlm.models.retro.decoder import RetroCall, RetroDecoderLayer
from retlm.models.retro.weights import StrictLoadingMixin
from retlm.ops.retention import RETENTION_MODES
from retlm.utils import deprecated_keyword

logger = logging.get_logger(__name__)

# -- models -------------------------------------------------------------------------------------------


class RetroPreTrainedModel(StrictLoadingMixin, PreTrainedModel):
    config: RetroConfig
    config_class = RetroConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["RetroDecoderLayer", "RetroEncoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _is_stateful = True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        init_retrieval_weights(module)

    @property
    def loss_function(self) -> Callable[..., Tensor]:
        return causal_lm_loss


class RetroModel(RetroPreTrainedModel):
    """Embeddings, encoder, decoder and final norm. Returns decoder hidden states and the cache."""

    # AutoModel.from_pretrained(a RetroForCausalLM folder): the head's weights are not this model's
    _keys_to_ignore_on_load_unexpected = [r"^to_logits\."]

    def __init__(self, config: RetroConfig) -> None:
        super().__init__(config)
        self.token_emb = nn.Embedding(config.num_tokens, config.enc_dim)
        self.pos_emb = (
            nn.Embedding(config.max_seq_len, config.enc_dim) if config.absolute_position_embedding else None
        )
        self.to_decoder_model_dim = (
            nn.Linear(config.enc_dim, config.dec_dim) if config.enc_dim != config.dec_dim else nn.Identity()
        )
        self.encoder = RetroEncoder(config.retrieval_layers())
        self.layers = nn.ModuleList(
            RetroDecoderLayer(config, config.dec_has_cca(i)) for i in range(1, config.dec_depth + 1)
        )
        self.norm_out = final_norm(config.dec_dim, config.retrieval_layers())
        cca_layers = [i for i, layer in enumerate(self.layers) if layer.cca is not None]
        self.context_layer = cca_layers[0] if cca_layers else None
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.token_emb

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.token_emb = value

    # -- input checks ---------------------------------------------------------------------------------

    def validate_inputs(
        self,
        input_ids: Tensor | None,
        retrieved: Tensor | None,
        attention_mask: Tensor | None,
        cache: Any,
        use_cache: bool | None,
        retention_mode: str | None,
    ) -> RetroCall:
        """Check one call's inputs (see :meth:`forward`) and return them normalised, with the cache to
        continue or fill (a passed cache is always continued; None when no cache is kept)."""
        config = self.config
        if input_ids is None or input_ids.dim() != 2:
            raise ValueError("input_ids must be a (batch, seq) tensor of token ids")
        batch, seq_len = input_ids.shape
        if cache is not None:
            self.check_cache(cache, batch)
        use_cache = self.cache_allowed(cache is not None or bool(use_cache))
        start = cache.position if cache is not None else 0
        known = None if cache is None else cache.padding
        pad = left_padding(attention_mask, known, start, seq_len, use_cache)
        dtype = self.token_emb.weight.dtype
        padding = None if pad is None else row_padding(pad.to(input_ids.device), start, seq_len, dtype)
        if padding is not None and self.checkpointing_active():
            raise ValueError(
                "left padding batches prompts for generation; train without it (or call .eval())"
            )
        if start + seq_len > config.max_seq_len:
            raise ValueError(
                f"sequence length {start + seq_len} exceeds max_seq_len={config.max_seq_len}; "
                f"expected at most (batch, {config.max_seq_len}) tokens in all"
            )
        row_starts = None if padding is None else padding.row_starts
        retrieved = check_retrieved(
            retrieved, config.chunk_size, batch, start, seq_len, cache is not None, row_starts
        )
        mode = retention_mode or config.retention_mode
        if mode not in RETENTION_MODES:
            raise ValueError(f"unknown retention_mode {mode!r}; expected one of {RETENTION_MODES}")
        if use_cache and cache is None:
            cache = RetroCache(len(self.layers))
        if cache is not None and not cache.layers:
            cache.layers = [RetroCacheLayer() for _ in self.layers]
        if cache is not None and padding is not None:
            cache.padding = padding.padding
        return RetroCall(start, retrieved, padding, mode, cache)

    def checkpointing_active(self) -> bool:
        """Whether the decoder layers run under gradient checkpointing in this call."""
        return self.gradient_checkpointing and self.training and torch.is_grad_enabled()

    def cache_allowed(self, use_cache: bool) -> bool:
        """HF's convention: gradient checkpointing (training) keeps no cache; continuing one is refused."""
        if not (use_cache and self.checkpointing_active()):
            return use_cache
        logger.warning_once("use_cache=True is incompatible with gradient checkpointing; not keeping a cache")
        return False

    def check_cache(self, cache: RetroCache, batch: int) -> None:
        """Refuse a cache of another type, depth or batch size than this call's ``(batch, seq)`` input."""
        if not isinstance(cache, RetroCache):
            raise ValueError(
                f"past_key_values must be a RetroCache (or None), got {type(cache).__name__}; "
                "pass the past_key_values returned by this model"
            )
        if self.checkpointing_active():
            raise ValueError("gradient checkpointing cannot continue a cache; call .eval() to decode")
        if cache.layers and len(cache.layers) != len(self.layers):
            raise ValueError(
                f"past_key_values comes from another config: it has {len(cache.layers)} layers, "
                f"this model has dec_depth={len(self.layers)}"
            )
        rows = cache.batch_size
        if rows >= 0 and rows != batch:
            raise ValueError(
                f"past_key_values holds {rows} rows but input_ids has batch {batch}; continue a cache "
                "with the batch it was built on (or select rows with cache.batch_select_indices)"
            )

    # -- pieces ---------------------------------------------------------------------------------------

    def embed(self, input_ids: Tensor, start: int, padding: RowPadding | None = None) -> Tensor:
        """``input_ids (batch, seq)`` at columns ``start ..`` -> ``(batch, seq, dec_dim)``; a left-padded
        row's absolute positions start at its first real token (its padding columns take position 0)."""
        x = self.token_emb(input_ids)
        if self.pos_emb is not None:
            positions = torch.arange(start, start + input_ids.shape[1], device=x.device)
            if padding is not None:
                positions = (positions[None] - padding.padding.to(x.device)[:, None]).clamp(min=0)
            x = x + self.pos_emb(positions)
        return self.to_decoder_model_dim(x)

    def encode_neighbors(self, retrieved: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
        """``retrieved (batch, u, k, r)`` token ids (pad or -1 = missing), ``context (batch, u, c, dec_dim)``
        -> ``(encoded (batch, u, k, r, dec_dim), mask (batch, u, k, r))``."""
        return encode_neighbors(self.token_emb, self.encoder, self.config.pad_id, retrieved, context)

    def neighbors_for_call(self, x: Tensor, call: RetroCall) -> Any:
        """The encoded neighbors of every CCA group of this call, from the decoder states ``x (batch, seq,
        dec_dim)`` at the first CCA layer (see :func:`~retlm.layers.neighbors.neighbors_for_call`, and
        :func:`~retlm.layers.neighbors.row_neighbors_for_call` for a left-padded batch)."""
        c, cache, padding = self.config.chunk_size, call.cache, call.padding
        if padding is not None:
            return row_neighbors_for_call(
                x, call.retrieved, padding.row_starts, cache, c, self.encode_neighbors
            )
        return neighbors_for_call(x, call.retrieved, call.start, cache, c, self.encode_neighbors)

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
        retention_mode: str | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithCache | tuple:
        """
        Args:
            input_ids: ``(batch, seq)`` new tokens (after those already in ``past_key_values``).
            retrieved: neighbors (+ continuations) token ids of the chunks completed by these tokens,
                ``(batch, num_chunks, k, 2 * chunk_size)`` (without a cache: ``num_chunks = seq //
                chunk_size``; a 3-D tensor is ``(batch, num_chunks, r)``, one neighbor), or with a cache
                ``(batch, k, r)`` for one chunk. ``pad_id`` and -1 tokens are masked. None = no retrieval.
            attention_mask: ``(batch, seq)``, or ``(batch, past + seq)`` with a cache (generate's growing
                mask); 1 = token, 0 = padding. Left padding (zeros, then ones) batches prompts of different
                lengths: each row's positions, chunks and neighbors are then counted from its first real
                token, as if it ran alone, and ``retrieved[i, u]`` holds the neighbors of row i's u-th
                chunk (``num_chunks`` = the most chunks a row completes; extra entries of shorter rows are
                ignored). Right padding is accepted without a cache only (it needs no masking); holes are
                refused.
            past_key_values: a :class:`RetroCache` from an earlier call, continued in place (or
                ``cache=``, transformers >= 5.24's name).
            use_cache: return a cache (always True when ``past_key_values`` is given: it is continued).
            retention_mode: "parallel" | "chunkwise" | "recurrent" for the RetNet decoder (default from the
                config); all give the same result.
        """
        retention_mode = retention_mode or deprecated_keyword(kwargs, "retnet_mode", "retention_mode")
        cache = resolve_cache(past_key_values, kwargs)
        call = self.validate_inputs(input_ids, retrieved, attention_mask, cache, use_cache, retention_mode)
        cache, start = call.cache, call.start
        x = self.embed(input_ids, start, call.padding)
        hidden_states = [x] if output_hidden_states else None
        neighbors: list[Any] = []
        for i, layer in enumerate(self.layers):
            x, *neighbors = layer(
                x,
                *neighbors,
                call=call,
                cache_layer=cache.layers[i] if cache is not None else None,
                encode=partial(self.neighbors_for_call, call=call) if i == self.context_layer else None,
            )
            if hidden_states is not None:
                hidden_states.append(x)
        if cache is not None:
            cache.position = start + input_ids.shape[1]
        out = BaseModelOutputWithCache(
            last_hidden_state=self.norm_out(x),
            hidden_states=tuple(hidden_states) if hidden_states is not None else None,
            **cache_kwargs(cache),
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
        every chunk boundary (see :func:`retlm.models.retrieval_generation.generate_with_retrieval`, whose
        keyword options it takes: ``max_new_tokens, do_sample, temperature, top_k, top_p, ...``); it then
        returns a :class:`RetrievalGenerateOutput` with the sequences and the neighbors used per chunk.
        Either way, a left-padded ``attention_mask`` batches prompts of different lengths (each row as if
        alone, retrieving at its own chunk boundaries)."""
        if retrieval_database is None:
            return super().generate(*args, **kwargs)
        from retlm.models.retrieval_generation import generate_with_retrieval

        input_ids = kwargs.pop("input_ids", args[0] if args else None)
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
        retention_mode: str | None = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithCache | tuple:
        """:meth:`RetroModel.forward`'s arguments, and ``labels (batch, seq)`` (HF's: shifted inside,
        -100 ignored) or ``shift_labels`` (already aligned with the logits) for the loss, computed by
        ``self.loss_function`` (which also takes the Trainer's ``num_items_in_batch``)."""
        outputs = self.model(
            input_ids=input_ids,
            retrieved=retrieved,
            attention_mask=attention_mask,
            past_key_values=resolve_cache(past_key_values, kwargs),
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            retention_mode=retention_mode or deprecated_keyword(kwargs, "retnet_mode", "retention_mode"),
        )
        hidden = outputs.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.to_logits(hidden)
        loss = None
        if labels is not None or kwargs.get("shift_labels") is not None:
            loss = self.loss_function(logits, labels, self.config.vocab_size, **kwargs)
        out = CausalLMOutputWithCache(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            **cache_kwargs(outputs.past_key_values),
        )
        return out.to_tuple() if return_dict is False else out


def causal_lm_loss(
    logits: Tensor,
    labels: Tensor | None,
    vocab_size: int,
    num_items_in_batch: Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: Tensor | None = None,
    **kwargs: Any,
) -> Tensor:
    """transformers' ``ForCausalLMLoss`` (``labels (batch, seq)`` shifted here, or ``shift_labels``
    aligned with ``logits (batch, seq, vocab)``; ``ignore_index`` skipped; a sum over
    ``num_items_in_batch`` when the Trainer gives it), but float64 logits stay float64 (half precision is
    upcast to float32, as there)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    targets = shift_labels.reshape(-1).to(logits.device)
    return fixed_cross_entropy(logits.reshape(-1, vocab_size), targets, num_items_in_batch, ignore_index)
