"""Does retrieval help? The RETRO paper's claim, at CPU scale, with the paper's two controls.

Trains, on the demo's database (the bundled Python documentation, or ``--corpus DIR``), for the same
number of steps from the same seed and data order:

- ``retro-seed{N}``: RETRO with a RetNet decoder, trained with retrieval (``--model-config``, default
  retro-tiny);
- ``control-seed{N}``: the same model trained with no retrieval at all.

and scores every held-out sequence three ways: the RETRO weights with retrieval, the same weights with
retrieval switched off, and the control. Besides the perplexities and bits per byte (the RETRO paper's
metric, comparable across tokenizers: ``--tokenizer gpt2``, the default, or ``bert``) it prints

- a paired bootstrap (over held-out sequences) of the per-token loss difference, control minus RETRO
  with retrieval, so that a difference can be told apart from noise;
- the loss change that retrieval brings on *copyable* target tokens (the bigram that ends at the
  target occurs in a neighbor, or its continuation, that the token may read) against the other
  tokens: if the model reads its neighbors, the gain concentrates on the copyable ones.

Re-running the command reuses the database and finished training runs (the scores are recomputed).

    python experiments/retrieval_helps.py --work-dir /tmp/retrieval-helps --steps 400 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retlm.data import IGNORE_INDEX, RetroCollator
from retlm.demo import DemoOptions, build_database
from retlm.training import load_model, train
from retlm.training.config import read_model_config
from retlm.training.evaluation import causal_lm_loss, count_bytes, paired_bootstrap, select_split


def train_variant(
    db: Any, work: Path, name: str, config: dict[str, Any], retrieval: bool, args: argparse.Namespace
) -> Path:
    result = train(
        db,
        config,
        work / name,
        max_steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        seed=args.seed,
        retrieval=retrieval,
        eval_every=50,
        eval_sequences=32,
        save_every=100,
        progress=not args.quiet,
    )
    print(f"{name}: {result.global_step} steps, {result.elapsed_s / 60:.1f} min of training", flush=True)
    return result.model_dir


@torch.no_grad()
def per_token_losses(
    model: torch.nn.Module,
    dataset: Any,
    pad_id: int,
    retrieval: bool,
    batch_size: int = 8,
    eos_id: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(losses, labels)``, each ``(n_sequences, seq_len)``; ``losses`` is 0 where labels are ignored."""
    model.eval()
    collate = RetroCollator(pad_id, retrieval=retrieval, eos_id=eos_id)
    losses, labels = [], []
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        target, _ = batch.pop("shift_labels"), batch.pop("labels")
        loss = causal_lm_loss(model(**batch).logits, target, reduction="none").view(target.shape)
        losses.append(loss.double().numpy())  # float64 sums: the summaries agree to rounding
        labels.append(target.numpy())
    return np.concatenate(losses), np.concatenate(labels)


def copyable_mask(dataset: Any, chunk_size: int) -> np.ndarray:
    """``(n_sequences, seq_len)`` bool: the target's bigram (previous token, target) occurs in a neighbor
    (or its continuation) that the target may read, i.e. one retrieved for the previous chunk."""
    masks = []
    for i in range(len(dataset)):
        seq, retrieved = (np.asarray(t) for t in dataset[i])
        targets = len(seq) - 1
        mask = np.zeros(targets, dtype=bool)
        for t in range(targets):  # target seq[t + 1], read at position t
            chunk = (t + 1) // chunk_size  # position t reads neighbors of chunks < (t + 1) // chunk_size
            if chunk == 0:
                continue
            neighbors = retrieved[chunk - 1]  # (k, 2 * chunk_size)
            pairs = set(
                zip(neighbors[:, :-1].ravel().tolist(), neighbors[:, 1:].ravel().tolist(), strict=True)
            )
            mask[t] = (int(seq[t]), int(seq[t + 1])) in pairs
        masks.append(mask)
    return np.stack(masks)


