"""Trainer callbacks: a wall-clock budget that survives resumes, a step planner that fits the run to that
budget, a jsonl metrics log, a progress bar."""

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


def all_ranks_min(value: int, device: torch.device) -> int:
    """The smallest ``value`` over all processes (so every rank plans the same number of steps)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    tensor = torch.tensor([float(value)], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


class PlannedSchedule:
    """The learning-rate multiplier of a run whose length may change while it trains: linear warmup, then
    cosine, linear or constant decay until ``total`` steps (HF ``get_scheduler``'s formulas). ``warmup``
    is a step count, or a fraction of the first ``total`` below 1; the warmup length is fixed then, so a
    re-plan moves the end of the decay, never the warmup already done. Used by ``LambdaLR``, which saves
    and restores this object's attributes with the scheduler's state, so a resumed run continues the
    same schedule."""

    def __init__(self, kind: str, warmup: float, total: int):
        if kind not in ("cosine", "linear", "constant"):
            raise ValueError(f"unknown schedule {kind!r}")
        self.kind, self.total = kind, int(total)
        self.warmup = math.ceil(warmup * total) if warmup < 1 else int(warmup)

    def __call__(self, step: int) -> float:
        warmup = self.warmup
        if step < warmup:
            return step / max(1, warmup)
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, self.total - warmup))
        if self.kind == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


class StepPlanner(TrainerCallback):
    """Re-plans the number of steps of a time-budgeted run from the steps it has actually made.

    At the end of every optimizer step, the seconds per step measured so far (from the end of this
    process's first step, which pays one-off costs; evaluations and checkpoints included) give how many
    more steps fit in what is left of the budget once the final evaluation and checkpoint are paid for
    (their last measured durations; before any, the estimates it was given). After the first step,
    with nothing measured yet, that step's own duration stands in. The total becomes
    ``state.max_steps``, where HF's Trainer stops, and the length of the learning-rate schedule
    (``PlannedSchedule``), so the run ends on its budget with its schedule complete. It never plans
    more than ``cap`` steps (the ``max_steps`` the Trainer was built with). ``RunClock`` still stops the
    run at the budget, whatever the plan.

    It must run before HF's ``DefaultFlowCallback``, which stops training when ``state.max_steps`` is
    reached: ``train`` puts it first in the callback list.
    """

    def __init__(
        self,
        clock: RunClock,
        schedule: PlannedSchedule,
        cap: int,
        *,
        eval_s: float = 0.0,
        save_s: float = 0.0,
        evaluates: bool = False,
    ):
        if clock.budget_s is None:
            raise ValueError("the step planner needs a time budget")
        self.clock, self.schedule, self.cap = clock, schedule, int(cap)
        self.eval_s, self.save_s, self.evaluates = float(eval_s), float(save_s), evaluates
        self.start, self.started_at, self.base = 0, 0.0, None
        self.mark = 0.0
        self.replans = 0

    def on_train_begin(self, args, state, control, **kwargs):
        state.max_steps = min(self.schedule.total, self.cap)  # restored with the scheduler on resume
        self.start, self.base = state.global_step, None
        self.started_at = self.mark = self.clock.elapsed()

    def on_step_end(self, args, state, control, **kwargs):
        now, step = self.clock.elapsed(), state.global_step
        if self.base is None:  # this process's first step: measure from its end on
            self.base = (step, now)
            per_step = (now - self.started_at) / max(1, step - self.start)
        else:
            per_step = (now - self.base[1]) / max(1, step - self.base[0])
        self.mark = now
        reserve = (self.eval_s if self.evaluates else 0.0) + 1.5 * self.save_s  # last eval, checkpoint, model
        more = math.floor(max(0.0, self.clock.budget_s - now - reserve) / max(per_step, 1e-9))
        total = all_ranks_min(min(self.cap, step + more), args.device)
        if total != self.schedule.total:
            self.replans += 1
        self.schedule.total = max(total, step)
        state.max_steps = max(total, step)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        runtime = (metrics or {}).get("eval_runtime")
        self.eval_s = float(runtime) if runtime is not None else self.clock.elapsed() - self.mark
        self.mark = self.clock.elapsed()

    def on_log(self, args, state, control, **kwargs):
        self.mark = self.clock.elapsed()

    def on_save(self, args, state, control, **kwargs):
        self.save_s = max(0.0, self.clock.elapsed() - self.mark)
        self.mark = self.clock.elapsed()


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
        record = {
            "step": state.global_step,
            "epoch": state.epoch,
            "elapsed_s": round(self.clock.elapsed(), 3),
        }
        record.update({k: v for k, v in logs.items() if isinstance(v, int | float) and math.isfinite(v)})
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    @staticmethod
    def truncate(path: Path, last_step: int) -> None:
        """Drop records after ``last_step``: the steps a killed run logged after its last checkpoint."""
        if not path.is_file():
            return
        kept = [
            line
            for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= last_step
        ]
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
            self.bar = tqdm(
                total=state.max_steps,
                initial=state.global_step,
                desc="train",
                unit="step",
                dynamic_ncols=True,
            )

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.total = state.max_steps  # a time-budgeted run's plan moves as it trains
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
