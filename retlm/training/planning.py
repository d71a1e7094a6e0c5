"""How long a run is: a fixed number of steps, one epoch, or as many as fit a wall-clock budget, planned
from a timing of the first steps (``callbacks.StepPlanner`` re-plans from the steps actually measured).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset
from transformers import TrainingArguments

from retlm.data import RetroCollator
from retlm.training import checkpoint as ckpt
from retlm.training.options import TrainOptions
from retlm.training.precision import autocast_for


def _time_steps(
    model: torch.nn.Module,
    dataset: Dataset,
    collate: RetroCollator,
    *,
    batch_size: int,
    grad_accum: int,
    lr: float,
    device: torch.device,
    autocast: Any,
    repeats: int = 3,
) -> tuple[float, float]:
    """Seconds per optimizer step and per forward pass, measured on a throwaway copy of the model."""
    probe = copy.deepcopy(model).to(device).train()
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr)
    n = len(dataset)
    batches = [
        collate([dataset[(i * batch_size + j) % n] for j in range(batch_size)]) for i in range(grad_accum)
    ]
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]

    def step() -> None:
        for batch in batches:
            with autocast or torch.autocast(device.type, enabled=False):
                loss = probe(**batch).loss / grad_accum  # the model's loss, as RetroTrainer trains on
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with torch.random.fork_rng(devices=[]):
        step()  # warm-up: allocations, first-call overheads
        start = time.perf_counter()
        for _ in range(repeats):
            step()
        per_step = (time.perf_counter() - start) / repeats
        start = time.perf_counter()
        with torch.no_grad():
            inputs = {k: v for k, v in batches[0].items() if k not in ("labels", "shift_labels")}
            probe.eval()(**inputs)
        per_forward = time.perf_counter() - start
    return per_step, per_forward


def _max_steps_for_budget(
    budget_s: float,
    per_step: float,
    per_forward: float,
    *,
    eval_batches: int,
    eval_every: int | None,
    save_every: int | None,
) -> int:
    """Steps that fit the budget, counting evaluation passes (2 per eval: with and without retrieval)."""
    eval_cost = 0.0 if not eval_every else eval_batches * 2 * per_forward / eval_every
    save_cost = 0.0 if not save_every else 2 * per_step / save_every  # a checkpoint ~ a couple of steps
    return max(1, int(0.95 * budget_s / (per_step + eval_cost + save_cost)))


def _sync_max(value: float, device: torch.device) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


@dataclass
class StepsPlan:
    """How long a run is: ``steps`` (planned), ``source`` ("max_steps" | "time_budget" | "one_epoch"), and
    for a time budget the ``cap`` the Trainer is built with (the planner may move ``steps`` up to it) and
    the estimated seconds of one evaluation and one checkpoint."""

    steps: int
    source: str
    cap: int
    eval_s: float = 0.0
    save_s: float = 0.0


PLAN_CAP_FACTOR = 16  # a time-budgeted run may end up with up to 16x the steps its first timing planned


def choose_max_steps(
    opts: TrainOptions,
    args: TrainingArguments,
    previous: dict | None,
    elapsed_before: float,
    model: torch.nn.Module,
    train_set: Dataset,
    eval_set: Dataset | None,
    collate: RetroCollator,
    device: torch.device,
    precision: str,
) -> StepsPlan:
    """The run's length in optimizer steps, and where it came from."""
    if opts.max_steps is not None:
        return StepsPlan(opts.max_steps, "max_steps", opts.max_steps)
    if previous and previous.get("max_steps_source") == "time_budget" and elapsed_before > 0:
        steps = int(previous["max_steps"])  # keep the interrupted run's plan; the scheduler holds its length
        return StepsPlan(steps, "time_budget", int(previous.get("max_steps_cap", steps)))
    if opts.budget_s is None:
        per_epoch = math.ceil(len(train_set) / (opts.batch_size * args.world_size))
        steps = max(1, math.ceil(per_epoch / opts.grad_accum))
        return StepsPlan(steps, "one_epoch", steps)
    per_step, per_forward = _time_steps(
        model,
        train_set,
        collate,
        batch_size=opts.batch_size,
        grad_accum=opts.grad_accum,
        lr=opts.lr,
        device=device,
        autocast=autocast_for(precision, device),
    )
    per_step, per_forward = _sync_max(per_step, args.device), _sync_max(per_forward, args.device)
    eval_batches = 0 if eval_set is None else math.ceil(len(eval_set) / args.world_size / opts.batch_size)
    steps = _max_steps_for_budget(
        opts.budget_s,
        per_step,
        per_forward,
        eval_batches=eval_batches,
        eval_every=opts.eval_every,
        save_every=opts.save_every,
    )
    # the planner reserves the final evaluation (estimated from the probe until one is measured) and the
    # final checkpoint (once one is measured: a save's cost is not what a training step's is)
    eval_s = eval_batches * 2 * per_forward if opts.eval_every else 0.0
    return StepsPlan(steps, "time_budget", max(PLAN_CAP_FACTOR * steps, steps + 16), eval_s=eval_s)


def already_finished(
    opts: TrainOptions, plan: StepsPlan, previous: dict | None, checkpoint: Path, elapsed_before: float
) -> bool:
    """Whether the run being resumed has nothing left to do: its budget is spent, its fixed steps are
    done, or its planned steps are done under the same budget (a longer budget continues it)."""
    if opts.budget_s is not None and elapsed_before >= opts.budget_s:
        return True
    step = ckpt.checkpoint_step(checkpoint)
    if plan.source != "time_budget":
        return step >= plan.steps
    same_budget = previous is not None and previous.get("options", {}).get("minutes") == opts.minutes
    return same_budget and step >= ckpt.checkpoint_max_steps(checkpoint)