def bootstrap(
    diff_sums: np.ndarray, tokens: np.ndarray, samples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """Mean per-token difference and its 95% interval, resampling sequences."""
    return paired_bootstrap(diff_sums, tokens, samples, seed)


def bits_per_byte(losses: np.ndarray, scored: np.ndarray, n_bytes: int) -> float:
    """Summed NLL of the scored targets in bits over their UTF-8 bytes (see ``evaluate.count_bytes``)."""
    return float(losses[scored].sum() / math.log(2) / n_bytes)


def score_pair(db: Any, retro_dir: Path, control_dir: Path) -> dict[str, Any]:
    """Held-out scores of one (RETRO, control) pair trained from the same seed."""
    retro, control = load_model(retro_dir), load_model(control_dir)
    heldout = select_split("heldout", database_sequences(db, retro), db, retro.config.retlm_data)
    pad_id, eos_id = int(db.pad_id), int(db.eos_id)
    with_r, labels = per_token_losses(retro, heldout, pad_id, retrieval=True, eos_id=eos_id)
    without_r, _ = per_token_losses(retro, heldout, pad_id, retrieval=False, eos_id=eos_id)
    ctrl, _ = per_token_losses(control, heldout, pad_id, retrieval=False, eos_id=eos_id)
    scored = labels != IGNORE_INDEX
    tokens = scored.sum(1)
    n_bytes = count_bytes(heldout, db.tokenizer, pad_id=pad_id, eos_id=eos_id)

    def ppl(losses: np.ndarray) -> float:
        return math.exp(losses[scored].mean())

    runs = {
        "retro_with_retrieval": with_r,
        "retro_without_retrieval": without_r,
        "control_trained_without_retrieval": ctrl,
    }
    report: dict[str, Any] = {
        "heldout_sequences": len(heldout),
        "heldout_tokens": int(tokens.sum()),
        "heldout_bytes": n_bytes,
        "perplexity": {name: ppl(losses) for name, losses in runs.items()},
        "bits_per_byte": {name: bits_per_byte(losses, scored, n_bytes) for name, losses in runs.items()},
    }
    for name, other in (("control_minus_retro", ctrl), ("retro_off_minus_retro", without_r)):
        mean, low, high = bootstrap(((other - with_r) * scored).sum(1), tokens)
        report[f"{name}_nats_per_token"] = {"mean": mean, "ci95": [low, high]}
    copyable = copyable_mask(heldout, int(db.chunk_size)) & scored
    gain = without_r - with_r
    report["retrieval_gain_nats"] = {
        "copyable_tokens": int(copyable.sum()),
        "on_copyable": float(gain[copyable].mean()),
        "on_other": float(gain[scored & ~copyable].mean()),
    }
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, default=Path("retrieval-helps-work"))
    parser.add_argument("--corpus", type=Path, default=None, help="a folder of text (default: bundled docs)")
    parser.add_argument("--tokenizer", default="gpt2", help="LM tokenizer of the database: gpt2 or bert")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seeds", default="0", help="comma-separated; one (RETRO, control) pair per seed")
    parser.add_argument("--model-config", default="retro-tiny")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)

    work = args.work_dir
    db = build_database(
        DemoOptions(
            work_dir=work,
            corpus=args.corpus,
            seq_len=args.seq_len,
            chunk_size=args.chunk_size,
            tokenizer=args.tokenizer,
            progress=not args.quiet,
        )
    )
    config = read_model_config(args.model_config)
    report: dict[str, Any] = {"steps": args.steps, "model_config": args.model_config, "seeds": {}}
    for seed in (int(s) for s in args.seeds.split(",")):
        args.seed = seed
        retro_dir = train_variant(db, work, f"retro-seed{seed}", config, True, args)
        # the control never runs its CCA layers, so their init is moot; zero_init_cca only zeroes
        # projections after drawing them, so every weight the control uses starts as the RETRO model's
        control_dir = train_variant(
            db, work, f"control-seed{seed}", {**config, "zero_init_cca": False}, False, args
        )
        report["seeds"][seed] = score_pair(db, retro_dir, control_dir)
        print(json.dumps({seed: report["seeds"][seed]}, indent=2), flush=True)
    diffs = [r["control_minus_retro_nats_per_token"]["mean"] for r in report["seeds"].values()]
    report["control_minus_retro_nats_per_token_by_seed"] = diffs
    report["retro_beats_control_in_seeds"] = f"{sum(d > 0 for d in diffs)} of {len(diffs)}"
    out = work / "report.json"
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "seeds"}, indent=2))


def database_sequences(db: Any, model: Any) -> Any:
    """Every sequence of ``db`` at the length ``model`` was trained with, as ``(seq, retrieved)`` items."""
    from retlm.data import RETRODataset

    return RETRODataset.from_database(db, seq_len=model.config.retlm_data["seq_len"])


if __name__ == "__main__":
    main()
