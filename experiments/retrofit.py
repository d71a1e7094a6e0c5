"""RETRO-fitting (the paper's section 4.2): add retrieval to a model trained without it, decoder frozen.

Takes the control of ``retrieval_helps.py`` (a RETRO trained with no retrieval: its encoder and CCA
layers never ran), zeroes its CCA output projections, freezes every decoder weight, and trains only the
encoder and the CCA layers, with retrieval, on the training documents. The frozen decoder removes the
training noise that dominates a comparison of two separately trained models: with retrieval switched
off the retrofitted model *is* the control, weight for weight, so any held-out difference comes from
what the CCA layers read.

A retrofitted model could also gain capacity rather than information (the CCA layers have learned
null keys and an output bias, and the encoder re-reads the retrieving chunk), so it is scored three ways
on the held-out documents: with its real neighbours, with the neighbours of another held-out sequence
(real text, but unrelated), and with retrieval off (= the control).

    python experiments/retrofit.py --work-dir /tmp/rh --seed 0 --steps 300
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from retrieval_helps import bits_per_byte, bootstrap, copyable_mask, database_sequences, per_token_losses
from torch.utils.data import DataLoader, Dataset
from transformers import get_cosine_schedule_with_warmup

from retlm.retrieval import RetrievalDatabase
from retlm.training import load_model
from retlm.training.data import IGNORE_INDEX, DocumentSplit, RetroCollator, split_datasets
from retlm.training.evaluate import causal_lm_loss, count_bytes, select_split


class OtherNeighbours(Dataset):
    """``dataset`` with each sequence given the neighbours of the sequence half the dataset away."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        seq, _ = self.dataset[i]
        _, other = self.dataset[(i + len(self) // 2) % len(self)]
        return seq, other


def retrofittable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Zero the CCA output projections, freeze everything else of the decoder; returns what trains."""
    for param in model.parameters():
        param.requires_grad_(False)
    trainable = list(model.model.encoder.parameters())
    for layer in model.model.layers:
        if layer.cca is not None:
            torch.nn.init.zeros_(layer.cca.attn.to_out.weight)
            torch.nn.init.zeros_(layer.cca.attn.to_out.bias)
            trainable += list(layer.cca.parameters()) + list(layer.cca_norm.parameters())
    for param in trainable:
        param.requires_grad_(True)
    return trainable


def retrofit(model: torch.nn.Module, train_set: Dataset, pad_id: int, *, steps: int, lr: float,
             batch_size: int, seed: int, eos_id: int | None = None) -> list[float]:
    """Train the encoder and CCA layers for ``steps`` steps; returns the training losses."""
    params = retrofittable(model)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    schedule = get_cosine_schedule_with_warmup(optimizer, max(1, steps // 20), steps)
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, generator=generator, drop_last=True,
                        collate_fn=RetroCollator(pad_id, retrieval=True, eos_id=eos_id))
    model.train()
    losses: list[float] = []
    while len(losses) < steps:
        for batch in loader:
            labels = batch.pop("labels")  # already shifted by the collator
            loss = causal_lm_loss(model(**batch).logits, labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if len(losses) % 50 == 0:
                print(f"step {len(losses)}: loss {np.mean(losses[-50:]):.4f}", flush=True)
            if len(losses) == steps:
                break
    return losses


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, required=True, help="a work dir of retrieval_helps.py")
    parser.add_argument("--seed", type=int, default=0, help="which control-seed{N} to retrofit")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None, help="default: WORK_DIR/retrofit-seed{N}.json")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    db = RetrievalDatabase.open(args.work_dir / "db")
    model = load_model(args.work_dir / f"control-seed{args.seed}" / "model")
    trained = model.config.retlm_data
    dataset = database_sequences(db, model)
    split = DocumentSplit.make(db.doc_ids, trained["split"]["train_fraction"], trained["split"]["seed"])
    train_set, _ = split_datasets(dataset, db, split, hide_heldout=True)
    heldout = select_split("heldout", dataset, db, trained)
    pad_id, eos_id = int(db.pad_id), int(db.eos_id)

    control, labels = per_token_losses(model, heldout, pad_id, retrieval=False, eos_id=eos_id)
    start = time.perf_counter()
    losses = retrofit(model, train_set, pad_id, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                      seed=args.seed, eos_id=eos_id)
    minutes = (time.perf_counter() - start) / 60
    real, _ = per_token_losses(model, heldout, pad_id, retrieval=True, eos_id=eos_id)
    other, _ = per_token_losses(model, OtherNeighbours(heldout), pad_id, retrieval=True, eos_id=eos_id)
    off, _ = per_token_losses(model, heldout, pad_id, retrieval=False, eos_id=eos_id)
    scored = labels != IGNORE_INDEX
    tokens = scored.sum(1)
    n_bytes = count_bytes(heldout, db.tokenizer, pad_id=pad_id, eos_id=eos_id)
    assert np.array_equal(off, control), "retrieval off must give the control exactly (frozen decoder)"

    def ppl(losses: np.ndarray) -> float:
        return math.exp(losses[scored].mean())

    copyable = copyable_mask(heldout, int(db.chunk_size)) & scored
    gain = control - real
    report: dict[str, Any] = {
        "seed": args.seed, "steps": args.steps, "lr": args.lr, "minutes": round(minutes, 1),
        "first_and_last_50_training_losses": [float(np.mean(losses[:50])), float(np.mean(losses[-50:]))],
        "heldout_sequences": len(heldout), "heldout_tokens": int(tokens.sum()),
        "perplexity": {"retrofitted_real_neighbours": ppl(real), "retrofitted_other_neighbours": ppl(other),
                       "control_equals_retrieval_off": ppl(control)},
        "heldout_bytes": n_bytes,
        "bits_per_byte": {"retrofitted_real_neighbours": bits_per_byte(real, scored, n_bytes),
                          "retrofitted_other_neighbours": bits_per_byte(other, scored, n_bytes),
                          "control_equals_retrieval_off": bits_per_byte(control, scored, n_bytes)},
        "retrieval_gain_on_copyable_vs_other_tokens": [float(gain[copyable].mean()),
                                                       float(gain[scored & ~copyable].mean())],
    }
    for name, losses_ in (("control_minus_real", control), ("other_minus_real", other)):
        mean, low, high = bootstrap(((losses_ - real) * scored).sum(1), tokens)
        report[f"{name}_nats_per_token"] = {"mean": mean, "ci95": [low, high]}
    out = args.out or args.work_dir / f"retrofit-seed{args.seed}.json"
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
