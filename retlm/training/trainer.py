"""Training RETRO on a retrieval database with the HF ``Trainer``.

``train(db, model_config, out_dir, ...)`` is the one entry point; ``retlm train`` and ``retlm demo``
call it, and it runs unchanged under ``torchrun --nproc_per_node N`` or ``accelerate launch`` (DDP;
gloo on CPU). What HF ``Trainer`` provides is used as is: the learning-rate schedule, gradient clipping
and accumulation, mixed precision, evaluation every N steps, checkpoints and their resume (optimizer,
scheduler, RNG states and the data order). What this module adds:

- the loss: token-level cross-entropy on ``(seq, retrieved)`` batches from ``RETRODataset``;
- evaluation with and without retrieval on held-out documents (``evaluate.score``);
- checkpoints committed by one directory rename (HF writes them in place);
- a wall-clock budget (``minutes``) that plans the number of steps from a timing of the first steps,
  re-plans it (and the learning-rate schedule's length) from the steps actually measured, and stops
  cleanly (``callbacks.StepPlanner``);
- the LM tokenizer saved beside the weights in every checkpoint and in ``model/``, so that
  ``AutoTokenizer.from_pretrained(model_dir)`` and ``pipeline("text-generation", model_dir)`` work offline;
- ``retlm_run.json`` (what the run is) and ``metrics.jsonl`` (its loss curves) in the run directory.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from torch.utils.data import Dataset
from transformers import AutoModelForCausalLM, PretrainedConfig, Trainer, TrainingArguments, set_seed
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import rotate_checkpoints
from transformers.utils import logging as hf_logging

from retlm.data import RETRODataset
from retlm.errors import OptionError, did_you_mean
from retlm.models.retro import RetroConfig
from retlm.models.retro.configuration_retro import check_config_keys
from retlm.training import checkpoint as ckpt
from retlm.training.callbacks import (
    JsonlMetrics,
    PlannedSchedule,
    ProgressBar,
    RunClock,
    StepPlanner,
    read_metrics,
)
from retlm.training.data import DocumentSplit, RetroCollator, open_database, split_datasets, spread_subset
from retlm.training.evaluate import causal_lm_loss, score
from retlm.training.precision import autocast_for, resolve_device, resolve_precision
from retlm.training.resources import check_training_memory
from retlm.utils import ensure_writable_dir

SCHEDULES = ("cosine", "linear", "constant")
RESUME_MODES = ("auto", "never")
CONFIG_DIR = "configs"


# ---- the Trainer ----

class RetroTrainer(Trainer):
    """HF ``Trainer`` with a token-level LM loss, retrieval-aware evaluation and atomic checkpoints."""

    # compute_loss returns the mean over one micro-batch; Trainer divides by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, *args: Any, pad_id: int, eval_variants: Mapping[str, bool] | None = None,
                 eos_id: int | None = None, schedule: PlannedSchedule | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.pad_id, self.eos_id = pad_id, eos_id
        # metric-name suffix -> whether that evaluation pass retrieves
        self.eval_variants = dict(eval_variants or {"": True, "_no_retrieval": False})
        self.planned_schedule = schedule
        self._staging = False

    def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
        """HF's scheduler, or, for a run the ``StepPlanner`` re-plans, one whose length follows the plan."""
        if self.planned_schedule is None:
            return super().create_scheduler(num_training_steps, optimizer)
        if self.lr_scheduler is None:
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer,
                                                                  self.planned_schedule)
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        loss = causal_lm_loss(outputs.logits, labels)
        return (loss, outputs) if return_outputs else loss

    def evaluate(self, eval_dataset: Dataset | None = None, ignore_keys: Any = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        """Token-level loss and perplexity on the evaluation set, with retrieval (``eval_loss``) and,
        for a retrieval-trained model, without it (``eval_loss_no_retrieval``)."""
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        start = time.monotonic()
        metrics = {}
        for suffix, retrieval in self.eval_variants.items():
            result = score(self.model, dataset, pad_id=self.pad_id, retrieval=retrieval,
                           batch_size=self.args.per_device_eval_batch_size, device=self.args.device,
                           rank=self.args.process_index, world_size=self.args.world_size, eos_id=self.eos_id)
            metrics[f"{metric_key_prefix}_loss{suffix}"] = result.loss
            metrics[f"{metric_key_prefix}_perplexity{suffix}"] = result.perplexity
        metrics[f"{metric_key_prefix}_runtime"] = round(time.monotonic() - start, 4)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    # HF writes checkpoint-N in place; a kill mid-write would leave a half checkpoint that resume picks.
    # Instead every rank writes under <run>/.staging/, then the main process renames the whole folder.
    def _get_output_dir(self, trial: Any) -> str:
        if self._staging:
            return os.path.join(self.args.output_dir, ckpt.STAGING_DIR)
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        name = f"{ckpt.CHECKPOINT_PREFIX}{self.state.global_step}"
        run_dir = Path(self.args.output_dir)
        self._staging = True
        try:
            with quiet_saving():
                super()._save_checkpoint(model, trial)
        finally:
            self._staging = False
        _barrier()
        if self.args.should_save:
            staged = run_dir / ckpt.STAGING_DIR / name
            (staged / TRAINING_ARGS_NAME).unlink(missing_ok=True)  # a pickle nothing reads back
            ckpt.seal_model_dir(staged)
            ckpt.commit_dir(staged, run_dir / name)
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit)
        _barrier()


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


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ---- what a run is made of ----

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


