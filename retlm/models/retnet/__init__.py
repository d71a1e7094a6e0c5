"""RetNet: configuration, model, cache, and the torchscale importer (``retlm.models.retnet.convert``).

Importing this package registers the ``"retnet"`` model type with ``AutoConfig``, ``AutoModel`` and
``AutoModelForCausalLM``.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from retlm.models.retnet.cache import RetNetCache
from retlm.models.retnet.configuration_retnet import RetNetConfig, load_config_from_yaml
from retlm.models.retnet.modeling_retnet import (
    RetNetDecoderLayer,
    RetNetForCausalLM,
    RetNetModel,
    RetNetModelWithLMHead,
    RetNetPreTrainedModel,
)

AutoConfig.register(RetNetConfig.model_type, RetNetConfig, exist_ok=True)
AutoModel.register(RetNetConfig, RetNetModel, exist_ok=True)
AutoModelForCausalLM.register(RetNetConfig, RetNetForCausalLM, exist_ok=True)

__all__ = [
    "RetNetCache",
    "RetNetConfig",
    "RetNetDecoderLayer",
    "RetNetForCausalLM",
    "RetNetModel",
    "RetNetModelWithLMHead",
    "RetNetPreTrainedModel",
    "load_config_from_yaml",
]
