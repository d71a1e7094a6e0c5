"""RETRO-fitting any HF causal LM: configuration and model.

Importing this package registers the ``"retrofit"`` model type with ``AutoConfig`` and
``AutoModelForCausalLM``, so ``AutoModelForCausalLM.from_pretrained(RUN)`` loads a saved adapter with its
base.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from retlm.models.retrofit.cache import RetroFitCache
from retlm.models.retrofit.configuration_retrofit import RetroFitConfig, default_cca_layers
from retlm.models.retrofit.modeling_retrofit import (
    RetroFitAdapter,
    RetroFitForCausalLM,
    RetroFitLayer,
    decoder_layers,
    load_base,
)

AutoConfig.register(RetroFitConfig.model_type, RetroFitConfig, exist_ok=True)
AutoModelForCausalLM.register(RetroFitConfig, RetroFitForCausalLM, exist_ok=True)

__all__ = [
    "RetroFitAdapter",
    "RetroFitCache",
    "RetroFitConfig",
    "RetroFitForCausalLM",
    "RetroFitLayer",
    "decoder_layers",
    "default_cca_layers",
    "load_base",
]