def builtin_configs() -> dict[str, Path]:
    """Model configs shipped with retlm, by name (``retro-tiny``, ``retro-seed``, ...)."""
    folder = resources.files("retlm.training") / CONFIG_DIR
    return {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if str(p).endswith((".yaml", ".yml"))}


def read_model_config(model_config: str | os.PathLike[str] | Mapping[str, Any]) -> dict[str, Any]:
    """A model config mapping from a yaml path, a built-in config name or a mapping."""
    if isinstance(model_config, Mapping):
        check_config_keys(dict(model_config), "model config")
        return dict(model_config)
    path = Path(model_config)
    if not path.exists():
        named = builtin_configs()
        if str(model_config) not in named:
            raise FileNotFoundError(f"no model config {str(model_config)!r}: not a file, nor one of the "
                                    f"built-in configs ({', '.join(sorted(named))})"
                                    f"{did_you_mean(str(model_config), named)}")
        path = named[str(model_config)]
    try:
        mapping = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, IsADirectoryError) as err:
        reason = " ".join(str(err).split())
        raise OptionError(f"model config {path} is not a valid yaml file: {reason}") from None
    if not isinstance(mapping, dict):
        raise OptionError(f"model config {path} must be a yaml mapping of RetroConfig arguments")
    check_config_keys(mapping, f"model config {path}")
    return mapping


def build_config(model_config: Any, db: Any, seq_len: int) -> tuple[PretrainedConfig, dict[str, Any]]:
    """The model config, completed from the database (vocabulary, chunk size) and checked against it."""
    if isinstance(model_config, PretrainedConfig):
        config = copy.deepcopy(model_config)
        mapping = {k: v for k, v in config.to_diff_dict().items() if k not in ("transformers_version",)}
    else:
        mapping = read_model_config(model_config)
        signature = ckpt.database_signature(db)
        mapping.setdefault("num_tokens", signature["vocab_size"])
        mapping.setdefault("chunk_size", signature["chunk_size"])
        mapping.setdefault("pad_id", signature["pad_id"])
        mapping.setdefault("max_seq_len", seq_len)
        try:
            config = RetroConfig(**mapping)
        except (TypeError, ValueError) as err:
            raise OptionError(f"bad model config: {err}") from None
    mapping.pop("retlm_data", None)
    ckpt.check_model_fits_database(config, db)
    if seq_len > int(config.max_seq_len):
        raise OptionError(f"seq_len {seq_len} is longer than the model's max_seq_len {config.max_seq_len}")
    return config, mapping


