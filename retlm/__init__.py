"""retlm: RETRO and RetNet language models, and RETRO with a RetNet decoder.

The public names are imported lazily so that `import retlm` stays cheap and so that a user
of the retrieval database does not pay for the model code (and vice versa).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY: dict[str, str] = {
    "RetNetConfig": "retlm.models.retnet",
    "RetNetModel": "retlm.models.retnet",
    "RetNetForCausalLM": "retlm.models.retnet",
    "RetNetModelWithLMHead": "retlm.models.retnet",
    "RetNetCache": "retlm.models.retnet",
    "load_config_from_yaml": "retlm.models.retnet",
    "RETRO": "retlm.models.retro",
    "RetroConfig": "retlm.models.retro",
    "RetroForCausalLM": "retlm.models.retro",
    "RetroFitConfig": "retlm.models.retrofit",
    "RetroFitForCausalLM": "retlm.models.retrofit",
    "RETRODataset": "retlm.data",
    "RetrievalDatabase": "retlm.retrieval",
    "load_tokenizer": "retlm.tokenization",
    "pretrained_path": "retlm.models.pretrained",
    "load_causal_lm": "retlm.models.pretrained",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'retlm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
