"""RetNet (arXiv 2307.08621) as a transformers model: RetNetModel, RetNetForCausalLM.

Block (pre-norm, torchscale's layout and parameter names):

    x = x + dropout(MSR(norm(x)))        MSR: retlm.layers.retention.MultiScaleRetention
    x = x + FFN(norm(x))                 FFN: GLU or plain, retlm.layers.feedforward.FeedForward

Every forward picks a retention mode (``retention_mode``: "parallel", "chunkwise", "recurrent"); the
three compute the same function, and a cache written in one mode can be continued in any other.
Padding is handled per row: positions start at each row's first real token, and padded positions
leave no trace. One-token decoding steps take the path of :mod:`retlm.models.retnet.decoding`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer

from retlm.compat import BaseModelOutputWithCache, CausalLMOutputWithCache, cache_kwargs, resolve_cache
from retlm.layers.feedforward import FeedForward
from retlm.layers.norm import build_norm
from retlm.layers.retention import MultiScaleRetention, RetentionState, StepTables
from retlm.models.padding import leading_padding
from retlm.models.retnet.cache import RetNetCache
from retlm.models.retnet.configuration_retnet import RetNetConfig, renamed_retention_kwargs
from retlm.models.retnet.decoding import RetNetDecodingMixin
from retlm.ops.retention import RETENTION_MODES, check_block_size


class RetNetDecoderLayer(GradientCheckpointingLayer):
    """One pre-norm RetNet block: retention then feed-forward, each with a residual. Under
    ``gradient_checkpointing_enable()`` the block is recomputed in backward (HF's
    ``GradientCheckpointingLayer``); the model then keeps no cache.

    ``config`` is a :class:`RetNetConfig` (or any object with its field names).
    """

    def __init__(self, config: RetNetConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.retention_layer_norm = build_norm(config.norm_type, d, config.norm_eps)
        self.retention = MultiScaleRetention(
            d,
            config.num_heads,
            config.qk_dim,
            config.v_dim,
            use_default_gamma=config.use_default_gamma,
            bias=config.use_bias_in_msr,
            out_bias=config.use_bias_in_msr_out,
            norm_eps=config.norm_eps,
            position_encoding=config.position_encoding,
            rotary_base=config.rotary_base,
            xpos_scale_base=config.xpos_scale_base,
        )
        self.dropout = nn.Dropout(config.dropout)
        self.final_layer_norm = build_norm(config.norm_type, d, config.norm_eps)
        self.ffn = FeedForward(
            d,
            config.ffn_proj_size,
            activation=config.activation,
            glu=config.use_glu,
            bias=config.use_bias_in_mlp,
            dropout=config.dropout,
            activation_dropout=config.activation_dropout,
        )

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
        """``hidden_states (batch, seq, hidden)`` -> ``(hidden_states, new_state)``; the other arguments are
        those of :meth:`MultiScaleRetention.forward`."""
        mixed, new_state = self.retention(
            self.retention_layer_norm(hidden_states),
            position_offset,
            attention_mask,
            state,
            retention_mode,
            block_size,
            return_state,
            step_memo,
        )
        if self.training:  # dropout is the identity in eval; decoding skips the call
            mixed = self.dropout(mixed)
        hidden_states = hidden_states + mixed
        hidden_states = hidden_states + self.ffn(self.final_layer_norm(hidden_states))
        return hidden_states, new_state

    def step(
        self, hidden_states: Tensor, tables: StepTables, state: RetentionState | None
    ) -> tuple[Tensor, RetentionState]:
        """One decoding step in eval, ``hidden_states (batch, 1, hidden)`` -> ``(hidden_states, new_state)``,
        given the step's position tables (:meth:`MultiScaleRetention.step_tables`): :meth:`forward` in
        recurrent mode without padding, bit for bit."""
        mixed, new_state = self.retention.step(self.retention_layer_norm(hidden_states), tables, state)
        hidden_states = hidden_states + mixed
        hidden_states = hidden_states + self.ffn(self.final_layer_norm(hidden_states))
        return hidden_states, new_state


class RetNetPreTrainedModel(PreTrainedModel):
    config: RetNetConfig
    config_class = RetNetConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["RetNetDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    # The cache is a running state that cannot be rolled back (no assisted decoding).
    _is_stateful = True


class RetNetModel(RetNetPreTrainedModel, RetNetDecodingMixin):
    """Embeddings, RetNet blocks and the final norm; returns hidden states and the retention cache."""

    decoder_layer_class = RetNetDecoderLayer  # the blocks whose ``step`` the decoding path calls

    def __init__(self, config: RetNetConfig) -> None:
        super().__init__(config)
        d = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, d)
        self.embed_scale = math.sqrt(d) if config.scale_embedding else 1.0
        self.layernorm_embedding = (
            build_norm(config.norm_type, d, config.norm_eps) if config.layernorm_embedding else None
        )
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(RetNetDecoderLayer(config) for _ in range(config.num_layers))
        self.layer_norm = build_norm(config.norm_type, d, config.norm_eps)
        # Per-layer state shape (heads, key_dim, head_value_dim), checked at every call: kept here because
        # reading a config attribute costs microseconds on transformers >= 5.24, at every decoding step.
        self.state_shape = (config.num_heads, config.key_dim, config.head_value_dim)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: Tensor | None = None,
        past_key_values: RetNetCache | None = None,
        inputs_embeds: Tensor | None = None,
        use_cache: bool | None = None,
        retention_mode: str | None = None,
        retention_block_size: int | None = None,
        sequence_offset: int | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithCache | tuple:
        """
        Args:
            input_ids: ``(batch, seq)`` token ids, or give ``inputs_embeds (batch, seq, hidden)`` instead.
            attention_mask: ``(batch, seq)`` or ``(batch, past + seq)`` (generate's growing mask), 1 = token,
                0 = padding. Padding belongs on the left of a prompt; rows then start at position 0 at
                their first real token, exactly as if run alone.
            past_key_values: a :class:`RetNetCache` from an earlier call, updated in place (or ``cache=``).
            use_cache: return the cache (default ``config.use_cache``; never while checkpointing).
            retention_mode: "parallel" | "chunkwise" | "recurrent" (default ``config.retention_mode``).
            retention_block_size: block length of the chunkwise mode (default from the config).
            sequence_offset: absolute position of the first token when no cache is given
                (syncdoth/RetNet's argument); with a cache it must equal the tokens the cache has seen.
            kwargs: ``forward_impl`` / ``chunk_size``, the deprecated names of the retention arguments.
        """
        past_key_values = resolve_cache(past_key_values, kwargs)
        mode, block_size = self.retention_settings(retention_mode, retention_block_size, kwargs)
        self.validate_inputs(input_ids, inputs_embeds, past_key_values, mode, block_size, sequence_offset)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        use_cache = use_cache and not (self.gradient_checkpointing and self.training)  # blocks are replayed
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        inputs_embeds = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        offsets, position_offset, mask = self.positions(
            attention_mask, past_key_values, sequence_offset, inputs_embeds
        )
        cache = past_key_values if past_key_values is not None else RetNetCache(len(self.layers))

        hidden = self.scale_embeddings(inputs_embeds)
        all_hidden = [hidden] if output_hidden_states else None
        if self.takes_step_path(mode, hidden.shape[1], mask, output_hidden_states):  # decoding.py
            hidden = self.decode_step_layers(hidden, position_offset, cache, use_cache)
        else:
            step_memo: dict = {}  # one-token recurrent steps share their position tables across blocks
            for idx, layer in enumerate(self.layers):
                state = cache.get_state(idx)
                hidden, state = layer(
                    hidden, position_offset, mask, state, mode, block_size, use_cache, step_memo
                )
                if use_cache:
                    cache.set_state(idx, state)
                if output_hidden_states:
                    all_hidden.append(hidden)
        hidden = self.layer_norm(hidden)
        if use_cache:
            cache.advance(offsets + hidden.shape[1], hidden.shape[1])
        return self.outputs(hidden, cache if use_cache else None, all_hidden, return_dict)

    # -- input checks and positions ---------------------------------------------------------------
    def retention_settings(
        self, retention_mode: str | None, retention_block_size: int | None, kwargs: dict
    ) -> tuple[str, int]:
        """``(retention_mode, retention_block_size)`` of a call: as given, else the config's. Takes the
        deprecated ``forward_impl`` / ``chunk_size`` out of ``kwargs`` (one release, with a warning)."""
        retention_mode, retention_block_size = renamed_retention_kwargs(
            kwargs, retention_mode, retention_block_size
        )
        mode = retention_mode or self.config.retention_mode
        block_size = (
            self.config.retention_block_size if retention_block_size is None else retention_block_size
        )
        return mode, block_size

    def validate_inputs(
        self,
        input_ids: Tensor | None,
        inputs_embeds: Tensor | None,
        cache: RetNetCache | None,
        retention_mode: str,
        retention_block_size: int,
        sequence_offset: int | None,
    ) -> None:
        """Raise ValueError, once per call, on inputs this model cannot run: the retention mode and block
        size, exactly one of ``input_ids (batch, seq)`` (ids within the vocabulary) or ``inputs_embeds``,
        and a cache from this config and batch that agrees with ``sequence_offset``."""
        if retention_mode not in RETENTION_MODES:
            raise ValueError(f"unknown retention_mode {retention_mode!r}; expected one of {RETENTION_MODES}")
        check_block_size(retention_block_size, "retention_block_size")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if input_ids is not None:
            self.check_input_ids(input_ids)
        if cache is not None:
            self.check_cache(cache, (input_ids if input_ids is not None else inputs_embeds).shape[0])
            seen = cache.get_seq_length()
            if cache.position_offset is not None and sequence_offset not in (None, seen):
                raise ValueError(
                    f"sequence_offset={sequence_offset} disagrees with past_key_values, which has seen "
                    f"{seen} tokens; pass sequence_offset=None to continue from the cache"
                )

    def check_input_ids(self, input_ids: Tensor) -> None:
        vocab = self.embed_tokens.num_embeddings  # the truth, also after resize_token_embeddings
        count = input_ids.numel()
        if not count:
            return
        if count == 1:  # one token of one row (decoding at batch 1): one read
            low = high = int(input_ids.item())
        else:
            low, high = (int(x) for x in torch.aminmax(input_ids))  # one pass: runs at every decoding step
        if low < 0 or high >= vocab:
            raise ValueError(
                f"input_ids outside the vocabulary: found ids in [{low}, {high}], "
                f"allowed range is [0, {vocab - 1}]"
            )

    def check_cache(self, cache: RetNetCache, batch_size: int) -> None:
        if not isinstance(cache, RetNetCache):
            raise ValueError(
                f"past_key_values must be a RetNetCache (or None), got {type(cache).__name__}; "
                "pass the past_key_values returned by this model"
            )
        if len(cache.layers) != len(self.layers):
            raise ValueError(
                f"past_key_values comes from another config: it has {len(cache.layers)} layers, "
                f"this model has num_layers={len(self.layers)}"
            )
        expected_kv = (batch_size, *self.state_shape)
        for idx in range(len(cache.layers)):
            state = cache.get_state(idx)
            if state is not None and tuple(state[0].shape) != expected_kv:
                raise ValueError(
                    f"past_key_values comes from another config or batch: layer {idx} holds a state of shape "
                    f"{tuple(state[0].shape)}, expected (batch, num_heads, key_dim, head_value_dim) = "
                    f"{expected_kv}"
                )

    def positions(
        self,
        attention_mask: Tensor | None,
        cache: RetNetCache | None,
        sequence_offset: int | None,
        inputs_embeds: Tensor,
    ) -> tuple[Tensor, int | Tensor, Tensor | None]:
        """Where this call's tokens sit: ``(offsets (batch,), position_offset, mask)``. ``offsets``: each
        row's absolute position before the call (a left-padded row lags by its padding);
        ``position_offset``: the same for the retention, an int when all rows agree (shared rotation
        tables); ``mask (batch, seq)``: this call's columns of ``attention_mask``, None without padding."""
        batch_size, seq_len = inputs_embeds.shape[:2]
        device = inputs_embeds.device
        if cache is not None and cache.position_offset is not None:
            offsets = cache.position_offset.to(device)
        else:
            start = 0 if sequence_offset is None else sequence_offset
            offsets = torch.full((batch_size,), start, dtype=torch.long, device=device)
        mask = None
        if attention_mask is not None:
            mask = attention_mask[:, -seq_len:].to(device)
            if bool(mask.all()):  # the common case (every decoding step): nothing to shift or mask
                mask = None
            else:
                offsets = offsets - leading_padding(mask)
        position_offset: int | Tensor = offsets
        if batch_size == 1 or (batch_size and bool((offsets == offsets[0]).all())):
            position_offset = int(offsets[0])  # one offset for all rows: shared rotation tables
        return offsets, position_offset, mask

    # -- embeddings and outputs ----------------------------------------------------------------------
    def scale_embeddings(self, inputs_embeds: Tensor) -> Tensor:
        """Token embeddings -> first block input: scale, optional norm, dropout."""
        # x * 1.0 is x, bit for bit: the (default) unscaled embedding skips the call
        hidden = inputs_embeds if self.embed_scale == 1.0 else inputs_embeds * self.embed_scale
        if self.layernorm_embedding is not None:
            hidden = self.layernorm_embedding(hidden)
        return self.dropout(hidden) if self.training else hidden

    def outputs(
        self,
        hidden: Tensor,
        cache: RetNetCache | None,
        all_hidden: list[Tensor] | None,
        return_dict: bool | None,
    ) -> BaseModelOutputWithCache | tuple:
        """The result of :meth:`forward`: a ``BaseModelOutputWithCache``, or what its ``to_tuple()`` would
        give (without building it) when ``return_dict`` (default ``config.return_dict``) is False."""
        all_hidden = tuple(all_hidden) if all_hidden is not None else None
        if not (self.config.return_dict if return_dict is None else return_dict):
            return tuple(x for x in (hidden, cache, all_hidden) if x is not None)
        return BaseModelOutputWithCache(
            last_hidden_state=hidden, hidden_states=all_hidden, **cache_kwargs(cache)
        )


class RetNetForCausalLM(RetNetPreTrainedModel, GenerationMixin):
    """RetNetModel + LM head. ``generate()`` computes the prompt in parallel (or chunkwise) mode and
    then decodes recurrently, one token per step, at a cost independent of the context length."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: RetNetConfig) -> None:
        super().__init__(config)
        self.model = RetNetModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate must not build a DynamicCache: the model creates its RetNetCache

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: Tensor | None = None,
        past_key_values: RetNetCache | None = None,
        inputs_embeds: Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        retention_mode: str | None = None,
        retention_block_size: int | None = None,
        sequence_offset: int | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithCache | tuple:
        """Arguments of :meth:`RetNetModel.forward`, plus ``labels (batch, seq)`` (-100 = ignored; shifted
        inside, as in every HF causal LM) and ``logits_to_keep`` (only the last n positions' logits)."""
        return_dict = self.config.return_dict if return_dict is None else return_dict
        past_key_values = resolve_cache(past_key_values, kwargs)
        retention_mode, retention_block_size = renamed_retention_kwargs(
            kwargs, retention_mode, retention_block_size
        )
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            retention_mode=retention_mode,
            retention_block_size=retention_block_size,
            sequence_offset=sequence_offset,
            output_hidden_states=output_hidden_states,
            return_dict=False,  # a tuple: one ModelOutput less per decoding step
        )
        hidden = outputs[0]
        cache = next((x for x in outputs[1:] if isinstance(x, RetNetCache)), None)
        all_hidden = next((x for x in outputs[1:] if isinstance(x, tuple)), None)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.config.vocab_size, **kwargs)
        out = CausalLMOutputWithCache(
            loss=loss, logits=logits, hidden_states=all_hidden, **cache_kwargs(cache)
        )
        return out if return_dict else out.to_tuple()

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        past_key_values: RetNetCache | None = None,
        attention_mask: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        use_cache: bool = True,
        cache: RetNetCache | None = None,
        parallel_compute_prompt: bool = True,
        retention_mode: str | None = None,
        retention_block_size: int | None = None,
        is_first_iteration: bool | None = False,
        next_sequence_length: int | None = None,
        forward_impl: str | None = None,
        chunk_size: int | None = None,
        **kwargs,
    ) -> dict:
        """Feed only the tokens the cache has not seen. The prompt runs in ``retention_mode`` (default:
        chunkwise if the config says so, else parallel), or recurrently when
        ``parallel_compute_prompt=False`` (syncdoth/RetNet's switch); every later step runs recurrently.
        ``generate`` hands the cache over as ``cache`` (transformers >= 5.24) or ``past_key_values``.
        ``forward_impl`` / ``chunk_size``: the deprecated names of the retention arguments."""
        retention_mode, retention_block_size = renamed_retention_kwargs(
            {"forward_impl": forward_impl, "chunk_size": chunk_size}, retention_mode, retention_block_size
        )
        past_key_values = resolve_cache(past_key_values, {"cache": cache})
        seen = past_key_values.get_seq_length() if past_key_values is not None else 0
        if seen > 0 or not parallel_compute_prompt:
            mode = "recurrent"
        else:
            default = self.config.retention_mode
            mode = retention_mode or ("parallel" if default == "recurrent" else default)
        inputs = {
            "attention_mask": attention_mask,
            "use_cache": use_cache,
            **cache_kwargs(past_key_values),
            "retention_mode": mode,
            "retention_block_size": retention_block_size,
        }
        if inputs_embeds is not None and seen == 0:
            inputs["input_ids"] = None
            inputs["inputs_embeds"] = inputs_embeds
        elif use_cache:
            # with inputs_embeds, input_ids holds only generated tokens; the cache also saw the prompt
            total = input_ids.shape[1] + (inputs_embeds.shape[1] if inputs_embeds is not None else 0)
            inputs["input_ids"] = input_ids[:, input_ids.shape[1] - (total - seen) :]
        else:
            inputs["input_ids"] = input_ids
        for key in ("output_hidden_states",):
            if key in kwargs:
                inputs[key] = kwargs[key]
        return inputs


RetNetModelWithLMHead = RetNetForCausalLM