@dataclass
class TrainOptions:
    """Everything ``train`` can be told besides the database, model config and output directory."""

    max_steps: int | None = None  # optimizer steps
    minutes: float | None = None  # wall-clock training budget, across resumes
    lr: float = 1e-3
    schedule: str = "cosine"  # cosine | linear | constant (after warmup)
    warmup: float = 0.05  # steps, or a fraction of max_steps when below 1
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0  # None: no clipping
    batch_size: int = 8  # sequences per process per micro-batch
    weight_decay: float = 0.01
    eval_every: int | None = None  # steps between held-out evaluations; None: none during training
    eval_sequences: int | None = 64  # held-out sequences used by those evaluations; None: all
    save_every: int | None = 100  # steps between checkpoints; the run's end is always saved
    save_total_limit: int | None = 2
    log_every: int = 1
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    seed: int = 0
    train_fraction: float = 0.9  # of the documents; the rest are held out
    retrieval: bool = True  # False: the no-retrieval baseline (same model, no neighbours)
    seq_len: int | None = None  # default: the database's
    resume: str = "auto"  # auto | never | a checkpoint directory
    progress: bool = True

    def __post_init__(self) -> None:
        def positive(name: str, optional: bool = False) -> None:
            value = getattr(self, name)
            if (value is not None or not optional) and not (value is not None and value > 0):
                raise ValueError(f"{name} must be positive, got {value}")

        for name in ("lr", "warmup", "weight_decay", "max_grad_norm", "minutes", "train_fraction"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not math.isfinite(value)):
                raise OptionError(f"{name} must be a finite number, got {value}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise OptionError(f"seed must be an integer in 0..2**32-1, got {self.seed!r}")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise OptionError(f"save_total_limit must be >= 1 (checkpoints kept), "
                              f"got {self.save_total_limit}")
        for name in ("batch_size", "grad_accum", "log_every", "lr"):
            positive(name)
        for name in ("max_steps", "eval_every", "save_every", "eval_sequences", "max_grad_norm", "seq_len"):
            positive(name, optional=True)
        if self.minutes is not None and not self.minutes > 0:
            raise ValueError(f"minutes (the time budget) must be positive, got {self.minutes}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0 (steps, or a fraction of the run when below 1), "
                             f"got {self.warmup}")
        if not 0.0 < self.train_fraction <= 1.0:
            raise ValueError(f"train_fraction must be in (0, 1], got {self.train_fraction}")
        if self.resume not in RESUME_MODES and not Path(str(self.resume)).is_dir():
            raise ValueError(f"resume must be 'auto', 'never' or a checkpoint directory, got {self.resume!r}")

    @property
    def budget_s(self) -> float | None:
        return None if self.minutes is None else 60.0 * self.minutes

    def fixed(self) -> dict[str, Any]:
        """The options a resumed run must keep: they decide the data order and the model."""
        names = ("batch_size", "grad_accum", "train_fraction", "seed", "retrieval")
        return {name: getattr(self, name) for name in names}


def _time_steps(model: torch.nn.Module, dataset: Dataset, collate: RetroCollator, *, batch_size: int,
                grad_accum: int, lr: float, device: torch.device, autocast: Any, repeats: int = 3
                ) -> tuple[float, float]:
    """Seconds per optimizer step and per forward pass, measured on a throwaway copy of the model."""
    probe = copy.deepcopy(model).to(device).train()
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr)
    n = len(dataset)
    batches = [collate([dataset[(i * batch_size + j) % n] for j in range(batch_size)])
               for i in range(grad_accum)]
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]

    def step() -> None:
        for batch in batches:
            inputs = dict(batch)
            labels = inputs.pop("labels")
            with autocast or torch.autocast(device.type, enabled=False):
                loss = causal_lm_loss(probe(**inputs).logits, labels) / grad_accum
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
            inputs = dict(batches[0])
            inputs.pop("labels")
            probe.eval()(**inputs)
        per_forward = time.perf_counter() - start
    return per_step, per_forward


