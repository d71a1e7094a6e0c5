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

from retlm.models.folders import FINAL_DIR  # the run directory's layout, which load_model reads

RUN_FILE = "retlm_run.json"
METRICS_FILE = "metrics.jsonl"
STAGING_DIR = ".staging"
FINAL_STEP_FILE = "retlm_step.json"  # in model/: the step its weights come from
# what a checkpoint holds besides the training state: weights, config, the LM tokenizer
MODEL_FILES = (
    "config.json",
    "model.safetensors",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


def commit_dir(staging: Path, final: Path) -> None:
    """Move a fully written ``staging`` directory onto ``final`` by rename; replace any old ``final``."""
    old = final.parent / f".old-{final.name}-{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


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


def seal_model_dir(folder: Path) -> None:
    """Record the sha256 of every file of a model folder or checkpoint in ``retlm_checksums.json``."""
    from retlm.checksums import write_folder_checksums

    write_folder_checksums(folder)


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


def check_model_fits_database(config: Any, db: Any, signature: dict[str, Any] | None = None) -> None:
    """Refuse a model whose tokenizer or chunking differs from the database's, naming both sides
    (``signature``: ``database_signature(db)`` when the caller has it already)."""
    data = database_signature(db) if signature is None else signature
    trained = getattr(config, "retlm_data", None) or {}
    if trained.get("tokenizer") and data["tokenizer"] and trained["tokenizer"] != data["tokenizer"]:
        raise ValueError(
            f"tokenizer mismatch: the model was trained with tokenizer {trained['tokenizer']!r} "
            f"but the database uses {data['tokenizer']!r}; use a database built with the "
            "model's tokenizer"
        )
    trained_sha, data_sha = trained.get("tokenizer_sha256"), data["tokenizer_sha256"]
    if trained_sha and data_sha and trained_sha != data_sha:
        raise ValueError(
            f"tokenizer mismatch: the model was trained with a {trained['tokenizer']!r} "
            f"vocabulary (sha256 {trained_sha[:12]}...) but the database's "
            f"{data['tokenizer']!r} vocabulary differs (sha256 {data_sha[:12]}...)"
        )
    if trained.get("vocab_size") and int(trained["vocab_size"]) != data["vocab_size"]:
        raise ValueError(
            f"tokenizer mismatch: the model was trained on a {trained['vocab_size']}-token "
            f"vocabulary but the database's tokenizer has {data['vocab_size']} tokens"
        )
    if model_vocab_size(config) < data["vocab_size"]:
        raise ValueError(
            f"tokenizer mismatch: the model has {model_vocab_size(config)} token embeddings but "
            f"the database's tokenizer ({data['tokenizer']}) has {data['vocab_size']} tokens"
        )
    if int(config.chunk_size) != data["chunk_size"]:
        raise ValueError(
            f"chunk size mismatch: the model uses chunk_size={config.chunk_size} but the "
            f"database was chunked with chunk_size={data['chunk_size']}"
        )
