"""RETRO-fitting (arXiv 2112.04426, section 4.2) of any HF causal LM: a frozen base decoder, chunked
cross-attention (CCA) after chosen decoder layers, and a trainable RETRO encoder of the neighbors.

    base embeddings -> base layer 1 -> ... -> base layer L -> [ x + CCA(norm(x), encoded neighbors) ]
                    -> ... -> base head
    neighbors (+ continuations) -> base input embeddings (frozen) -> projection -> RETRO encoder,
        conditioned on the base's states at the first CCA layer of the chunk that retrieved them

Nothing of the base is copied or re-implemented: each chosen decoder layer module is wrapped
(:class:`RetroFitLayer`), the wrapper runs the layer as it is and then adds the CCA sub-layer. The
base's attention, position handling, KV cache (a ``DynamicCache`` for GPT-2 and Llama, the recurrent
state of a RetNet, a ``RetroCache`` for a RETRO control) and ``generate()`` are used unchanged. Every
CCA output projection starts at zero, so a fresh RETRO-fitted model computes exactly its base; the
base's parameters are frozen, and only the adapter (:class:`RetroFitAdapter`) trains.

The encoder, the CCA layers and the chunk alignment are RETRO's own (:mod:`retlm.layers.neighbor_encoder`,
:mod:`retlm.layers.neighbors`): the tokens of chunk u+1 (and the last token of chunk u) read the
neighbors retrieved for chunk u, never a neighbor retrieved with their own future.

Incremental decoding follows :class:`~retlm.models.retro.RetroForCausalLM`'s contract (the loop of
:mod:`retlm.models.retrieval_generation` drives it): a call receives, in ``retrieved``, the neighbors of
every chunk whose last token is among its ``input_ids``. The cache is a :class:`RetroFitCache`: the
base's own cache object, and the adapter's decoding state (position, the states of the current chunk,
the encoded neighbors of the last completed one).

Known limits: one call at a time per model object (the wrappers read the current call's neighbors
from the model; ``torch.nn.DataParallel`` threads would share them, DDP is fine); rows of a batch share
one position (right padding only, when retrieving); ``output_hidden_states`` reports the base's own
layer outputs (before the CCA).
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.nn.modules.module import _IncompatibleKeys
from transformers import GenerationMixin, PreTrainedModel

from retlm.compat import CausalLMOutputWithCache, cache_kwargs, output_cache, resolve_cache
from retlm.layers.neighbor_encoder import (
    Residual,
    RetrievalLayersConfig,
    RetroEncoder,
    chunked_cross_attention,
    init_retrieval_weights,
)
from retlm.layers.neighbors import (
    NeighborState,
    check_retrieved,
    cross_attend,
    encode_neighbors,
    neighbors_for_call,
)
from retlm.models.padding import check_right_padding
from retlm.models.pretrained import KNOWN
from retlm.models.retrofit.base import (  # noqa: F401  (LAYER_PATHS, SUPPORTED: importable here)
    LAYER_PATHS,
    SUPPORTED,
    RetroFitLayer,
    check_base,
    decoder_layers,
    load_base,
)
from retlm.models.retrofit.cache import RetroFitCache
from retlm.models.retrofit.configuration_retrofit import RetroFitConfig, check_cca_layers, signature_of
from retlm.utils import deprecated_keyword

ADAPTER_PREFIX = "retrofit."  # state-dict prefix of the new (trained, saved) parameters
WEIGHTS_NAME = "model.safetensors"
UNBOUNDED = 2**31 - 1  # max_seq_len of a base without a position table (RetNet)


# -- the adapter ---------------------------------------------------------------------------------------


class RetroFitBlock(nn.Module):
    """The sub-layer added after one base decoder layer: ``x + CCA(norm(x), encoded neighbors)``, with
    the CCA output projection zero at initialisation. Parameter names are those of
    :class:`~retlm.models.retro.decoder.RetroDecoderLayer` (``cca``, ``cca_norm``)."""

    def __init__(self, layers: RetrievalLayersConfig) -> None:
        super().__init__()
        self.cca_norm = Residual(layers.dec_dim, layers, None)
        self.cca = chunked_cross_attention(layers.dec_dim, layers)
        self.cca.attn.to_out.zero_init = True  # read by init_retrieval_weights

    def forward(self, x: Tensor, start: int, neighbors: tuple[Tensor, Tensor, Tensor | None]) -> Tensor:
        """``x (batch, seq, hidden)`` of positions ``start ..`` -> same shape."""
        return cross_attend(self.cca, self.cca_norm, x, start, neighbors)


class RetroFitAdapter(nn.Module):
    """Every new parameter: the projection of the base's (frozen) token embeddings of the neighbors to
    the encoder width, the RETRO encoder, and one :class:`RetroFitBlock` per chosen layer."""

    def __init__(self, config: RetroFitConfig) -> None:
        super().__init__()
        layers = config.retrieval_layers()
        self.embed_proj = nn.Linear(config.embedding_dim, layers.enc_dim, bias=False)
        self.encoder = RetroEncoder(layers)
        self.blocks = nn.ModuleDict({str(layer): RetroFitBlock(layers) for layer in config.cca_layers})


@dataclass
class _Call:
    """What the wrapped layers of one forward call need: where its tokens start, the neighbors of the
    chunks it completes, the decoding state to update (None: a full forward), and the encoded neighbors
    once the first CCA layer has computed them."""

    start: int
    retrieved: Tensor | None
    state: NeighborState | None
    neighbors: tuple[Tensor, Tensor, Tensor | None] | None = None


# -- the model -----------------------------------------------------------------------------------------


class RetroFitForCausalLM(PreTrainedModel, GenerationMixin):
    """A frozen HF causal LM (``.base``) with RETRO's chunked cross-attention and neighbor encoder
    (``.retrofit``, the only trained and saved parameters).

    Build one with :meth:`from_base`; load a trained one with :meth:`from_pretrained` (or
    ``AutoModelForCausalLM.from_pretrained`` once ``retlm.models.retrofit`` is imported), which loads the
    base the config names and then the adapter. ``forward(input_ids, retrieved=None, ...)`` takes the
    arguments of :class:`~retlm.models.retro.RetroForCausalLM`; ``retrieved=None`` (and no neighbors
    in the cache) computes exactly the base.
    """

    config: RetroFitConfig
    config_class = RetroFitConfig
    base_model_prefix = "base"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _skip_keys_device_placement = ["past_key_values"]

    def __init__(self, config: RetroFitConfig, base: PreTrainedModel | None = None) -> None:
        super().__init__(config)
        self.retrofit = RetroFitAdapter(config)
        self._call: _Call | None = None
        # Initialises the adapter only: the base is attached afterwards, so its weights are never touched.
        self.post_init()
        if base is None:
            if not config.base_model_name_or_path:
                raise ValueError("the RetroFitConfig names no base model (base_model_name_or_path)")
            base = load_base(config.base_model_name_or_path)
        check_base(base, config)
        base.requires_grad_(False)
        self.base = base
        layers = decoder_layers(base)
        for number in config.cca_layers:
            layers[number - 1] = RetroFitLayer(layers[number - 1], number, self)
        self._encoder_layer = min(config.cca_layers)  # its states condition the encoder
        params = inspect.signature(base.forward).parameters
        modes = ("retention_mode", "forward_impl", "retnet_mode")  # RetNet's, RETRO's; and earlier names
        self._mode_kwarg = next((n for n in modes if n in params), None)
        self._recurrent_steps = base.config.model_type == "retnet"

    # -- construction ------------------------------------------------------------------------------------

    @classmethod
    def from_base(
        cls,
        base: PreTrainedModel | str | os.PathLike[str],
        *,
        chunk_size: int,
        pad_id: int = 0,
        cca_layers: list[int] | None = None,
        seed: int | None = 0,
        base_name_or_path: str | None = None,
        **adapter: Any,
    ) -> RetroFitForCausalLM:
        """A fresh RETRO-fitted model around ``base`` (a model, or a folder / Hub name to load).

        ``chunk_size``, ``pad_id``: the retrieval database's. ``cca_layers``: 1-based decoder layers a
        CCA follows (default: every third from the sixth). ``adapter``: the other
        :class:`RetroFitConfig` fields (``enc_dim``, ``enc_depth``, ``heads``, ``dim_head``, ...).
        ``seed`` draws the adapter's initial weights (None: the current RNG state).
        ``base_name_or_path``: how the saved config names the base (default: where it was loaded from,
        as an absolute path when it is a local folder).
        """
        if not isinstance(base, nn.Module):
            base_name_or_path = base_name_or_path or str(base)
            base = load_base(base)
        name = base_name_or_path or getattr(base, "name_or_path", None) or ""
        if name and name not in KNOWN and Path(name).is_dir():
            name = str(Path(name).resolve())
        base_config = base.config
        num_layers = len(decoder_layers(base))
        hidden = int(base_config.hidden_size)
        heads = adapter.pop("heads", None) or getattr(base_config, "num_attention_heads", None) or 1
        config = RetroFitConfig(
            base_model_name_or_path=name or None,
            base_config=base_config.to_dict(),
            base_signature=signature_of(base_config),
            cca_layers=check_cca_layers(cca_layers, num_layers) if cca_layers is not None else None,
            chunk_size=chunk_size,
            pad_id=pad_id,
            max_seq_len=getattr(base_config, "max_position_embeddings", None) or UNBOUNDED,
            heads=int(heads),
            hidden_size=hidden,
            num_hidden_layers=num_layers,
            vocab_size=int(base_config.vocab_size),
            embedding_dim=int(base.get_input_embeddings().embedding_dim),
            **adapter,
        )
        if seed is None:
            model = cls(config, base=base)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = cls(config, base=base)
        parameter = next(base.parameters())
        model.retrofit.to(device=parameter.device, dtype=parameter.dtype)  # the base's device and precision
        return model

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        pretrained_model_name_or_path: str | os.PathLike[str],
        *args: Any,
        base: PreTrainedModel | str | os.PathLike[str] | None = None,
        config: RetroFitConfig | None = None,
        **kwargs: Any,
    ) -> RetroFitForCausalLM:
        """Load a saved adapter (``config.json`` + ``model.safetensors`` in ``pretrained_model_name_or_path``)
        and the base its config names, or ``base`` (a model, or a folder / Hub name) when the base has
        moved. ``dtype`` / ``torch_dtype`` and ``device_map`` are passed on to the base's loading; other
        loading options of transformers are accepted and ignored. A base that differs from the one the
        adapter was trained on (type, width, depth, vocabulary), or an adapter file that does not fit the
        config, is refused with a ValueError."""
        folder = Path(pretrained_model_name_or_path)
        if folder.is_dir() and not (folder / "config.json").is_file():
            # a run directory: its model/ (or newest checkpoint), as `retlm eval RUN` takes it; transformers
            # 5.4's pipeline() calls this class directly with the folder it was given
            from retlm.models.folders import resolve_model_dir

            folder = resolve_model_dir(folder)
        if not isinstance(config, RetroFitConfig):
            config = RetroFitConfig.from_pretrained(folder)
        weights = folder / WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"{folder} has no {WEIGHTS_NAME} (the adapter's weights)")
        if not isinstance(base, nn.Module):
            base = base or config.base_model_name_or_path
            if not base:
                raise ValueError(
                    f"the adapter in {folder} names no base (it was built from a model in memory); "
                    "pass the base with base=MODEL_OR_FOLDER"
                )
            base_kwargs = {k: kwargs[k] for k in ("dtype", "torch_dtype", "device_map") if k in kwargs}
            base = load_base(base, **base_kwargs)
        model = cls(config, base=base)
        parameter = next(base.parameters())
        model.retrofit.to(device=parameter.device, dtype=parameter.dtype)
        state = load_file(str(weights), device=str(parameter.device))
        result = model.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys or not state:
            raise ValueError(
                f"{weights} does not fit this retrofit config (missing: {sorted(result.missing_keys)[:6]}, "
                f"unexpected: {sorted(result.unexpected_keys)[:6]}); load it with the config.json saved "
                "beside it"
            )
        model.name_or_path = str(folder)
        return model.eval()

    def save_pretrained(  # type: ignore[override]
        self,
        save_directory: str | os.PathLike[str],
        is_main_process: bool = True,
        state_dict: dict[str, Tensor] | None = None,
        **kwargs: Any,
    ) -> None:
        """Write ``config.json`` (which names the base) and the adapter's weights only, as
        ``model.safetensors`` (the base is not copied). ``state_dict``, when given (the Trainer passes
        one), is filtered to the adapter's entries."""
        if not is_main_process:
            return
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        if state_dict is None:
            state_dict = self.adapter_state_dict()
        weights = {
            k: v.detach().contiguous().cpu() for k, v in state_dict.items() if k.startswith(ADAPTER_PREFIX)
        }
        self.config.architectures = [type(self).__name__]
        self.config.save_pretrained(folder)
        tmp = folder / f".{WEIGHTS_NAME}.tmp"
        save_file(
            weights, str(tmp), metadata={"format": "pt", "base": str(self.config.base_model_name_or_path)}
        )
        os.replace(tmp, folder / WEIGHTS_NAME)

    def adapter_state_dict(self) -> dict[str, Tensor]:
        """The new parameters, keyed ``retrofit.*``: what is trained and saved."""
        return self.retrofit.state_dict(prefix=ADAPTER_PREFIX)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``; a state dict holding only adapter entries (what
        :meth:`save_pretrained` writes, and what the Trainer reloads on resume) loads into the adapter, and
        ``strict`` then applies to the adapter alone."""
        if state_dict and all(key.startswith(ADAPTER_PREFIX) for key in state_dict):
            inner = {key[len(ADAPTER_PREFIX) :]: value for key, value in state_dict.items()}
            result = self.retrofit.load_state_dict(inner, strict=strict, assign=assign)
            return _IncompatibleKeys(
                [ADAPTER_PREFIX + k for k in result.missing_keys],
                [ADAPTER_PREFIX + k for k in result.unexpected_keys],
            )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        init_retrieval_weights(module)

    def train(self, mode: bool = True) -> RetroFitForCausalLM:
        """The adapter trains; the frozen base stays in eval mode (no dropout), as it is not trained."""
        super().train(mode)
        self.base.eval()
        return self

    # -- the HF interface ---------------------------------------------------------------------------------

    def get_input_embeddings(self) -> nn.Module:
        return self.base.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module | None:
        return self.base.get_output_embeddings()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False

    def generate(self, *args: Any, retrieval_database: Any = None, **kwargs: Any) -> Any:
        """The base's own ``generate()`` (no retrieval: the adapter adds nothing), or, with
        ``retrieval_database=db``, generation that retrieves from ``db`` at every chunk boundary
        (:func:`retlm.models.retrieval_generation.generate_with_retrieval`, whose options it takes), decoding
        one token per step from the base's cache."""
        if retrieval_database is None:
            return self.base.generate(*args, **kwargs)
        from retlm.models.retrieval_generation import generate_with_retrieval

        input_ids = kwargs.pop("input_ids", args[0] if args else None)
        kwargs.pop("attention_mask", None)
        return generate_with_retrieval(self, retrieval_database, input_ids, **kwargs)

    # -- forward ------------------------------------------------------------------------------------------

    def _encode(self, retrieved: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
        embed = self.base.get_input_embeddings()
        return encode_neighbors(
            lambda ids: self.retrofit.embed_proj(embed(ids)),
            self.retrofit.encoder,
            self.config.pad_id,
            retrieved,
            context,
        )

    def _after_layer(self, number: int, hidden: Tensor, call: _Call) -> Tensor:
        """Called by the wrapper of decoder layer ``number`` with its output ``(batch, seq, hidden)``."""
        if number == self._encoder_layer:
            call.neighbors = neighbors_for_call(
                hidden, call.retrieved, call.start, call.state, self.config.chunk_size, self._encode
            )
        if call.neighbors is None:
            return hidden
        return self.retrofit.blocks[str(number)](hidden, call.start, call.neighbors)

    def validate_inputs(
        self,
        input_ids: Tensor | None,
        retrieved: Tensor | None,
        attention_mask: Tensor | None,
        cache: Any,
        use_cache: bool | None,
    ) -> tuple[int, Tensor | None, NeighborState | None]:
        """Check one call's inputs (see :meth:`forward`) and return its first position, ``retrieved``
        normalised, and the adapter's decoding state to update (None: no cache is kept)."""
        if input_ids is None or input_ids.dim() != 2:
            raise ValueError("input_ids must be a (batch, seq) tensor of token ids")
        batch, seq_len = input_ids.shape
        state = cache.neighbors if isinstance(cache, RetroFitCache) else None
        start = int(cache.get_seq_length()) if cache is not None else 0  # a RetroFitCache's: its position
        limit = self.config.max_seq_len
        if limit is not None and start + seq_len > limit:
            raise ValueError(f"sequence length {start + seq_len} exceeds the base's {limit} positions")
        c = self.config.chunk_size
        retrieved = check_retrieved(retrieved, c, batch, start, seq_len, incremental=cache is not None)
        keep = cache is not None or bool(use_cache)
        if keep and state is None:
            if start % c and retrieved is not None:
                raise ValueError(
                    f"this cache holds {start} tokens but was not written by this model's forward, so the "
                    "states of its incomplete chunk are unknown; start from no cache, or at a chunk boundary"
                )
            state = NeighborState(position=start)
        if retrieved is not None or (state is not None and state.neighbors is not None):
            check_right_padding(attention_mask)
        return start, retrieved, state if keep else None

    def retention_kwargs(self, retention_mode: str | None, cached: bool, seq_len: int) -> dict[str, Any]:
        """The retention mode keyword of a RetNet (or RETRO-RetNet) base: as given, else recurrent for a
        RetNet base's single cached token."""
        if self._mode_kwarg is None:
            return {}
        if retention_mode is None and cached and seq_len == 1 and self._recurrent_steps:
            retention_mode = "recurrent"
        return {} if retention_mode is None else {self._mode_kwarg: retention_mode}

    def run_base(self, call: _Call, **kwargs: Any) -> Any:
        """The base's ``forward(**kwargs)``, its wrapped decoder layers reading ``call``."""
        self._call = call
        try:
            return self.base(return_dict=True, **kwargs)
        finally:
            self._call = None

    def forward(
        self,
        input_ids: Tensor | None = None,
        retrieved: Tensor | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        retention_mode: str | None = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithCache | tuple:
        """
        Args:
            input_ids: ``(batch, seq)`` new tokens (after those already in the cache).
            retrieved: neighbors (+ continuations) of the chunks completed by these tokens, as for
                :meth:`RetroForCausalLM.forward`: ``(batch, num_chunks, k, 2 * chunk_size)``, or
                ``(batch, k, 2 * chunk_size)`` for one chunk when a cache is passed; pad / -1 = missing.
            attention_mask: passed to the base; right padding only while neighbors are read.
            labels: passed to the base (HF convention: not shifted; -100 = ignored).
            past_key_values: a :class:`RetroFitCache` from an earlier call of this model (or ``cache=``),
                or a cache of the base's at a chunk boundary.
            use_cache: return a :class:`RetroFitCache` (the base's cache and the adapter's state).
            retention_mode: the retention mode of a RetNet (or RETRO-RetNet) base (``retnet_mode=``, its
                deprecated name); a RetNet base decodes a single cached token recurrently by default.
            logits_to_keep: only the last n positions' logits.
            kwargs: passed on to the base's ``forward``.

        Returns :class:`CausalLMOutputWithCache` with ``logits (batch, seq, vocab)``.
        """
        retention_mode = retention_mode or deprecated_keyword(kwargs, "retnet_mode", "retention_mode")
        cache = resolve_cache(past_key_values, kwargs)
        start, retrieved, state = self.validate_inputs(input_ids, retrieved, attention_mask, cache, use_cache)
        kwargs.update(self.retention_kwargs(retention_mode, cache is not None, input_ids.shape[1]))
        base_cache = cache.base_cache if isinstance(cache, RetroFitCache) else cache
        out = self.run_base(
            _Call(start, retrieved, state),
            input_ids=input_ids,
            attention_mask=attention_mask,
            labels=labels,
            use_cache=state is not None,
            logits_to_keep=logits_to_keep,
            **cache_kwargs(base_cache),
            **kwargs,
        )
        new_cache = None
        if state is not None:
            state.position = start + input_ids.shape[1]
            new_cache = cache if isinstance(cache, RetroFitCache) else RetroFitCache(None, state)
            new_cache.base_cache = output_cache(out)
        result = CausalLMOutputWithCache(
            loss=out.loss,
            logits=out.logits,
            hidden_states=getattr(out, "hidden_states", None),
            **cache_kwargs(new_cache),
        )
        return result.to_tuple() if return_dict is False else result