def _max_steps_for_budget(budget_s: float, per_step: float, per_forward: float, *, eval_batches: int,
                          eval_every: int | None, save_every: int | None) -> int:
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


# ---- the entry point ----

def train(db: Any, model_config: Any, out_dir: str | os.PathLike[str], *,
          model: torch.nn.Module | None = None, **options: Any) -> TrainResult:
    """Train a RETRO model on ``db`` (a ``RetrievalDatabase`` or its path) into ``out_dir``.

    ``model_config``: a yaml path, a built-in name (``retro-tiny``, ``retro-seed``), a mapping of
    ``RetroConfig`` arguments, or a config object. ``num_tokens``, ``chunk_size`` and ``pad_id``
    default to the database's. ``options`` are the fields of ``TrainOptions``.

    ``model``: an already built model to train instead of a fresh one from ``model_config`` (which is then
    ``model.config``); only its parameters that require gradients train. RETRO-fitting
    (``retlm.training.retrofit``) passes its frozen base + adapter this way.

    Length: ``max_steps`` optimizer steps, or ``minutes`` of wall-clock training (the number of steps
    is then chosen from a timing of the first steps so that the schedule ends on time, and the clock
    stops the run cleanly in any case), or both (whichever ends first). With neither: one epoch.

    Data: documents are split ``train_fraction`` / rest with ``seed``; held-out documents are never
    training targets and are hidden from training sequences' neighbours. ``retrieval=False`` trains
    the same model without retrieved neighbours (the paper's no-retrieval baseline).

    ``resume="auto"`` continues from the newest checkpoint in ``out_dir`` on the same loss curve as an
    uninterrupted run; a run that already reached its steps or budget is returned as it is.
    """
    opts = TrainOptions(**options)
    out_dir = Path(out_dir)
    db = open_database(db)
    device = resolve_device(None)
    precision = resolve_precision(opts.precision, device)
    seq_len = int(opts.seq_len or db.seq_len)
    if seq_len % int(db.chunk_size):
        raise OptionError(f"seq_len {seq_len} must be a multiple of the database's chunk_size "
                          f"{db.chunk_size}")
    if model is not None:
        model_config = model.config
    config, config_mapping = build_config(model_config, db, seq_len)
    if model is None:  # the bound reads RetroConfig's fields; a given model (a retrofit) is already built
        check_training_memory(config, opts.batch_size, seq_len)
    ensure_writable_dir(out_dir, "run directory")

    split = DocumentSplit.make(db.doc_ids, opts.train_fraction, opts.seed)
    train_set, heldout_set = _split_data(db, seq_len, split)
    eval_set = spread_subset(heldout_set, opts.eval_sequences) if len(heldout_set) else None
    args = _training_arguments(opts, out_dir, precision, device, has_eval=eval_set is not None)
    if len(train_set) < opts.batch_size * args.world_size:
        raise ValueError(f"only {len(train_set)} training sequences, fewer than one batch ({opts.batch_size} "
                         f"x {args.world_size} processes); lower batch_size or use a larger database")

    fixed = {**opts.fixed(), "model_config": config_mapping, "database": ckpt.database_signature(db),
             "seq_len": seq_len, "world_size": args.world_size, "num_chunks": int(len(db.chunks))}
    run_file = out_dir / ckpt.RUN_FILE
    previous = ckpt.read_json(run_file) if run_file.is_file() else None
    resume_from = _resume_point(opts.resume, out_dir, previous, fixed)
    elapsed_before = RunClock.elapsed_in(resume_from) if resume_from else 0.0

    config.retlm_data = {**ckpt.database_signature(db), "seq_len": seq_len, "retrieval": opts.retrieval,
                         "split": split.to_json()}
    tokenizer = getattr(db, "tokenizer", None)
    for name in ("eos_token_id", "bos_token_id"):  # as HF Trainer would align them to the tokenizer
        if getattr(tokenizer, name, None) is not None:
            setattr(config, name, int(getattr(tokenizer, name)))
    set_seed(opts.seed)
    if model is None:
        model = AutoModelForCausalLM.from_config(config)
    else:
        model.config.retlm_data = config.retlm_data
        for name in ("eos_token_id", "bos_token_id"):
            setattr(model.config, name, getattr(config, name, None))
    eos_id = None if getattr(db, "eos_id", None) is None else int(db.eos_id)
    collate = RetroCollator(int(db.pad_id), retrieval=opts.retrieval, eos_id=eos_id)
    plan = _choose_max_steps(opts, args, previous, elapsed_before, model, train_set, eval_set, collate,
                             device, precision)
    args.max_steps = plan.cap
    set_seed(opts.seed)

    if resume_from and _already_finished(opts, plan, previous, resume_from, elapsed_before):
        return _finish_without_training(out_dir, resume_from, plan.steps, elapsed_before,
                                        is_main=args.should_save)

    if args.should_save:
        _start_run_files(out_dir, resume_from, {
            "version": 1, "status": "running", "fixed": fixed, "max_steps": plan.steps,
            "max_steps_first_plan": (previous or {}).get("max_steps_first_plan", plan.steps) if resume_from
            else plan.steps, "max_steps_cap": plan.cap, "max_steps_source": plan.source,
            "options": {**asdict(opts), "precision": precision},
            "database_path": str(getattr(db, "path", "")), "split": split.to_json(),
            "train_sequences": len(train_set), "heldout_sequences": len(heldout_set)})
    _barrier()

    clock = RunClock(opts.budget_s, elapsed_before)
    callbacks: list[Any] = [clock, JsonlMetrics(out_dir / ckpt.METRICS_FILE, clock)]
    callbacks += [ProgressBar()] * opts.progress
    schedule = planner = None
    if plan.source == "time_budget":
        schedule = PlannedSchedule(opts.schedule, opts.warmup, plan.steps)
        planner = StepPlanner(clock, schedule, plan.cap, eval_s=plan.eval_s, save_s=plan.save_s,
                              evaluates=args.eval_strategy != "no")
    variants = {"": True, "_no_retrieval": False} if opts.retrieval else {"": False}
    trainer = RetroTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                           data_collator=collate, callbacks=callbacks, pad_id=int(db.pad_id),
                           eval_variants=variants, eos_id=eos_id, schedule=schedule,
                           processing_class=tokenizer if hasattr(tokenizer, "save_pretrained") else None)
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if planner is not None:  # before DefaultFlowCallback, which stops at state.max_steps
        trainer.callback_handler.callbacks.insert(0, planner)
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)

    stopped_by_budget = clock.stopped_by_budget or plan.source == "time_budget"
    result = TrainResult(run_dir=out_dir, model_dir=_save_final(trainer, out_dir),
                         global_step=trainer.state.global_step, max_steps=int(trainer.state.max_steps),
                         stop_reason="time_budget" if stopped_by_budget else "max_steps",
                         elapsed_s=clock.elapsed(), metrics_file=out_dir / ckpt.METRICS_FILE)
    _fill_last_metrics(result)
    if args.should_save:
        run = ckpt.read_json(run_file)
        run.update(status="finished", stop_reason=result.stop_reason, global_step=result.global_step,
                   elapsed_s=result.elapsed_s, max_steps=result.max_steps)
        ckpt.write_json(run_file, run)
    _barrier()
    return result


