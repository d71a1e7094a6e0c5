"""Training RETRO on a retrieval database with the HF ``Trainer``.

``train(db, model_config, out_dir, ...)`` is the one entry point; ``retlm train`` and ``retlm demo``
call it, and it runs unchanged under ``torchrun --nproc_per_node N`` or ``accelerate launch`` (DDP;
gloo on CPU). What HF ``Trainer`` provides is used as is: the learning-rate schedule, gradient clipping
and accumulation, mixed precision, evaluation every N steps, checkpoints and their resume (optimizer,
scheduler, RNG states and the data order). What this module adds:

- the loss: the model's own, on ``(seq, retrieved)`` batches from ``RETRODataset`` with HF's labels
  (``retlm.data.RetroCollator``);
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

import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments, set_seed
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import rotate_checkpoints

from retlm.data import (
    DocumentSplit,
    RetroCollator,
    RETRODataset,
    open_database,
    split_datasets,
    spread_subset,
)
from retlm.errors import OptionError
from retlm.models.folders import CHECKPOINT_PREFIX
from retlm.training import checkpoint as ckpt
from retlm.training import planning
from retlm.training.callbacks import (
    JsonlMetrics,
    PlannedSchedule,
    ProgressBar,
    RunClock,
    StepPlanner,
)
from retlm.training.config import build_config
from retlm.training.evaluation import score
from retlm.training.model_card import database_summary
from retlm.training.options import TrainOptions
from retlm.training.precision import resolve_device, resolve_precision
from retlm.training.resources import check_training_memory
from retlm.training.run_files import (
    TrainResult,
    barrier,
    fill_last_metrics,
    finish_without_training,
    quiet_saving,
    resume_point,
    save_final,
    start_run_files,
)
from retlm.utils import ensure_writable_dir, write_json

# ---- the Trainer ----


class RetroTrainer(Trainer):
    """HF ``Trainer`` on the model's own loss, with retrieval-aware evaluation and atomic checkpoints."""

    # compute_loss returns the mean over one micro-batch; Trainer divides by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        *args: Any,
        pad_id: int,
        eval_variants: Mapping[str, bool] | None = None,
        eos_id: int | None = None,
        schedule: PlannedSchedule | None = None,
        **kwargs: Any,
    ):
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
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer or self.optimizer, self.planned_schedule
            )
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The model's own loss on the collator's HF labels (mean over the micro-batch's targets)."""
        outputs = model(**inputs)
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def evaluate(
        self, eval_dataset: Dataset | None = None, ignore_keys: Any = None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        """Token-level loss and perplexity on the evaluation set, with retrieval (``eval_loss``) and,
        for a retrieval-trained model, without it (``eval_loss_no_retrieval``)."""
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        start = time.monotonic()
        metrics = {}
        for suffix, retrieval in self.eval_variants.items():
            result = score(
                self.model,
                dataset,
                pad_id=self.pad_id,
                retrieval=retrieval,
                batch_size=self.args.per_device_eval_batch_size,
                device=self.args.device,
                rank=self.args.process_index,
                world_size=self.args.world_size,
                eos_id=self.eos_id,
            )
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
        name = f"{CHECKPOINT_PREFIX}{self.state.global_step}"
        run_dir = Path(self.args.output_dir)
        self._staging = True
        try:
            with quiet_saving():
                super()._save_checkpoint(model, trial)
        finally:
            self._staging = False
        barrier()
        if self.args.should_save:
            staged = run_dir / ckpt.STAGING_DIR / name
            (staged / TRAINING_ARGS_NAME).unlink(missing_ok=True)  # a pickle nothing reads back
            ckpt.seal_model_dir(staged)
            ckpt.commit_dir(staged, run_dir / name)
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit)
        barrier()


# ---- what a run is made of ----


# ---- the entry point ----


@dataclass
class PreparedData:
    """What a run trains on, computed once from the database: the model (its config completed and
    checked), the document split and its datasets, and the database's ids and signature."""

    model: torch.nn.Module
    config_mapping: dict[str, Any]
    split: DocumentSplit
    train_set: Dataset
    heldout_set: Dataset
    seq_len: int
    signature: dict[str, Any]  # ckpt.database_signature of the database
    num_chunks: int
    database_path: str = ""
    tokenizer: Any = None
    database_summary: dict[str, Any] | None = None  # for the model card (model_card.database_summary)

    @property
    def pad_id(self) -> int:
        return int(self.signature["pad_id"])

    @property
    def eos_id(self) -> int | None:
        return self.signature["eos_id"]


def prepare(
    db: Any, model_config: Any, opts: TrainOptions, *, model: torch.nn.Module | None = None
) -> PreparedData:
    """Open ``db`` (a ``RetrievalDatabase`` or its path), complete and check the model config against it,
    split its documents and build the model (a fresh one from the config, seeded, unless ``model``)."""
    db = open_database(db)
    seq_len = int(opts.seq_len or db.seq_len)
    if seq_len % int(db.chunk_size):
        raise OptionError(
            f"seq_len {seq_len} must be a multiple of the database's chunk_size {db.chunk_size}"
        )
    signature = ckpt.database_signature(db)
    config, config_mapping = build_config(
        model.config if model is not None else model_config, db, seq_len, signature=signature
    )
    if model is None:  # the bound reads RetroConfig's fields; a given model (a retrofit) is already built
        check_training_memory(config, opts.batch_size, seq_len)
    split = DocumentSplit.make(db.doc_ids, opts.train_fraction, opts.seed)
    dataset = RETRODataset.from_database(db, seq_len=seq_len)
    train_set, heldout_set = split_datasets(dataset, db, split, hide_heldout=True)

    config.retlm_data = {
        **signature,
        "seq_len": seq_len,
        "retrieval": opts.retrieval,
        "split": split.to_json(),
    }
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
    return PreparedData(
        model=model,
        config_mapping=config_mapping,
        split=split,
        train_set=train_set,
        heldout_set=heldout_set,
        seq_len=seq_len,
        signature=signature,
        num_chunks=int(len(db.chunks)),
        database_path=str(getattr(db, "path", "")),
        tokenizer=tokenizer,
        database_summary=database_summary(db),
    )


def train(
    db: Any,
    model_config: Any,
    out_dir: str | os.PathLike[str],
    *,
    model: torch.nn.Module | None = None,
    **options: Any,
) -> TrainResult:
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
    training targets and are hidden from training sequences' neighbors. ``retrieval=False`` trains
    the same model without retrieved neighbors (the paper's no-retrieval baseline).

    ``resume="auto"`` continues from the newest checkpoint in ``out_dir`` on the same loss curve as an
    uninterrupted run; a run that already reached its steps or budget is returned as it is.

    This is :func:`prepare` (the database, the config, the datasets and the model) then
    :func:`train_prepared`.
    """
    opts = TrainOptions(**options)
    return train_prepared(prepare(db, model_config, opts, model=model), out_dir, opts)


def train_prepared(data: PreparedData, out_dir: str | os.PathLike[str], opts: TrainOptions) -> TrainResult:
    """Train ``data.model`` on ``data.train_set`` into ``out_dir`` (see :func:`train`)."""
    out_dir = Path(out_dir)
    ensure_writable_dir(out_dir, "run directory")
    device = resolve_device(None)
    precision = resolve_precision(opts.precision, device)
    eval_set = spread_subset(data.heldout_set, opts.eval_sequences) if len(data.heldout_set) else None
    args = _training_arguments(opts, out_dir, precision, device, has_eval=eval_set is not None)
    if len(data.train_set) < opts.batch_size * args.world_size:
        raise ValueError(
            f"only {len(data.train_set)} training sequences, fewer than one batch "
            f"({opts.batch_size} x {args.world_size} processes); lower batch_size or use a "
            "larger database"
        )
    fixed = {
        **opts.fixed(),
        "model_config": data.config_mapping,
        "database": data.signature,
        "seq_len": data.seq_len,
        "world_size": args.world_size,
        "num_chunks": data.num_chunks,
    }
    run_file = out_dir / ckpt.RUN_FILE
    previous = ckpt.read_json(run_file) if run_file.is_file() else None
    resume_from = resume_point(opts.resume, out_dir, previous, fixed)
    elapsed_before = RunClock.elapsed_in(resume_from) if resume_from else 0.0

    collate = RetroCollator(data.pad_id, retrieval=opts.retrieval, eos_id=data.eos_id)
    plan = planning.choose_max_steps(
        opts, args, previous, elapsed_before, data.model, data.train_set, eval_set, collate, device, precision
    )
    args.max_steps = plan.cap
    set_seed(opts.seed)
    if resume_from and planning.already_finished(opts, plan, previous, resume_from, elapsed_before):
        return finish_without_training(
            out_dir, resume_from, plan.steps, elapsed_before, is_main=args.should_save
        )
    if args.should_save:
        first_plan = (previous or {}).get("max_steps_first_plan", plan.steps) if resume_from else plan.steps
        start_run_files(
            out_dir,
            resume_from,
            {
                "version": 1,
                "status": "running",
                "fixed": fixed,
                "max_steps": plan.steps,
                "max_steps_first_plan": first_plan,
                "max_steps_cap": plan.cap,
                "max_steps_source": plan.source,
                "options": {**asdict(opts), "precision": precision},
                "database_path": data.database_path,
                "database_summary": data.database_summary,
                "split": data.split.to_json(),
                "train_sequences": len(data.train_set),
                "heldout_sequences": len(data.heldout_set),
            },
        )
    barrier()

    clock = RunClock(opts.budget_s, elapsed_before)
    trainer = _make_trainer(data, opts, args, plan, clock, eval_set, collate, out_dir)
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)

    stopped_by_budget = clock.stopped_by_budget or plan.source == "time_budget"
    result = TrainResult(
        run_dir=out_dir,
        model_dir=save_final(trainer, out_dir),
        global_step=trainer.state.global_step,
        max_steps=int(trainer.state.max_steps),
        stop_reason="time_budget" if stopped_by_budget else "max_steps",
        elapsed_s=clock.elapsed(),
        metrics_file=out_dir / ckpt.METRICS_FILE,
    )
    fill_last_metrics(result)
    if args.should_save:
        run = ckpt.read_json(run_file)
        run.update(
            status="finished",
            stop_reason=result.stop_reason,
            global_step=result.global_step,
            elapsed_s=result.elapsed_s,
            max_steps=result.max_steps,
        )
        write_json(run_file, run)
    barrier()
    return result


def _make_trainer(
    data: PreparedData,
    opts: TrainOptions,
    args: TrainingArguments,
    plan: planning.StepsPlan,
    clock: RunClock,
    eval_set: Dataset | None,
    collate: RetroCollator,
    out_dir: Path,
) -> RetroTrainer:
    """The ``RetroTrainer`` with retlm's callbacks (clock, metrics file, progress bar, step planner)."""
    callbacks: list[Any] = [clock, JsonlMetrics(out_dir / ckpt.METRICS_FILE, clock)]
    callbacks += [ProgressBar()] * opts.progress
    schedule = planner = None
    if plan.source == "time_budget":
        schedule = PlannedSchedule(opts.schedule, opts.warmup, plan.steps)
        planner = StepPlanner(
            clock,
            schedule,
            plan.cap,
            eval_s=plan.eval_s,
            save_s=plan.save_s,
            evaluates=args.eval_strategy != "no",
        )
    variants = {"": True, "_no_retrieval": False} if opts.retrieval else {"": False}
    tokenizer = data.tokenizer
    trainer = RetroTrainer(
        model=data.model,
        args=args,
        train_dataset=data.train_set,
        eval_dataset=eval_set,
        data_collator=collate,
        callbacks=callbacks,
        pad_id=data.pad_id,
        eval_variants=variants,
        eos_id=data.eos_id,
        schedule=schedule,
        processing_class=tokenizer if hasattr(tokenizer, "save_pretrained") else None,
    )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if planner is not None:  # before DefaultFlowCallback, which stops at state.max_steps
        trainer.callback_handler.callbacks.insert(0, planner)
    return trainer


def _training_arguments(
    opts: TrainOptions, out_dir: Path, precision: str, device: torch.device, has_eval: bool
) -> TrainingArguments:
    cpu = device.type == "cpu"
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1  # launched by torchrun / accelerate launch
    return TrainingArguments(
        output_dir=str(out_dir),
        max_steps=opts.max_steps or 1,
        per_device_train_batch_size=opts.batch_size,
        per_device_eval_batch_size=opts.batch_size,
        gradient_accumulation_steps=opts.grad_accum,
        learning_rate=opts.lr,
        warmup_steps=opts.warmup,
        weight_decay=opts.weight_decay,
        lr_scheduler_type="constant_with_warmup" if opts.schedule == "constant" else opts.schedule,
        max_grad_norm=opts.max_grad_norm or 0.0,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=cpu,
        ddp_backend="gloo" if cpu and distributed else None,
        ddp_find_unused_parameters=not opts.retrieval,  # the encoder and CCA sit idle without neighbors
        logging_strategy="steps",
        logging_steps=opts.log_every,
        eval_strategy="steps" if opts.eval_every and has_eval else "no",
        eval_steps=opts.eval_every,
        save_strategy="steps" if opts.save_every else "no",
        save_steps=opts.save_every or 1,
        save_total_limit=opts.save_total_limit,
        seed=opts.seed,
        data_seed=opts.seed,
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )
