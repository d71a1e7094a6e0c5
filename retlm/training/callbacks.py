"""Trainer callbacks: a wall-clock budget that survives resumes, a jsonl metrics log, a progress bar."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from retlm.utils import atomic_write


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every process when ``flag`` is true on at least one (so all ranks stop on the same step)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


class RunClock(TrainerCallback, ExportableState):
    """Training wall-clock time, counted across resumes; with ``budget_s``, a clean stop when it runs out.

    The time already spent is saved in each checkpoint's ``trainer_state.json`` (as this callback's
    state), so a run killed after 3 minutes of a 5-minute budget trains 2 more minutes when resumed.
    At the stop the step is evaluated (if evaluation is on) and a checkpoint is saved, as at the last
    step of any run.
    """

    def __init__(self, budget_s: float | None = None, elapsed_before: float = 0.0):
        if budget_s is not None and not budget_s > 0:
            raise ValueError(f"the time budget must be positive, got {budget_s} s")
        self.budget_s = budget_s
        self.elapsed_before = float(elapsed_before)
        self.started: float | None = None
        self.stopped_by_budget = False

    def elapsed(self) -> float:
        running = 0.0 if self.started is None else time.monotonic() - self.started
        return self.elapsed_before + running

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_save = True  # the end of a run is always checkpointed, whatever save_every says
        if self.budget_s is None or control.should_training_stop:
            return
        if any_rank(self.elapsed() >= self.budget_s, args.device):
            self.stopped_by_budget = True
            control.should_training_stop = True
            control.should_save = True
            control.should_evaluate = args.eval_strategy != "no"

    def state(self) -> dict[str, Any]:
        return {"args": {"budget_s": self.budget_s}, "attributes": {"elapsed_before": self.elapsed()}}

    @staticmethod
    def elapsed_in(checkpoint: Path) -> float:
        """Seconds of training recorded in a checkpoint (0 when it has none)."""
        saved = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
        entry = saved.get("stateful_callbacks", {}).get(RunClock.__name__, {})
        if isinstance(entry, list):
            entry = entry[-1] if entry else {}
        return float(entry.get("attributes", {}).get("elapsed_before", 0.0))


class JsonlMetrics(TrainerCallback):
    """Appends each logged record to ``path`` as one json line: ``step``, ``elapsed_s`` and the metrics.

    Training records carry ``loss``, ``grad_norm`` and ``learning_rate``; evaluation records carry
    ``eval_*`` keys. Only the main process writes.
    """

    def __init__(self, path: Path, clock: RunClock):
        self.path = Path(path)
        self.clock = clock

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": state.epoch,
                  "elapsed_s": round(self.clock.elapsed(), 3)}
        record.update({k: v for k, v in logs.items() if isinstance(v, int | float) and math.isfinite(v)})
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    @staticmethod
    def truncate(path: Path, last_step: int) -> None:
        """Drop records after ``last_step``: the steps a killed run logged after its last checkpoint."""
        if not path.is_file():
            return
        kept = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= last_step]
        atomic_write(path, lambda tmp: tmp.write_text("".join(line + "\n" for line in kept)))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``, in order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class ProgressBar(TrainerCallback):
    """One tqdm bar over optimizer steps, with the latest training and evaluation loss."""

    def __init__(self):
        self.bar: tqdm | None = None
        self.shown: dict[str, str] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", unit="step",
                            dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs:
            return
        for key, label in (("loss", "loss"), ("eval_loss", "eval"), ("eval_loss_no_retrieval", "eval_noret")):
            if key in logs:
                self.shown[label] = f"{logs[key]:.3f}"
        self.bar.set_postfix(self.shown, refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
