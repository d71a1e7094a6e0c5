"""Differences between the transformers versions retlm supports, kept in this one module.

transformers 5.24 renamed the generation cache from ``past_key_values`` to ``cache``: ``generate``
passes it to ``prepare_inputs_for_generation`` and to ``forward`` as ``cache=``, reads it back from the
output's ``cache`` field, and logs a deprecation warning whenever the old name is used. Before 5.24 the
name is ``past_key_values`` everywhere. retlm's models accept the cache under either keyword on every
version, return it under the installed version's name, and their outputs answer to both names
without a warning, so user code written for either release keeps working.

The installed name is detected from the output dataclass itself rather than from the version number,
so a backport or a patch release that moves the rename is still handled.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

# The keyword (and output field) under which the installed transformers passes the generation cache.
CACHE_NAME: str = (
    "cache" if "cache" in {f.name for f in fields(CausalLMOutputWithPast)} else "past_key_values"
)
_OTHER_NAME = "past_key_values" if CACHE_NAME == "cache" else "cache"


def resolve_cache(past_key_values: Any, kwargs: dict[str, Any]) -> Any:
    """The cache a ``forward`` or ``prepare_inputs_for_generation`` was given under either keyword.

    ``past_key_values`` is the explicit argument; a ``cache`` entry is popped from ``kwargs``. Giving two
    different caches is an error.
    """
    cache = kwargs.pop("cache", None)
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the cache as either `cache` or `past_key_values`, not both")
    return past_key_values if cache is None else cache


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """``{name: cache}`` under the installed name: for a model call or an output constructor."""
    return {CACHE_NAME: cache}


def output_cache(output: Any) -> Any:
    """The cache held by a model output (``None`` if it has none), read without a deprecation warning."""
    return getattr(output, CACHE_NAME, None)


def _other_name(self: Any) -> Any:
    return getattr(self, CACHE_NAME)


@dataclass
class BaseModelOutputWithCache(BaseModelOutputWithPast):
    """:class:`BaseModelOutputWithPast` whose cache answers to ``.cache`` and ``.past_key_values`` on every
    transformers version, with no warning. Build it with ``**cache_kwargs(cache)``."""


@dataclass
class CausalLMOutputWithCache(CausalLMOutputWithPast):
    """:class:`CausalLMOutputWithPast` whose cache answers to ``.cache`` and ``.past_key_values`` on every
    transformers version, with no warning. Build it with ``**cache_kwargs(cache)``."""


# The name that is not a dataclass field becomes a read-only alias of the one that is. (On 5.24+ this
# replaces ModelOutput's own `past_key_values` property, which warns.)
for _cls in (BaseModelOutputWithCache, CausalLMOutputWithCache):
    setattr(_cls, _OTHER_NAME, property(_other_name))


def gguf_load_kwargs() -> dict[str, Any]:
    """``from_pretrained`` keywords that load a GGUF checkpoint as a plain dense model.

    From transformers 5.24 a GGUF can load with its weights kept packed in GGUF blocks (``GgufConfig``,
    for the architectures it ports, when the ``kernels`` package is installed); ``dequantize=True`` asks
    for dense weights, which is what earlier versions always load."""
    try:
        from transformers.utils.quantization_config import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _installed_version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "0"


# The fast embed backends (onnx, onnx-int8, openvino) trace the encoder. transformers 5.4 (the lowest
# declared) builds the attention mask of a traced BERT through a path that indexes a 0-d tensor
# ("tuple index out of range" in masking_utils.sdpa_mask); 5.24 (the lock) and 5.25 trace it. Below the
# tested version the default embed backend is the torch reference, and asking for a fast one is refused.
FAST_EMBED_MIN_TRANSFORMERS = "5.24"
FAST_EMBED_BACKENDS_TRACE: bool = _version_tuple(_installed_version("transformers")) >= _version_tuple(
    FAST_EMBED_MIN_TRANSFORMERS
)


def bm25_save_kwargs(save: Any) -> dict[str, Any]:
    """``show_progress=False`` for ``bm25s.BM25.save`` where the installed bm25s takes it (0.2.10, the
    lowest declared, does not)."""
    import inspect

    try:
        accepts = "show_progress" in inspect.signature(save).parameters
    except (TypeError, ValueError):
        accepts = False
    return {"show_progress": False} if accepts else {}