def _split_data(db: Any, seq_len: int, split: DocumentSplit) -> tuple[Dataset, Dataset]:
    dataset = RETRODataset.from_database(db, seq_len=seq_len)
    return split_datasets(dataset, db, split, hide_heldout=True)


def _training_arguments(opts: TrainOptions, out_dir: Path, precision: str, device: torch.device,
                        has_eval: bool) -> TrainingArguments:
    cpu = device.type == "cpu"
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1  # launched by torchrun / accelerate launch
    return TrainingArguments(
        output_dir=str(out_dir), max_steps=opts.max_steps or 1, per_device_train_batch_size=opts.batch_size,
        per_device_eval_batch_size=opts.batch_size, gradient_accumulation_steps=opts.grad_accum,
        learning_rate=opts.lr, warmup_steps=opts.warmup, weight_decay=opts.weight_decay,
        lr_scheduler_type="constant_with_warmup" if opts.schedule == "constant" else opts.schedule,
        max_grad_norm=opts.max_grad_norm or 0.0, bf16=precision == "bf16", fp16=precision == "fp16",
        use_cpu=cpu, ddp_backend="gloo" if cpu and distributed else None,
        ddp_find_unused_parameters=not opts.retrieval,  # the encoder and CCA sit idle without neighbours
        logging_strategy="steps", logging_steps=opts.log_every,
        eval_strategy="steps" if opts.eval_every and has_eval else "no", eval_steps=opts.eval_every,
        save_strategy="steps" if opts.save_every else "no", save_steps=opts.save_every or 1,
        save_total_limit=opts.save_total_limit, seed=opts.seed, data_seed=opts.seed, report_to="none",
        disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0,
    )


