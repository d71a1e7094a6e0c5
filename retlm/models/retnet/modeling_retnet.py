"""RetNet (arXiv 2307.08621) as a transformers model: RetNetModel, RetNetForCausalLM.

Block (pre-norm, torchscale's layout and parameter names):

    x = x + dropout(MSR(norm(x)))        MSR: retlm.layers.retention.MultiScaleRetention
    x = x + FFN(norm(x))                 FFN: GLU or plain, retlm.layers.feedforward.FeedForward

Every forward picks a retention mode ("parallel", "chunkwise", "recurrent"); the three compute the
same function, and a cache written in one mode can be continued in any other. Padding is handled
per row: positions start at each row's first real token, and padded positions leave no trace.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel

from retlm.compat import BaseModelOutputWithCache, CausalLMOutputWithCache, cache_kwargs, resolve_cache
from retlm.layers.feedforward import FeedForward
from retlm.layers.norm import build_norm
from retlm.layers.retention import MultiScaleRetention, RetentionState, StepTables, step_dtype
from retlm.models.padding import leading_padding
from retlm.models.retnet.cache import RetNetCache
from retlm.models.retnet.compiled_decoding import FrozenWeightsStep
from retlm.models.retnet.configuration_retnet import RetNetConfig
from retlm.ops.retention import RETENTION_MODES


class RetNetDecoderLayer(nn.Module):
    """One pre-norm RetNet block: retention then feed-forward, each with a residual.

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
        mode: str = "parallel",
        chunk_size: int | None = None,
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
            mode,
            chunk_size,
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


