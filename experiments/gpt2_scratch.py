"""RETRO-fitting a GPT-2 trained here from scratch: a small ``GPT2LMHeadModel`` (transformers' class,
random init) is trained, without retrieval, on the training documents of a GPT-2 BPE retrieval database,
then RETRO-fitted (``retlm retrofit``) and scored by overlap bucket at several retrofitting lengths,
exactly as ``retrofit.py`` does for the control of ``retrieval_helps.py``.

The base trains with retlm's own trainer (its dataset, collator, AdamW with a cosine schedule, wall-clock
budget ``--minutes``, safetensors checkpoints). Its ``config.json`` records the document split, so the
retrofit keeps it (retlm refuses another) and the held-out documents are never a training target of
either; this is checked here on the sequences each run trains on. ``WORK/gpt2`` is a retlm run
directory: ``retlm retrofit --base WORK/gpt2`` (or ``WORK/gpt2/model``, a plain HF folder) takes it.

Each retrofitting checkpoint (``--steps``) is scored on the held-out documents with its real neighbors,
with another held-out sequence's neighbors, and with retrieval off, which must give the base's losses
exactly (checked), in bits per byte by overlap bucket with paired bootstrap 95% intervals, and the gain's
trend with steps is extrapolated to the run that would resolve it (``retrofit.trend``).

    cd experiments && python gpt2_scratch.py --db DB --work-dir /tmp/gpt2rf --minutes 10 --steps 15,45,135
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from retrieval_helps import database_sequences
from retrofit import Buckets, add_retrofit_options, check_checkpoints, eos_of, parse_steps, retrofit_and_score

from retlm.data import sequence_doc_ids
from retlm.retrieval import RetrievalDatabase
from retlm.training import load_model
from retlm.training.checkpoint import database_signature
from retlm.training.evaluation import select_split
from retlm.training.leakage import token_nll
from retlm.training.options import TrainOptions
from retlm.training.trainer import prepare, train_prepared


def vocab_size_of(db: Any) -> int:
    return int(database_signature(db)["vocab_size"])


def gpt2_model(db: Any, layers: int, width: int, heads: int, seq_len: int, seed: int) -> Any:
    """A randomly initialised ``GPT2LMHeadModel`` for ``db``'s tokenizer, with no dropout (a short run)."""
    from transformers import GPT2Config, GPT2LMHeadModel, set_seed

    config = GPT2Config(
        vocab_size=vocab_size_of(db),
        n_positions=seq_len,
        n_embd=width,
        n_layer=layers,
        n_head=heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=eos_of(db),
        eos_token_id=eos_of(db),
    )
    # retlm's trainer checks these two against the database (a RetroConfig's fields); for a model that
    # never retrieves they only say which chunking and length it was trained with
    config.chunk_size = int(db.chunk_size)
    config.max_seq_len = seq_len
    set_seed(seed)
    return GPT2LMHeadModel(config)


def documents_of(dataset: Any, db: Any) -> np.ndarray:
    """The sorted distinct document ids of a split's sequences."""
    return np.unique(sequence_doc_ids(db)[np.asarray(dataset.indices)])


def train_base(db: Any, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Train (or reuse, if finished) the GPT-2 base in ``out``; what it trained on and for how long."""
    seq_len = int(db.seq_len)
    model = gpt2_model(db, args.layers, args.width, args.heads, seq_len, args.seed)
    opts = TrainOptions(
        minutes=args.minutes,
        max_steps=args.base_steps,
        lr=args.base_lr,
        batch_size=args.base_batch_size,
        seed=args.seed,
        train_fraction=args.train_fraction,
        retrieval=False,
        eval_every=None,
        save_every=None,
        progress=not args.quiet,
    )
    data = prepare(db, model.config, opts, model=model)
    trained_docs, heldout_docs = documents_of(data.train_set, db), data.split.heldout_docs
    assert not np.isin(trained_docs, heldout_docs).any(), "a held-out document is a training sequence"
    start = time.perf_counter()
    result = train_prepared(data, out, opts)
    run = json.loads((out / "retlm_run.json").read_text())
    steps = int(result.global_step)
    return {
        "model": {
            "class": "GPT2LMHeadModel",
            "n_layer": args.layers,
            "n_embd": args.width,
            "n_head": args.heads,
            "n_positions": seq_len,
            "vocab_size": vocab_size_of(db),
            "parameters": sum(p.numel() for p in data.model.parameters()),
        },
        "steps": steps,
        "batch_size": args.base_batch_size,
        "seq_len": seq_len,
        "tokens": steps * args.base_batch_size * seq_len,
        "training_minutes": round(float(run["elapsed_s"]) / 60, 2),
        "wall_minutes_this_call": round((time.perf_counter() - start) / 60, 2),
        "stop_reason": run["stop_reason"],  # the run's own (a rerun reuses it: "already_finished")
        "lr": args.base_lr,
        "last_train_loss": result.last_train_loss,
        "train_sequences": run["train_sequences"],
        "train_documents": len(trained_docs),
        "heldout_documents": len(heldout_docs),
        "split": data.split.to_json(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", type=Path, required=True, help="a GPT-2 BPE retrieval database (read only)")
    parser.add_argument("--work-dir", type=Path, required=True, help="gpt2/, retrofit/, report.json")
    parser.add_argument(
        "--minutes", type=float, default=10.0, help="wall-clock budget of the base's training"
    )
    parser.add_argument("--base-steps", type=int, default=None, help="cap on the base's steps")
    parser.add_argument("--base-lr", type=float, default=2e-3)
    parser.add_argument("--base-batch-size", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0, help="of the init, the data order and the split")
    parser.add_argument("--train-fraction", type=float, default=0.9)
    add_retrofit_options(parser)
    parser.set_defaults(steps="40,120,360")
    parser.add_argument("--out", type=Path, default=None, help="default: WORK_DIR/report.json")
    args = parser.parse_args(argv)

    steps = parse_steps(args.steps)
    work = args.work_dir
    base_run, run_dir = work / "gpt2", work / "retrofit"
    check_checkpoints(run_dir, steps, args.score_only)
    db = RetrievalDatabase.open(args.db)
    report: dict[str, Any] = {"database": str(args.db), "seed": args.seed, "steps": steps}
    report["base"] = train_base(db, base_run, args)
    print(json.dumps({"base": report["base"]}, indent=2), flush=True)

    base = load_model(base_run / "model")
    heldout = select_split("heldout", database_sequences(db, base), db, base.config.retlm_data)
    heldout_docs = documents_of(heldout, db)
    assert heldout_docs.tolist() == report["base"]["split"]["heldout_docs"], "scored documents != held out"
    buckets = Buckets(heldout, db)
    base_nll, _ = token_nll(base, heldout, pad_id=int(db.pad_id), retrieval=False, eos_id=eos_of(db))
    report["heldout_sequences"] = len(heldout)
    retrofit_and_score(base_run / "model", db, run_dir, heldout, buckets, base_nll, args, report)

    fitted = load_model(run_dir / f"checkpoint-{steps[-1]}")
    split = fitted.config.retlm_data["split"]
    assert split == report["base"]["split"], "the retrofit trained on another document split than the base"
    fit_run = json.loads((run_dir / "retlm_run.json").read_text())
    report["retrofit_train_sequences"] = fit_run["train_sequences"]
    out = args.out or work / "report.json"
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report.get("trend_of_gain"), indent=2))


if __name__ == "__main__":
    main()
