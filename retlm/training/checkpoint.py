"""Run directories, atomic checkpoints, and the checks that a checkpoint fits a database.

A run directory holds:
- ``checkpoint-<step>/``: HF Trainer checkpoints (``model.safetensors``, ``config.json``, optimizer,
  scheduler and RNG state, ``trainer_state.json``), each committed by one directory rename;
- ``model/``: the final weights (safetensors), config and ``retlm_step.json`` (their step), committed the
  same way;
- ``retlm_run.json``: what the run was trained on (database, tokenizer, split, hyperparameters);
- ``metrics.jsonl``: one line per logged training or evaluation step.

A directory rename is atomic on POSIX file systems, so a killed run leaves only whole checkpoints
(plus, at most, a staging directory that the next run deletes).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from retlm.utils import atomic_write

RUN_FILE = "retlm_run.json"
METRICS_FILE = "metrics.jsonl"
FINAL_DIR = "model"
STAGING_DIR = ".staging"
FINAL_STEP_FILE = "retlm_step.json"  # in model/: the step its weights come from
# what a checkpoint holds besides the training state: weights, config, the LM tokenizer
MODEL_FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
CHECKPOINT_PREFIX = "checkpoint-"


def commit_dir(staging: Path, final: Path) -> None:
    """Move a fully written ``staging`` directory onto ``final`` by rename; replace any old ``final``."""
    old = final.parent / f".old-{final.name}-{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def checkpoints(run_dir: Path) -> list[Path]:
    """Committed checkpoints of a run, oldest first."""
    found = []
    for path in Path(run_dir).glob(f"{CHECKPOINT_PREFIX}*"):
        step = path.name[len(CHECKPOINT_PREFIX):]
        if path.is_dir() and step.isdigit() and (path / "trainer_state.json").is_file():
            found.append((int(step), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1] if found else None


def checkpoint_step(checkpoint: Path) -> int:
    return int(read_json(Path(checkpoint) / "trainer_state.json")["global_step"])


def checkpoint_max_steps(checkpoint: Path) -> int:
    """The run's planned length when ``checkpoint`` was written (``trainer_state.json``'s ``max_steps``)."""
    return int(read_json(Path(checkpoint) / "trainer_state.json")["max_steps"])


def final_model_step(run_dir: Path) -> int | None:
    """The training step of ``run_dir/model``'s weights, or None if it has none."""
    marker = Path(run_dir) / FINAL_DIR / FINAL_STEP_FILE
    if not (marker.is_file() and (marker.parent / "model.safetensors").is_file()):
        return None
    return int(read_json(marker)["global_step"])


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
            raise FileNotFoundError(f"{path} holds no model: expected config.json + model.safetensors, "
                                    f"a {FINAL_DIR}/ folder, or {CHECKPOINT_PREFIX}N/ folders")
    if not (candidate / "model.safetensors").is_file():
        raise FileNotFoundError(f"{candidate} has no model.safetensors (only safetensors weights are loaded)")
    return candidate


def seal_model_dir(folder: Path) -> None:
    """Record the sha256 of every file of a model folder or checkpoint in ``retlm_checksums.json``."""
    from retlm.integrity import write_folder_checksums

    write_folder_checksums(folder)


def verify_model_dir(folder: Path, names: Any = None) -> None:
    """Compare a model folder's files (``names``, default all recorded) with their saved sha256, and
    check that ``model.safetensors`` is structurally whole; errors name the file."""
    from retlm.integrity import check_safetensors, verify_folder

    verify_folder(folder, names)
    weights = Path(folder) / "model.safetensors"
    if weights.is_file():
        check_safetensors(weights)


