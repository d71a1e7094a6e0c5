"""The base model of a RETRO-fit: finding its decoder layers, loading it, checking that it is the one an
adapter was built for, and wrapping a decoder layer so that the retrofit's CCA sub-layer follows it."""

from __future__ import annotations

import os
from typing import Any

from torch import nn
from transformers import PreTrainedModel

from retlm.models.retrofit.configuration_retrofit import BASE_SIGNATURE, RetroFitConfig, signature_of

# Where the decoder layers of the supported families live (GPT-2; Llama, Qwen2, Mistral, RetNet, RETRO).
LAYER_PATHS = ("transformer.h", "model.layers", "model.decoder.layers", "gpt_neox.layers")
SUPPORTED = "GPT2LMHeadModel, LlamaForCausalLM (and Qwen2, Mistral), RetNetForCausalLM and RetroForCausalLM"


def decoder_layers(base: nn.Module) -> nn.ModuleList:
    """The ``nn.ModuleList`` of a causal LM's decoder layers (GPT-2's ``transformer.h``, Llama's and
    RetNet's ``model.layers``, ...)."""
    for path in LAYER_PATHS:
        module: Any = base
        for name in path.split("."):
            module = getattr(module, name, None)
        if isinstance(module, nn.ModuleList) and len(module):
            return module
    raise ValueError(
        f"cannot find the decoder layers of {type(base).__name__} (looked for "
        f"{', '.join(LAYER_PATHS)}); RETRO-fitting supports {SUPPORTED}"
    )


def load_base(name_or_path: str | os.PathLike[str], **kwargs: Any) -> PreTrainedModel:
    """A causal LM by any name :func:`retlm.models.pretrained.pretrained_path` takes (a known name such as
    ``smollm2-135m``, a .gguf file, a folder, a retlm run directory, a Hub id), retlm's own model types
    registered; ``kwargs`` (``dtype``, ``device_map``, ...) go to ``from_pretrained``."""
    from retlm.models.pretrained import load_pretrained

    return load_pretrained(name_or_path, **kwargs)


def check_base(base: nn.Module, config: RetroFitConfig) -> None:
    """Refuse a base whose type or shape differs from the one ``config`` was built for."""
    expected = config.base_signature
    if not expected:
        return
    found = signature_of(base.config)
    different = {
        name: (expected.get(name), found.get(name))
        for name in BASE_SIGNATURE
        if expected.get(name) != found.get(name)
    }
    if different:
        raise ValueError(
            f"the base {getattr(base, 'name_or_path', '') or type(base).__name__} is not the model this "
            f"adapter was built for ({{field: (expected, found)}} = {different}); pass the right one "
            "with base=..."
        )


class RetroFitLayer(nn.Module):
    """A base decoder layer, run unchanged, then followed by the retrofit's CCA sub-layer.

    Whatever the layer returns (a tensor, or a tuple whose first item is the hidden states) comes back in
    the same form. Outside a :meth:`RetroFitForCausalLM.forward` call (the base called directly, or its
    own ``generate()``) the wrapper is the identity. Other attributes read through to the wrapped layer
    (e.g. Qwen2's ``attention_type``).
    """

    def __init__(self, layer: nn.Module, number: int, owner: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.number = number  # 1-based: the CCA follows this decoder layer
        object.__setattr__(self, "_owner", owner)  # a reference, not a submodule
        # The base's state dict keeps its own key names (no ".layer." inside): it saves, loads and
        # compares as the unwrapped base does.
        post_hook = getattr(self, "register_state_dict_post_hook", None) or self._register_state_dict_hook
        post_hook(_unwrap_keys)
        self._register_load_state_dict_pre_hook(_wrap_keys, with_module=True)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if "layer" not in modules:
                raise
            return getattr(modules["layer"], name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.layer(*args, **kwargs)
        call = self._owner._call
        if call is None:
            return out
        if isinstance(out, tuple):
            return (self._owner._after_layer(self.number, out[0], call), *out[1:])
        return self._owner._after_layer(self.number, out, call)


def _unwrap_keys(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    inner = prefix + "layer."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner) :]] = state_dict.pop(key)


def _wrap_keys(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    inner = prefix + "layer."
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]:
        state_dict[inner + key[len(prefix) :]] = state_dict.pop(key)
