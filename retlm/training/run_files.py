"""A run directory's files around the HF ``Trainer``: ``retlm_run.json`` and ``metrics.jsonl`` started or
cut back on resume, the checkpoint to resume from (refused when the run's fixed settings changed), the
final ``model/`` committed by one rename, and the result of a run that had already finished."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.utils import logging as hf_logging

from retlm.models.folders import latest_checkpoint, verify_model_dir
from retlm.training import checkpoint as ckpt
from retlm.training.callbacks import JsonlMetrics, read_metrics
from retlm.training.model_card import write_model_card
from retlm.utils import write_json


@contextmanager
def quiet_saving() -> Iterator[None]:
    """No per-shard progress bar from ``save_pretrained`` in the middle of the training bar."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@dataclass
class TrainResult:
    """What ``train`` did: where the model is, how far it got and why it stopped."""

    run_dir: Path
    model_dir: Path
    global_step: int
    max_steps: int
    stop_reason: str  # "max_steps" | "time_budget" | "already_finished"
    elapsed_s: float
    metrics_file: Path
    last_train_loss: float | None = None
    last_eval: dict[str, float] = field(default_factory=dict)


def start_run_files(out_dir: Path, resume_from: Path | None, run: dict[str, Any]) -> None:
    """Write ``retlm_run.json``; start ``metrics.jsonl`` afresh, or cut it back to the resumed step."""
    metrics = out_dir / ckpt.METRICS_FILE
    if resume_from is None:
        metrics.unlink(missing_ok=True)
    else:
        JsonlMetrics.truncate(metrics, ckpt.checkpoint_step(resume_from))
    shutil.rmtree(out_dir / ckpt.STAGING_DIR, ignore_errors=True)
    write_json(out_dir / ckpt.RUN_FILE, run)


def resume_point(resume: str, out_dir: Path, previous: dict | None, fixed: dict) -> Path | None:
    """The checkpoint to continue from, after checking that the run's fixed settings are unchanged."""
    if resume == "never":
        if previous is not None or latest_checkpoint(out_dir) is not None:
            raise FileExistsError(
                f"{out_dir} already holds a training run; continue it with resume='auto' "
                "(`--resume auto`) or choose another output directory"
            )
        return None
    checkpoint = latest_checkpoint(out_dir) if resume == "auto" else Path(resume)
    if checkpoint is None:
        return None
    if not (checkpoint / "trainer_state.json").is_file():
        raise ValueError(f"{checkpoint} is not a training checkpoint (no trainer_state.json)")
    verify_model_dir(checkpoint)  # weights, optimizer and RNG state as they were saved
    if previous is not None:
        changed = [key for key in fixed if previous["fixed"].get(key) != jsonable(fixed[key])]
        if changed:
            details = "; ".join(
                f"{key}: was {previous['fixed'].get(key)!r}, now {jsonable(fixed[key])!r}" for key in changed
            )
            raise ValueError(
                f"cannot resume the run in {out_dir}: settings changed ({details}). "
                "Use the run's settings, or a new output directory"
            )
    return checkpoint


def jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


def save_final(trainer: Any, out_dir: Path) -> Path:
    """The final weights as ``<run>/model`` (safetensors + config + the model card ``README.md``),
    committed by rename."""
    final = out_dir / ckpt.FINAL_DIR
    staging = out_dir / ckpt.STAGING_DIR / ckpt.FINAL_DIR
    with quiet_saving():
        trainer.save_model(str(staging))
    barrier()
    if trainer.args.should_save:
        (staging / TRAINING_ARGS_NAME).unlink(missing_ok=True)
        write_json(staging / ckpt.FINAL_STEP_FILE, {"global_step": trainer.state.global_step})
        model = trainer.model
        write_model_card(
            staging,
            out_dir,
            model.config,
            global_step=trainer.state.global_step,
            num_parameters=sum(p.numel() for p in model.parameters()),
        )
        ckpt.seal_model_dir(staging)
        ckpt.commit_dir(staging, final)
        shutil.rmtree(out_dir / ckpt.STAGING_DIR, ignore_errors=True)
    barrier()
    return final


def finish_without_training(
    out_dir: Path, checkpoint: Path, steps: int, elapsed: float, is_main: bool
) -> TrainResult:
    """The run already reached its step count or time budget: make sure ``model/`` holds its last
    checkpoint (a kill can fall between the two) and that the run file says it finished."""
    final, step = out_dir / ckpt.FINAL_DIR, ckpt.checkpoint_step(checkpoint)
    if is_main and ckpt.final_model_step(out_dir) != step:
        verify_model_dir(checkpoint)
        staging = out_dir / ckpt.STAGING_DIR / ckpt.FINAL_DIR
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for name in ckpt.MODEL_FILES:
            if (checkpoint / name).is_file():
                shutil.copy2(checkpoint / name, staging / name)
        write_json(staging / ckpt.FINAL_STEP_FILE, {"global_step": step})
        from transformers import AutoConfig

        write_model_card(staging, out_dir, AutoConfig.from_pretrained(staging), global_step=step)
        ckpt.seal_model_dir(staging)
        ckpt.commit_dir(staging, final)
    if is_main and (out_dir / ckpt.RUN_FILE).is_file():
        run = ckpt.read_json(out_dir / ckpt.RUN_FILE)
        if run.get("status") != "finished":
            run.update(
                status="finished", stop_reason="resumed_after_end", global_step=step, elapsed_s=elapsed
            )
            write_json(out_dir / ckpt.RUN_FILE, run)
    barrier()
    result = TrainResult(
        run_dir=out_dir,
        model_dir=final,
        global_step=step,
        max_steps=steps,
        stop_reason="already_finished",
        elapsed_s=elapsed,
        metrics_file=out_dir / ckpt.METRICS_FILE,
    )
    fill_last_metrics(result)
    return result


def fill_last_metrics(result: TrainResult) -> None:
    if not result.metrics_file.is_file():
        return
    for record in read_metrics(result.metrics_file):
        if "loss" in record:
            result.last_train_loss = record["loss"]
        if "eval_loss" in record:
            result.last_eval = {k: v for k, v in record.items() if k.startswith("eval_")}
