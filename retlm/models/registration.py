"""``import retlm`` teaches transformers' Auto classes retlm's model types, without importing transformers.

``import retlm`` takes about 4 ms (this module 0.5 ms of it; ``python -X importtime``, docs/training.md);
importing transformers' Auto classes takes 5 s or more (torch included), and retlm's three model
packages 0.2 s more once transformers' modeling code is loaded. So nothing is registered at ``import
retlm``: :func:`install` only arranges that, once the program uses the Auto classes for a retlm model,
retlm's types are there:

- ``AutoConfig.from_pretrained`` / ``for_model``, and ``from_pretrained`` / ``from_config`` of every
  ``AutoModel...`` class, called for a retlm model type (a local folder's ``config.json`` says which,
  or transformers fails on a type it does not know and the call is retried), first import
  ``retlm.models.retnet``, ``retro`` and ``retrofit``, whose ``__init__`` registers ``"retnet"``,
  ``"retro"`` and ``"retrofit"`` (``AutoConfig``, ``AutoModel`` for the first two,
  ``AutoModelForCausalLM``). Loading any other model (the database's embedder, a GPT-2) imports no
  retlm model code;
- those and ``AutoTokenizer.from_pretrained`` take a retlm run folder where they take a model folder, as
  ``retlm eval RUN`` does: the run's ``model/`` (or its newest checkpoint, see ``resolve_model_dir``).
  A folder with its own ``config.json``, a Hub name or a model object is passed on unchanged.

The wrappers are put on the classes when transformers' ``configuration_auto``, ``auto_factory`` and
``tokenization_auto`` modules are loaded (a post-import hook on ``sys.meta_path``), or at once if they
already are. Registration happens at the first call, not inside transformers' own imports, so no module
is ever imported half-initialised.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

# Nothing heavier than the above at import time (not pathlib, importlib.abc): `import retlm` runs this.
MODEL_PACKAGES = ("retlm.models.retnet", "retlm.models.retro", "retlm.models.retrofit")
MODEL_TYPES = ("retnet", "retro", "retrofit")  # their configs' model_type
_registered = False


def register_all() -> None:
    """Register retlm's model types with the Auto classes (imports the three model packages once)."""
    global _registered
    if not _registered:
        for name in MODEL_PACKAGES:
            importlib.import_module(name)
        _registered = True


def local_model_dir(path: Any) -> Any:
    """A retlm run folder (no ``config.json``, but ``model/`` or ``checkpoint-N/``) -> the folder of its
    weights; any other argument unchanged."""
    if not isinstance(path, str | os.PathLike) or not os.path.isdir(path):
        return path
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    from retlm.models.folders import CHECKPOINT_PREFIX, FINAL_DIR, resolve_model_dir

    names = os.listdir(path)
    if FINAL_DIR in names or any(name.startswith(CHECKPOINT_PREFIX) for name in names):
        return str(resolve_model_dir(path))
    return path


def _model_type(args: tuple, kwargs: dict[str, Any]) -> str | None:
    """The model type a call is about: a config's, a model type given by name, or a local folder's
    ``config.json``'s; None when unknown without loading (a Hub name)."""
    config = kwargs.get("config", args[0] if args else None)
    if isinstance(getattr(config, "model_type", None), str):
        return config.model_type
    if not args or not isinstance(args[0], str | os.PathLike):
        return None
    if not os.path.isdir(args[0]):
        return str(args[0]) if str(args[0]) in MODEL_TYPES else None  # for_model("retro")
    import json

    try:
        with open(os.path.join(args[0], "config.json"), encoding="utf-8") as f:
            return json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def _wrap(cls: type, name: str, *, register: bool, takes_path: bool) -> None:
    """Replace classmethod ``cls.name`` by one that maps a run folder to its model folder and registers
    retlm's types when the call needs them: a retlm ``model_type``, or one transformers did not know."""
    original = cls.__dict__[name].__func__
    if getattr(original, "_retlm_wrapped", False):
        return

    @functools.wraps(original)
    def wrapper(klass: type, *args: Any, **kwargs: Any) -> Any:
        if takes_path and args:
            args = (local_model_dir(args[0]), *args[1:])
        if not register or _registered:
            return original(klass, *args, **kwargs)
        kind = _model_type(args, kwargs)
        if kind in MODEL_TYPES:
            register_all()
        try:
            return original(klass, *args, **kwargs)
        except (ValueError, KeyError) as err:  # a Hub model of a type transformers does not know
            if kind is not None or not any(t in str(err) for t in MODEL_TYPES):
                raise
        register_all()
        return original(klass, *args, **kwargs)

    wrapper._retlm_wrapped = True  # type: ignore[attr-defined]
    setattr(cls, name, classmethod(wrapper))


def _patch_configuration(module: ModuleType) -> None:
    _wrap(module.AutoConfig, "from_pretrained", register=True, takes_path=True)
    _wrap(module.AutoConfig, "for_model", register=True, takes_path=False)


def _patch_auto_factory(module: ModuleType) -> None:
    _wrap(module._BaseAutoModelClass, "from_pretrained", register=True, takes_path=True)
    _wrap(module._BaseAutoModelClass, "from_config", register=True, takes_path=False)


def _patch_tokenization(module: ModuleType) -> None:
    _wrap(module.AutoTokenizer, "from_pretrained", register=False, takes_path=True)


_PATCHES: dict[str, Callable[[ModuleType], None]] = {
    "transformers.models.auto.configuration_auto": _patch_configuration,
    "transformers.models.auto.auto_factory": _patch_auto_factory,
    "transformers.models.auto.tokenization_auto": _patch_tokenization,
}


class _PatchingLoader:
    """Runs a module's own loader, then ``patch`` on the loaded module."""

    def __init__(self, loader: Any, patch: Callable[[ModuleType], None]):
        self._loader, self._patch = loader, patch

    def create_module(self, spec: Any) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        self._patch(module)

    def __getattr__(self, name: str) -> Any:  # get_code, get_source, is_package, ...
        return getattr(self._loader, name)


class _AutoModulesFinder:
    """Finds nothing itself: wraps the loader that the other finders give transformers' Auto modules."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        patch = _PATCHES.get(fullname)
        if patch is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _PatchingLoader(spec.loader, patch)
                return spec
        return None


def install() -> None:
    """Patch transformers' Auto classes now if they are loaded, else when they are (see the module
    docstring). Idempotent; imports nothing heavy."""
    pending = False
    for name, patch in _PATCHES.items():
        module = sys.modules.get(name)
        if module is not None:
            patch(module)
        else:
            pending = True
    if pending and not any(isinstance(finder, _AutoModulesFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AutoModulesFinder())
