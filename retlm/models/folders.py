"""A model's folders: a run directory (written by ``retlm.training``) holds ``model/`` (the final weights)
and ``checkpoint-<step>/`` folders; :func:`resolve_model_dir` finds the weights in any of the three, and
:func:`verify_model_dir` checks the files against the checksums recorded when they were saved. Imports
no model, so the models and the pretrained-name cache can use it (``auto.load_model`` loads them)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FINAL_DIR = "model"
CHECKPOINT_PREFIX = "checkpoint-"


def checkpoints(run_dir: Path) -> list[Path]:
    """Committed checkpoints of a run, oldest first."""
    found = []
    for path in Path(run_dir).glob(f"{CHECKPOINT_PREFIX}*"):
        step = path.name[len(CHECKPOINT_PREFIX) :]
        if path.is_dir() and step.isdigit() and (path / "trainer_state.json").is_file():
            found.append((int(step), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1] if found else None


def resolve_model_dir(path: str | os.PathLike[str]) -> Path:
    """The directory with the weights: a model dir or checkpoint as given, or a run dir's final model
    (its latest checkpoint if training did not finish)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if (path / "config.json").is_file():
        candidate = path
    elif (path / FINAL_DIR / "config.json").is_file():
        candidate = path / FINAL_DIR
    else:
        candidate = latest_checkpoint(path)
        if candidate is None:
            raise FileNotFoundError(
                f"{path} holds no model: expected config.json + model.safetensors, "
                f"a {FINAL_DIR}/ folder, or {CHECKPOINT_PREFIX}N/ folders"
            )
    if not (candidate / "model.safetensors").is_file():
        raise FileNotFoundError(f"{candidate} has no model.safetensors (only safetensors weights are loaded)")
    return candidate


@contextlib.contextmanager
def quiet_hf_progress() -> Iterator[None]:
    """transformers' own progress bars ("Loading weights", ...) off for the body: noise in a command's
    output."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def verify_model_dir(folder: Path, names: Any = None) -> None:
    """Compare a model folder's files (``names``, default all recorded) with their saved sha256, and
    check that ``model.safetensors`` is structurally whole; errors name the file."""
    from retlm.checksums import check_safetensors, verify_folder

    verify_folder(folder, names)
    weights = Path(folder) / "model.safetensors"
    if weights.is_file():
        check_safetensors(weights)