class RetNetModel(RetNetPreTrainedModel):
    """Embeddings, RetNet blocks and the final norm; returns hidden states and the retention cache."""

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
        self._compiled_layer_steps = self._frozen_step = None  # see compile_decoding
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    # -- input checks ----------------------------------------------------------------------------
    def resolve_mode(self, forward_impl: str | None, chunk_size: int | None) -> tuple[str, int]:
        mode = forward_impl or self.config.forward_impl
        if mode not in RETENTION_MODES:
            raise ValueError(f"unknown forward_impl {mode!r}; expected one of {RETENTION_MODES}")
        chunk_size = self.config.chunk_size if chunk_size is None else chunk_size
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
            raise ValueError(f"chunk_size must be a positive integer (>= 1), got {chunk_size!r}")
        return mode, chunk_size

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

    def row_offsets(
        self,
        cache: RetNetCache | None,
        sequence_offset: int | None,
        batch_size: int,
        device: torch.device,
    ) -> Tensor:
        """Absolute position of each row's next token before this call, ``(batch,)``."""
        if cache is not None and cache.position_offset is not None:
            if sequence_offset is not None and sequence_offset != cache.get_seq_length():
                raise ValueError(
                    f"sequence_offset={sequence_offset} disagrees with past_key_values, which has seen "
                    f"{cache.get_seq_length()} tokens; pass sequence_offset=None to continue from the cache"
                )
            return cache.position_offset.to(device)
        start = 0 if sequence_offset is None else sequence_offset
        return torch.full((batch_size,), start, dtype=torch.long, device=device)

    # -- forward ---------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: Tensor | None = None,
        past_key_values: RetNetCache | None = None,
        inputs_embeds: Tensor | None = None,
        use_cache: bool | None = None,
        forward_impl: str | None = None,
        chunk_size: int | None = None,
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
            past_key_values: a :class:`RetNetCache` from an earlier call; it is updated in place. It may be
                passed as ``cache=`` instead (transformers >= 5.24's name).
            use_cache: return the cache (default ``config.use_cache``).
            forward_impl: "parallel" | "chunkwise" | "recurrent" (default ``config.forward_impl``).
            chunk_size: block length of the chunkwise mode (default ``config.chunk_size``).
            sequence_offset: absolute position of the first token when no cache is given
                (syncdoth/RetNet's argument); with a cache it must equal the number of tokens the cache
                has seen.
        """
        past_key_values = resolve_cache(past_key_values, kwargs)
        mode, chunk_size = self.resolve_mode(forward_impl, chunk_size)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if input_ids is not None:
            self.check_input_ids(input_ids)
            inputs_embeds = self.embed_tokens(input_ids)
        batch_size, seq_len = inputs_embeds.shape[:2]
        if past_key_values is not None:
            self.check_cache(past_key_values, batch_size)
        checkpointing = self.gradient_checkpointing and self.training
        if checkpointing:
            use_cache = False  # a checkpointed block is replayed in backward and must not write a cache

        mask = None
        offsets = self.row_offsets(past_key_values, sequence_offset, batch_size, inputs_embeds.device)
        if attention_mask is not None:
            mask = attention_mask[:, -seq_len:].to(inputs_embeds.device)
            if bool(mask.all()):  # the common case (every decoding step): nothing to shift or mask
                mask = None
            else:
                offsets = offsets - leading_padding(mask)
        position_offset: int | Tensor = offsets
        if batch_size == 1 or (batch_size and bool((offsets == offsets[0]).all())):
            position_offset = int(offsets[0])  # one offset for all rows: shared rotation tables

        hidden = self.scale_embeddings(inputs_embeds)
        all_hidden = [hidden] if output_hidden_states else None
        cache = past_key_values if past_key_values is not None else RetNetCache(len(self.layers))
        step_memo: dict = {}  # per-position tables shared by the layers (one-token recurrent steps)
        one_step = (
            mode == "recurrent" and seq_len == 1 and mask is None and not output_hidden_states
            and not self.training and not torch.is_grad_enabled() and self.blocks_run_as_steps()
        )  # fmt: skip
        if one_step:  # decoding: the layers' step functions, compiled if asked for (same results)
            hidden = self.decode_step_layers(hidden, position_offset, cache, use_cache)
        for idx, layer in enumerate(() if one_step else self.layers):
            state = cache.get_state(idx)
            if checkpointing:
                hidden, _ = self._gradient_checkpointing_func(
                    layer.__call__, hidden, position_offset, mask, state, mode, chunk_size, False
                )
            else:
                hidden, new_state = layer(
                    hidden, position_offset, mask, state, mode, chunk_size, use_cache, step_memo
                )
                if use_cache:
                    cache.set_state(idx, new_state)
            if output_hidden_states:
                all_hidden.append(hidden)
        hidden = self.layer_norm(hidden)
        if use_cache:
            cache.advance(offsets + seq_len, seq_len)

        all_hidden = tuple(all_hidden) if output_hidden_states else None
        cache = cache if use_cache else None
        if not return_dict:  # what ModelOutput.to_tuple() gives, without building the ModelOutput
            return tuple(x for x in (hidden, cache, all_hidden) if x is not None)
        return BaseModelOutputWithCache(
            last_hidden_state=hidden, hidden_states=all_hidden, **cache_kwargs(cache)
        )

    # -- decoding ---------------------------------------------------------------------------------
    def decode_step_layers(
        self, hidden: Tensor, position_offset: int | Tensor, cache: RetNetCache, use_cache: bool
    ) -> Tensor:
        """All blocks for one token without padding, in eval without autograd: ``hidden (batch, 1, hidden)``
        -> the last block's output; the cache's states are replaced when ``use_cache``.
        The position tables are built once (every layer has the same retention shape); the blocks then
        run :meth:`layer_steps`, or its compiled version after :meth:`compile_decoding`."""
        retention = self.layers[0].retention
        tables = retention.step_tables(position_offset, hidden.device, step_dtype(hidden.dtype), None)
        states = [cache.get_state(idx) for idx in range(len(self.layers))]
        run = self.layer_steps
        if self._compiled_layer_steps is not None and all(state is not None for state in states):
            run = self._compiled_layer_steps
        hidden, new_states = run(hidden, tables, states)
        if use_cache:
            for idx, state in enumerate(new_states):
                cache.set_state(idx, state)
        return hidden

    def blocks_run_as_steps(self) -> bool:
        """Whether calling every block's ``step`` does what calling the block would: the one-token path
        bypasses ``nn.Module.__call__``, so a wrapped block (RETRO-fitting puts its CCA after chosen
        blocks), a subclass with its own ``forward``, or a block with forward hooks takes the general path."""
        return len(self.layers) > 0 and all(
            type(layer).forward is RetNetDecoderLayer.forward
            and not (layer._forward_hooks or layer._forward_pre_hooks)
            for layer in self.layers
        )

    def layer_steps(
        self, hidden: Tensor, tables: StepTables, states: list[RetentionState | None]
    ) -> tuple[Tensor, list[RetentionState]]:
        """:meth:`RetNetDecoderLayer.step` of every block in turn -> ``(hidden (batch, 1, hidden), states)``.
        This is the function :meth:`compile_decoding` compiles."""
        new_states = []
        for layer, state in zip(self.layers, states, strict=True):
            hidden, new_state = layer.step(hidden, tables, state)
            new_states.append(new_state)
        return hidden, new_states

    def compile_decoding(self, enabled: bool = True, **compile_kwargs) -> None:
        """Run the blocks of every later one-token recurrent step (``generate``'s decoding steps) through
        ``torch.compile(self.layer_steps, **compile_kwargs)``, weights frozen into the compiled code
        (:class:`~retlm.models.retnet.compiled_decoding.FrozenWeightsStep`); ``enabled=False``: eager.
        Opt-in: the first steps pay the compilation (tens of seconds on CPU; again per batch size or
        dtype), packed weights add about one copy of the weight matrices to memory, and results equal
        the eager step's within float32 rounding. Padded, autograd and first steps stay eager.
        ``compile_decoding(False)`` then ``compile_decoding()`` with the same arguments reuses the code."""
        if enabled and (self._frozen_step is None or self._frozen_step.arguments != compile_kwargs):
            self._frozen_step = FrozenWeightsStep(self.layer_steps, self, **compile_kwargs)  # reused below
        self._compiled_layer_steps = self._frozen_step if enabled else None

    def scale_embeddings(self, inputs_embeds: Tensor) -> Tensor:
        """Token embeddings -> first block input: scale, optional norm, dropout."""
        # x * 1.0 is x, bit for bit: the (default) unscaled embedding skips the call
        hidden = inputs_embeds if self.embed_scale == 1.0 else inputs_embeds * self.embed_scale
        if self.layernorm_embedding is not None:
            hidden = self.layernorm_embedding(hidden)
        return self.dropout(hidden) if self.training else hidden


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
        forward_impl: str | None = None,
        chunk_size: int | None = None,
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
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            forward_impl=forward_impl,
            chunk_size=chunk_size,
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
            loss=loss,
            logits=logits,
            hidden_states=all_hidden,
            **cache_kwargs(cache),
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
        forward_impl: str | None = None,
        chunk_size: int | None = None,
        is_first_iteration: bool | None = False,
        next_sequence_length: int | None = None,
        **kwargs,
    ) -> dict:
        """Feed only the tokens the cache has not seen. The prompt runs in ``forward_impl`` (default:
        chunkwise if the config says so, else parallel), or recurrently when
        ``parallel_compute_prompt=False`` (syncdoth/RetNet's switch); every later step runs recurrently.
        ``generate`` hands the cache over as ``cache`` (transformers >= 5.24) or ``past_key_values``."""
        past_key_values = resolve_cache(past_key_values, {"cache": cache})
        seen = past_key_values.get_seq_length() if past_key_values is not None else 0
        if seen > 0:
            mode = "recurrent"
        elif not parallel_compute_prompt:
            mode = "recurrent"
        else:
            default = "parallel" if self.config.forward_impl == "recurrent" else self.config.forward_impl
            mode = forward_impl or default
        inputs = {
            "attention_mask": attention_mask,
            "use_cache": use_cache,
            **cache_kwargs(past_key_values),
            "forward_impl": mode,
            "chunk_size": chunk_size,
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
