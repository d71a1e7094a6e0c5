"""Strict checkpoint loading of RETRO (a checkpoint
that does not fit the config is refused instead of being patched with fresh weights)."""

from __future__ import annotations

from typing import Any

from retlm.models.retro.configuration_retro import RetroConfig


class StrictLoadingMixin:
    """Listed before ``PreTrainedModel`` in a model's bases: its ``from_pretrained`` refuses a checkpoint
    that does not fit the config."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> Any:
        """transformers' ``from_pretrained``, but a checkpoint that does not fit the model's config (missing,
        unexpected or differently shaped tensors) is refused with a ValueError instead of being patched
        with fresh weights."""
        want_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs
            )
        except RuntimeError as error:
            if "mismatched" not in str(error):
                raise
            raise ValueError(
                f"the checkpoint in {pretrained_model_name_or_path} was saved from another RETRO config "
                f"(tensor shapes differ{config_difference(pretrained_model_name_or_path, kwargs)}); "
                "load it with the config.json saved beside it"
            ) from error
        wrong = {name: info.get(name) for name in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        wrong = {name: sorted(map(str, keys))[:6] for name, keys in wrong.items() if keys}
        if wrong:
            raise ValueError(
                f"the checkpoint in {pretrained_model_name_or_path} does not fit this RETRO config "
                f"({wrong}{config_difference(pretrained_model_name_or_path, kwargs)}); "
                "load it with the config.json saved beside it"
            )
        return (model, info) if want_info else model


def config_difference(path: Any, kwargs: dict[str, Any]) -> str:
    """``"; config differs from the saved one in {field: (saved, given)}"`` when a config was passed."""
    given = kwargs.get("config")
    if not isinstance(given, RetroConfig):
        return ""
    try:
        saved = RetroConfig.from_pretrained(path).to_dict()
    except (OSError, ValueError):
        return ""
    ignored = {"transformers_version", "architectures", "dtype", "torch_dtype"}
    diff = {
        key: (saved.get(key), value)
        for key, value in given.to_dict().items()
        if key not in ignored and saved.get(key) != value
    }
    return f"; the config differs from the saved one in {{field: (saved, given)}} = {diff}" if diff else ""