def load_model(path: str | os.PathLike[str]) -> Any:
    """A trained model from a run dir, model dir or checkpoint, loaded from safetensors only.

    Before anything is parsed, the files are compared with the sha256 recorded when they were saved
    (``retlm_checksums.json``) and the safetensors header is checked against the file's size; a bad
    ``config.json`` is reported with its path."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    import retlm.models.retnet  # noqa: F401  (register their configs with the Auto classes)
    import retlm.models.retro  # noqa: F401
    import retlm.models.retrofit  # noqa: F401

    model_dir = resolve_model_dir(path)
    verify_model_dir(model_dir, ("config.json", "model.safetensors", "generation_config.json"))
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except Exception as err:  # invalid json, a wrong type, an unknown model type: name the file
        reason = " ".join(str(err).split())[:300]
        raise ValueError(f"{model_dir / 'config.json'} is not a valid RETRO config ({reason})") from None
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a "Loading weights" bar per call is noise in `retlm eval`
    try:
        return AutoModelForCausalLM.from_pretrained(model_dir, config=config, use_safetensors=True)
    except ValueError:
        raise
    except Exception as err:  # the loaders' messages (safetensors, torch) do not name the file
        reason = " ".join(str(err).split())[:300]
        raise ValueError(f"{model_dir / 'model.safetensors'} cannot be loaded ({reason})") from None
    finally:
        if shown:
            hf_logging.enable_progress_bar()


# ---- which tokenizer and layout a database has, and whether a model fits it ----

def _tokenizer_name(db: Any) -> str | None:
    manifest = getattr(db, "manifest", None) or {}
    entry = manifest.get("tokenizer")
    if isinstance(entry, dict):
        entry = entry.get("name") or entry.get("name_or_path")
    if entry is None:
        entry = getattr(getattr(db, "tokenizer", None), "name_or_path", None)
    return None if entry is None else str(entry)


def _tokenizer_vocab_size(db: Any) -> int:
    manifest = getattr(db, "manifest", None) or {}
    entry = manifest.get("tokenizer")
    if isinstance(entry, dict) and entry.get("vocab_size"):
        return int(entry["vocab_size"])
    return len(db.tokenizer)


def _tokenizer_sha256(db: Any) -> str | None:
    entry = (getattr(db, "manifest", None) or {}).get("tokenizer")
    return entry.get("sha256") if isinstance(entry, dict) else None


def database_signature(db: Any) -> dict[str, Any]:
    """What a model trained on ``db`` depends on: tokenizer identity (name, size, vocabulary sha256) and
    the chunk layout."""
    return {
        "tokenizer": _tokenizer_name(db),
        "tokenizer_sha256": _tokenizer_sha256(db),
        "vocab_size": _tokenizer_vocab_size(db),
        "chunk_size": int(db.chunk_size),
        "num_neighbors": int(db.num_neighbors),
        "pad_id": int(db.pad_id),
        "eos_id": None if getattr(db, "eos_id", None) is None else int(db.eos_id),
    }


def model_vocab_size(config: Any) -> int:
    size = getattr(config, "num_tokens", None)
    return int(size if size is not None else config.vocab_size)


def check_model_fits_database(config: Any, db: Any) -> None:
    """Refuse a model whose tokenizer or chunking differs from the database's, naming both sides."""
    data = database_signature(db)
    trained = getattr(config, "retlm_data", None) or {}
    if trained.get("tokenizer") and data["tokenizer"] and trained["tokenizer"] != data["tokenizer"]:
        raise ValueError(f"tokenizer mismatch: the model was trained with tokenizer {trained['tokenizer']!r} "
                         f"but the database uses {data['tokenizer']!r}; use a database built with the "
                         "model's tokenizer")
    trained_sha, data_sha = trained.get("tokenizer_sha256"), data["tokenizer_sha256"]
    if trained_sha and data_sha and trained_sha != data_sha:
        raise ValueError(f"tokenizer mismatch: the model was trained with a {trained['tokenizer']!r} "
                         f"vocabulary (sha256 {trained_sha[:12]}...) but the database's "
                         f"{data['tokenizer']!r} vocabulary differs (sha256 {data_sha[:12]}...)")
    if trained.get("vocab_size") and int(trained["vocab_size"]) != data["vocab_size"]:
        raise ValueError(f"tokenizer mismatch: the model was trained on a {trained['vocab_size']}-token "
                         f"vocabulary but the database's tokenizer has {data['vocab_size']} tokens")
    if model_vocab_size(config) < data["vocab_size"]:
        raise ValueError(f"tokenizer mismatch: the model has {model_vocab_size(config)} token embeddings but "
                         f"the database's tokenizer ({data['tokenizer']}) has {data['vocab_size']} tokens")
    if int(config.chunk_size) != data["chunk_size"]:
        raise ValueError(f"chunk size mismatch: the model uses chunk_size={config.chunk_size} but the "
                         f"database was chunked with chunk_size={data['chunk_size']}")
