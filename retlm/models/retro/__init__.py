"""RETRO: configuration, model (transformer or RetNet decoder), cache, and the retro-pytorch importer
(``retlm.models.retro.convert``).

Importing this package registers the ``"retro"`` model type with ``AutoConfig``, ``AutoModel`` and
``AutoModelForCausalLM``.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from retlm.models.retro.cache import RetroCache
from retlm.models.retro.compat_retro_pytorch import RETRO
from retlm.models.retro.configuration_retro import RetroConfig
from retlm.models.retro.modeling_retro import RetroForCausalLM, RetroModel, RetroPreTrainedModel

AutoConfig.register(RetroConfig.model_type, RetroConfig, exist_ok=True)
AutoModel.register(RetroConfig, RetroModel, exist_ok=True)
AutoModelForCausalLM.register(RetroConfig, RetroForCausalLM, exist_ok=True)

__all__ = ["RETRO", "RetroCache", "RetroConfig", "RetroForCausalLM", "RetroModel", "RetroPreTrainedModel"]