def _start_run_files(out_dir: Path, resume_from: Path | None, run: dict[str, Any]) -> None:
    """Write ``retlm_run.json``; start ``metrics.jsonl`` afresh, or cut it back to the resumed step."""
    metrics = out_dir / ckpt.METRICS_FILE
    if resume_from is None:
        metrics.unlink(missing_ok=True)
    else:
        JsonlMetrics.truncate(metrics, ckpt.checkpoint_step(resume_from))
    shutil.rmtree(out_dir / ckpt.STAGING_DIR, ignore_errors=True)
    ckpt.write_json(out_dir / ckpt.RUN_FILE, run)


def _resume_point(resume: str, out_dir: Path, previous: dict | None, fixed: dict) -> Path | None:
    """The checkpoint to continue from, after checking that the run's fixed settings are unchanged."""
    if resume == "never":
        if previous is not None or ckpt.latest_checkpoint(out_dir) is not None:
            raise FileExistsError(f"{out_dir} already holds a training run; continue it with resume='auto' "
                                  "(`--resume auto`) or choose another output directory")
        return None
    checkpoint = ckpt.latest_checkpoint(out_dir) if resume == "auto" else Path(resume)
    if checkpoint is None:
        return None
    if not (checkpoint / "trainer_state.json").is_file():
        raise ValueError(f"{checkpoint} is not a training checkpoint (no trainer_state.json)")
    ckpt.verify_model_dir(checkpoint)  # weights, optimizer and RNG state as they were saved
    if previous is not None:
        changed = [key for key in fixed if previous["fixed"].get(key) != _jsonable(fixed[key])]
        if changed:
            details = "; ".join(f"{key}: was {previous['fixed'].get(key)!r}, now {_jsonable(fixed[key])!r}"
                                for key in changed)
            raise ValueError(f"cannot resume the run in {out_dir}: settings changed ({details}). "
                             "Use the run's settings, or a new output directory")
    return checkpoint


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


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


def _choose_max_steps(opts: TrainOptions, args: TrainingArguments, previous: dict | None,
                      elapsed_before: float, model: torch.nn.Module, train_set: Dataset,
                      eval_set: Dataset | None, collate: RetroCollator, device: torch.device,
                      precision: str) -> StepsPlan:
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
    per_step, per_forward = _time_steps(model, train_set, collate, batch_size=opts.batch_size,
                                        grad_accum=opts.grad_accum, lr=opts.lr, device=device,
                                        autocast=autocast_for(precision, device))
    per_step, per_forward = _sync_max(per_step, args.device), _sync_max(per_forward, args.device)
    eval_batches = 0 if eval_set is None else math.ceil(len(eval_set) / args.world_size / opts.batch_size)
    steps = _max_steps_for_budget(opts.budget_s, per_step, per_forward, eval_batches=eval_batches,
                                  eval_every=opts.eval_every, save_every=opts.save_every)
    # the planner reserves the final evaluation (estimated from the probe until one is measured) and the
    # final checkpoint (once one is measured: a save's cost is not what a training step's is)
    eval_s = eval_batches * 2 * per_forward if opts.eval_every else 0.0
    return StepsPlan(steps, "time_budget", max(PLAN_CAP_FACTOR * steps, steps + 16), eval_s=eval_s)


