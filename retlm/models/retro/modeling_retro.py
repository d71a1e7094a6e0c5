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

from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel

from retlm.compat import BaseModelOutputWithCache, CausalLMOutputWithCache, cache_kwargs, resolve_cache
from retlm.layers.neighbor_encoder import RetroEncoder, final_norm, init_retrieval_weights
from retlm.layers.neighbors import (
    check_retrieved,
    encode_neighbors,
    neighbors_for_call,
    row_neighbors_for_call,
)
from retlm.models.padding import RowPadding, left_padding, row_padding
from retlm.models.retro.cache import RetroCache
from retlm.models.retro.configuration_retro import RetroConfig
from retlm.models.retro.decoder import RetroDecoderLayer, cross_and_feed_forward, mix_only
from retlm.models.retro.weights import StrictLoadingMixin
from retlm.ops.retention import RETENTION_MODES

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


def at_least_float32(logits: Tensor) -> Tensor:
    """Half-precision logits are upcast for the loss; float64 stays float64."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


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

    def check_retrieved(
        self,
        retrieved: Tensor | None,
        batch: int,
        start: int,
        seq_len: int,
        incremental: bool,
        row_starts: Tensor | None = None,
    ) -> Tensor | None:
        """Validate ``retrieved`` and return it as ``(batch, completed_chunks, k, r)``."""
        return check_retrieved(
            retrieved, self.config.chunk_size, batch, start, seq_len, incremental, row_starts
        )

    def check_cache(self, cache: RetroCache, batch: int) -> None:
        """Refuse a cache of another type, depth or batch size than this call's ``(batch, seq)`` input."""
        if not isinstance(cache, RetroCache):
            raise ValueError(
                f"past_key_values must be a RetroCache (or None), got {type(cache).__name__}; "
                "pass the past_key_values returned by this model"
            )
        if cache.layers and len(cache.layers) != len(self.layers):
            raise ValueError(
                f"past_key_values comes from another config: it has {len(cache.layers)} layers, "
                f"this model has dec_depth={len(self.layers)}"
            )
        rows = cache.batch_size()
        if rows is not None and rows != batch:
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

    def neighbors_for_call(
        self,
        x: Tensor,
        retrieved: Tensor | None,
        start: int,
        cache: RetroCache | None,
        padding: RowPadding | None = None,
    ) -> Any:
        """See :func:`neighbors_for_call`, and :func:`row_neighbors_for_call` for a left-padded batch."""
        c = self.config.chunk_size
        if padding is not None:
            return row_neighbors_for_call(x, retrieved, padding.row_starts, cache, c, self.encode_neighbors)
        return neighbors_for_call(x, retrieved, start, cache, c, self.encode_neighbors)

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
            retnet_mode: "parallel" | "chunkwise" | "recurrent" for the RetNet decoder (default from the
                config); all give the same result.
        """
        config = self.config
        if input_ids is None or input_ids.dim() != 2:
            raise ValueError("input_ids must be a (batch, seq) tensor of token ids")
        batch, seq_len = input_ids.shape
        cache = resolve_cache(past_key_values, kwargs)
        if cache is not None:
            self.check_cache(cache, batch)
        start = cache.position if cache is not None else 0
        pad = left_padding(
            attention_mask,
            None if cache is None else cache.padding,
            start,
            seq_len,
            cache is not None or bool(use_cache),
        )
        dtype = self.token_emb.weight.dtype
        padding = None if pad is None else row_padding(pad.to(input_ids.device), start, seq_len, dtype)
        if start + seq_len > config.max_seq_len:
            raise ValueError(
                f"sequence length {start + seq_len} exceeds max_seq_len={config.max_seq_len}; "
                f"expected at most (batch, {config.max_seq_len}) tokens in all"
            )
        retrieved = self.check_retrieved(
            retrieved,
            batch,
            start,
            seq_len,
            incremental=cache is not None,
            row_starts=None if padding is None else padding.row_starts,
        )
        mode = retnet_mode or config.retnet_mode
        if mode not in RETENTION_MODES:
            raise ValueError(f"unknown retnet_mode {mode!r}; expected one of {RETENTION_MODES}")
        use_cache = cache is not None or bool(use_cache)  # a passed cache is always continued
        if use_cache and cache is None:
            cache = RetroCache()
        if cache is not None and not cache.layers:
            cache.layers = [None] * len(self.layers)
        if cache is not None and padding is not None:
            cache.padding = padding.padding
        keep = cache if use_cache else None

        x = self.embed(input_ids, start, padding)
        hidden_states = [x] if output_hidden_states else None
        found: dict[str, Any] = {}  # the encoded neighbors, once the first CCA layer has computed them

        def encode_at_context_layer(h: Tensor) -> Any:
            found["neighbors"] = self.neighbors_for_call(h, retrieved, start, keep, padding)
            return found["neighbors"]

        # Gradient checkpointing (training without a cache): each layer's sublayers, and the encoder run,
        # keep only their inputs and are recomputed in backward (dropout replays the same masks).
        # (a left-padded batch, for generation, runs without it)
        checkpointing = self.gradient_checkpointing and self.training and keep is None and padding is None
        neighbors = None
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
                    neighbors=encode_at_context_layer if i == self.context_layer else found.get("neighbors"),
                    padding=padding,
                )
            else:
                x = self._gradient_checkpointing_func(
                    mix_only, layer, x, start, mode, config.retnet_chunk_size
                )
                if i == self.context_layer and retrieved is not None:
                    neighbors = self._gradient_checkpointing_func(
                        self.neighbors_for_call, x, retrieved, start, None
                    )
                # the neighbors go in as separate tensors: a reentrant checkpoint tracks only top-level ones
                parts = neighbors if neighbors is not None else (None, None, None)
                x = self._gradient_checkpointing_func(cross_and_feed_forward, layer, x, start, *parts)
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