def _already_finished(opts: TrainOptions, plan: StepsPlan, previous: dict | None, checkpoint: Path,
                      elapsed_before: float) -> bool:
    """Whether the run being resumed has nothing left to do: its budget is spent, its fixed steps are
    done, or its planned steps are done under the same budget (a longer budget continues it)."""
    if opts.budget_s is not None and elapsed_before >= opts.budget_s:
        return True
    step = ckpt.checkpoint_step(checkpoint)
    if plan.source != "time_budget":
        return step >= plan.steps
    same_budget = previous is not None and previous.get("options", {}).get("minutes") == opts.minutes
    return same_budget and step >= ckpt.checkpoint_max_steps(checkpoint)


def _save_final(trainer: RetroTrainer, out_dir: Path) -> Path:
    """The final weights as ``<run>/model`` (safetensors + config), committed by rename."""
    final = out_dir / ckpt.FINAL_DIR
    staging = out_dir / ckpt.STAGING_DIR / ckpt.FINAL_DIR
    with quiet_saving():
        trainer.save_model(str(staging))
    _barrier()
    if trainer.args.should_save:
        (staging / TRAINING_ARGS_NAME).unlink(missing_ok=True)
        ckpt.write_json(staging / ckpt.FINAL_STEP_FILE, {"global_step": trainer.state.global_step})
        ckpt.seal_model_dir(staging)
        ckpt.commit_dir(staging, final)
        shutil.rmtree(out_dir / ckpt.STAGING_DIR, ignore_errors=True)
    _barrier()
    return final


def _finish_without_training(out_dir: Path, checkpoint: Path, steps: int, elapsed: float,
                             is_main: bool) -> TrainResult:
    """The run already reached its step count or time budget: make sure ``model/`` holds its last
    checkpoint (a kill can fall between the two) and that the run file says it finished."""
    final, step = out_dir / ckpt.FINAL_DIR, ckpt.checkpoint_step(checkpoint)
    if is_main and ckpt.final_model_step(out_dir) != step:
        ckpt.verify_model_dir(checkpoint)
        staging = out_dir / ckpt.STAGING_DIR / ckpt.FINAL_DIR
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for name in ckpt.MODEL_FILES:
            if (checkpoint / name).is_file():
                shutil.copy2(checkpoint / name, staging / name)
        ckpt.write_json(staging / ckpt.FINAL_STEP_FILE, {"global_step": step})
        ckpt.seal_model_dir(staging)
        ckpt.commit_dir(staging, final)
    if is_main and (out_dir / ckpt.RUN_FILE).is_file():
        run = ckpt.read_json(out_dir / ckpt.RUN_FILE)
        if run.get("status") != "finished":
            run.update(status="finished", stop_reason="resumed_after_end", global_step=step,
                       elapsed_s=elapsed)
            ckpt.write_json(out_dir / ckpt.RUN_FILE, run)
    _barrier()
    result = TrainResult(run_dir=out_dir, model_dir=final, global_step=step, max_steps=steps,
                         stop_reason="already_finished", elapsed_s=elapsed,
                         metrics_file=out_dir / ckpt.METRICS_FILE)
    _fill_last_metrics(result)
    return result


def _fill_last_metrics(result: TrainResult) -> None:
    if not result.metrics_file.is_file():
        return
    for record in read_metrics(result.metrics_file):
        if "loss" in record:
            result.last_train_loss = record["loss"]
        if "eval_loss" in record:
            result.last_eval = {k: v for k, v in record.items() if k.startswith("eval_")}
