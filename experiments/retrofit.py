"""RETRO-fitting (the paper's section 4.2) the control of ``retrieval_helps.py`` with ``retlm retrofit``,
scored by neighbor-overlap bucket, at several training lengths.

The control (a RETRO with a RetNet decoder trained with no retrieval) is the base: it stays frozen and
only the new parameters train (a RETRO encoder of the neighbors and chunked cross-attention after the
chosen decoder layers, each starting at zero), through the library's trainer, with retrieval, on the
training documents. With retrieval off the retrofitted model *is* the control, weight for weight (checked
here), so a held-out difference comes from what the CCA layers read and not from training noise.

Each checkpoint (``--steps``, e.g. 100,300,900 of one run) is scored on the held-out documents three
ways: with its real neighbors, with the neighbors of another held-out sequence (real text, but
unrelated: what a model gains from extra capacity alone), and with retrieval off (the base). The
numbers are bits per byte, overall and per bucket of how much of each chunk its neighbors contain
(:mod:`retlm.training.overlap`; buckets by the real neighbors, so the same tokens are compared), with
paired bootstrap 95% intervals over held-out sequences. From the trend of the gain with training steps
it estimates the run that would resolve it.

The script also scores the pair that ``retrieval_helps.py`` trained (``retro-seed{N}``, with and without
retrieval, and the control) by bucket, and with the paper's filtered evaluation (``--max-overlap``).

    python experiments/retrieval_helps.py --work-dir /tmp/rh --steps 400 --seeds 0
    cd experiments && python retrofit.py --work-dir /tmp/rh --seed 0 --steps 100,300,900
"""

from __future__ import annotations

import argparse
import json
import math
import time
from functools import reduce
from pathlib import Path
from typing import Any

import numpy as np
import torch
from retrieval_helps import bootstrap, database_sequences
from torch.utils.data import Dataset

from retlm.data import IGNORE_INDEX, RetroCollator
from retlm.retrieval import RetrievalDatabase
from retlm.training import load_model
from retlm.training.evaluation import select_split
from retlm.training.leakage import (
    UNBUCKETED_NAME,
    OverlapView,
    byte_lengths_of,
    target_chunk_bytes,
    token_nll,
)
from retlm.training.overlap import BUCKET_NAMES, UNBUCKETED, bucket_of, target_buckets
from retlm.training.retrofit import retrofit

BUCKETS = [*range(len(BUCKET_NAMES)), UNBUCKETED]
NAMES = [*BUCKET_NAMES, UNBUCKETED_NAME]


class OtherNeighbors(Dataset):
    """``dataset`` with each sequence given the neighbors of the sequence half the dataset away."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        seq, _ = self.dataset[i]
        _, other = self.dataset[(i + len(self) // 2) % len(self)]
        return seq, other


class Buckets:
    """Where every held-out target and byte goes: per sequence, per bucket (by the real neighbors)."""

    def __init__(self, heldout: Any, db: Any) -> None:
        c, pad = int(db.chunk_size), int(db.pad_id)
        view = OverlapView(heldout, c, pad)
        self.n_sequences = len(view)
        seq_len = len(np.asarray(view[0][0])) - 1
        n = seq_len // c
        self.targets = np.stack([target_buckets(o, seq_len, c) for o in view.overlap])  # (N, L)
        chunk_bucket = np.full((len(view), n + 1), UNBUCKETED)
        chunk_bucket[:, 1:n] = bucket_of(view.overlap[:, : n - 1])
        collate = RetroCollator(pad, retrieval=False, eos_id=eos_of(db))
        labels = collate([view[i] for i in range(len(view))])["shift_labels"].numpy()
        lengths = byte_lengths_of(db.tokenizer)
        chunk_bytes = np.stack([target_chunk_bytes(db.tokenizer, row, c, lengths) for row in labels])
        self.scored = labels != IGNORE_INDEX
        self.bytes = np.stack([(chunk_bytes * (chunk_bucket == b)).sum(1) for b in BUCKETS], axis=1)  # (N, B)
        self.tokens = np.stack([(self.scored & (self.targets == b)).sum(1) for b in BUCKETS], axis=1)
        # target chunks with a scored target (the extra target counts as one, not bucketed), per bucket
        has = np.zeros_like(chunk_bucket, dtype=bool)
        rows, cols = np.nonzero(self.scored)
        has[rows, (cols + 1) // c] = True
        self.chunks = [int((has & (chunk_bucket == b)).sum()) for b in BUCKETS]

    def bits(self, nll: np.ndarray) -> np.ndarray:
        """``(N, B)`` summed bits per sequence and bucket of per-target nats ``nll (N, L)``."""
        return np.stack(
            [(nll * (self.scored & (self.targets == b))).sum(1) for b in BUCKETS], axis=1
        ) / math.log(2)

    def table(self, runs: dict[str, np.ndarray], pairs: dict[str, tuple[str, str]]) -> list[dict[str, Any]]:
        """Per bucket (and "all"): bits per byte of each run, and ``pairs`` name -> (a, b): bpb(a) - bpb(b)
        with a paired bootstrap 95% interval over sequences."""
        bits = {name: self.bits(nll) for name, nll in runs.items()}
        rows = []
        for j, name in [*enumerate(NAMES), (None, "all")]:
            pick = (lambda a: a.sum(1)) if j is None else (lambda a, j=j: a[:, j])
            n_bytes, n_tokens = pick(self.bytes), pick(self.tokens)
            chunks = sum(self.chunks) if j is None else self.chunks[j]
            row: dict[str, Any] = {"bucket": name, "chunks": chunks, "tokens": int(n_tokens.sum())}
            row["bytes"] = int(n_bytes.sum())
            if n_bytes.sum() == 0:
                rows.append(row)
                continue
            row["bits_per_byte"] = {run: float(pick(b).sum() / n_bytes.sum()) for run, b in bits.items()}
            for pair, (a, b) in pairs.items():
                mean, low, high = bootstrap(pick(bits[a]) - pick(bits[b]), n_bytes)
                row[pair] = {"mean": mean, "ci95": [low, high]}
            rows.append(row)
        return rows


def eos_of(db: Any) -> int | None:
    return None if getattr(db, "eos_id", None) is None else int(db.eos_id)


def score_retrofit(
    model: Any,
    heldout: Any,
    buckets: Buckets,
    control_nll: np.ndarray,
    pad: int,
    eos: int | None,
    check_base: bool = True,
) -> dict[str, Any]:
    """``check_base``: also score with retrieval off and check that it is the base exactly (one more pass
    over the held-out set; without it the base's scores stand for retrieval off)."""
    real, _ = token_nll(model, heldout, pad_id=pad, retrieval=True, eos_id=eos)
    other, _ = token_nll(model, OtherNeighbors(heldout), pad_id=pad, retrieval=True, eos_id=eos)
    off = control_nll
    if check_base:
        off, _ = token_nll(model, heldout, pad_id=pad, retrieval=False, eos_id=eos)
        assert np.array_equal(off, control_nll), "retrieval off must give the base (the control) exactly"
    return {
        "buckets": buckets.table(
            {"real_neighbors": real, "other_neighbors": other, "base": off},
            {
                "base_minus_real": ("base", "real_neighbors"),
                "other_minus_real": ("other_neighbors", "real_neighbors"),
            },
        )
    }


def trend(
    steps: list[int], gains: list[float], halfwidths: list[float], tokens_per_step: int
) -> dict[str, Any]:
    """Least-squares ``gain = a + b * ln(steps)``, and the steps (and training tokens) at which the fitted
    gain would equal the half-width of the 95% interval measured at the longest run, so that the
    interval would just exclude zero (the width assumed unchanged); None when the gain does not grow."""
    x = np.log(np.asarray(steps, dtype=np.float64))
    b, a = np.polyfit(x, np.asarray(gains), 1)
    need = halfwidths[-1]
    out: dict[str, Any] = {
        "fit": {"a": float(a), "b_per_ln_step": float(b)},
        "halfwidth_at_longest": need,
        "gains": gains,
    }
    if b <= 0:
        out["steps_to_resolve"] = None
        out["note"] = "the gain does not grow with training steps here; no extrapolation"
    else:
        steps_needed = float(math.exp((need - a) / b))
        out["steps_to_resolve"] = steps_needed
        out["tokens_to_resolve"] = steps_needed * tokens_per_step
    return out


def add_retrofit_options(parser: argparse.ArgumentParser) -> None:
    """The options of the retrofitting run and its scoring (also ``gpt2_scratch.py``'s)."""
    parser.add_argument("--steps", default="100,300,900", help="checkpoints of one retrofitting run to score")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--cca-layers", default=None, help="e.g. 2,4 (default: retlm retrofit's)")
    parser.add_argument("--enc-depth", type=int, default=1)
    parser.add_argument(
        "--check-base-once",
        action="store_true",
        help="score retrieval off (and check it is the base) at the last checkpoint only: a pass less each",
    )
    parser.add_argument(
        "--score-only",
        action="store_true",
        help="train nothing: score the --steps checkpoints an earlier (e.g. interrupted) run saved",
    )
    parser.add_argument("--quiet", action="store_true")


def parse_steps(text: str) -> list[int]:
    return sorted({int(s) for s in text.split(",")})


def check_checkpoints(run_dir: Path, steps: list[int], score_only: bool) -> None:
    missing = [s for s in steps if not (run_dir / f"checkpoint-{s}").is_dir()]
    if score_only and missing:
        raise SystemExit(f"--score-only: {run_dir} has no checkpoint of step(s) {missing}")


def retrofit_and_score(
    base_dir: Path,
    db: Any,
    run_dir: Path,
    heldout: Any,
    buckets: Buckets,
    base_nll: np.ndarray,
    args: argparse.Namespace,
    report: dict[str, Any],
) -> None:
    """RETRO-fit the base in ``base_dir`` into ``run_dir`` (unless ``args.score_only``), score its
    ``args.steps`` checkpoints against the base's per-target NLL ``base_nll``, fit the trend of the gain,
    and add it all to ``report``."""
    steps = parse_steps(args.steps)
    pad, eos = int(db.pad_id), eos_of(db)
    options = dict(
        max_steps=steps[-1],
        lr=args.lr,
        batch_size=args.batch_size,
        save_total_limit=None,
        save_every=reduce(math.gcd, steps),
        eval_every=None,
        progress=not args.quiet,
    )
    cca_layers = [int(x) for x in args.cca_layers.split(",")] if args.cca_layers else None
    if args.score_only:  # an interrupted run: score the checkpoints it saved, train nothing
        last_model = run_dir / f"checkpoint-{steps[-1]}"
    else:
        start = time.perf_counter()
        adapter = dict(cca_layers=cca_layers, enc_depth=args.enc_depth)
        result = retrofit(base_dir, db, run_dir, **adapter, **options)
        report["retrofit_minutes"] = round((time.perf_counter() - start) / 60, 1)
        last_model = result.model_dir
    seq_len = len(heldout[0][0]) - 1  # the base's, at which the held-out sequences were cut
    report["tokens_per_step"] = args.batch_size * seq_len
    report["retrofit"] = {}
    for step in steps:
        model = load_model(run_dir / f"checkpoint-{step}")
        # retrieval off is the frozen base at every step: checked once, at the last checkpoint
        check = step == steps[-1] or not args.check_base_once
        report["retrofit"][step] = score_retrofit(model, heldout, buckets, base_nll, pad, eos, check)
        print(json.dumps({step: report["retrofit"][step]["buckets"][-1]}, indent=2), flush=True)
    report["retrofit_config"] = {
        "cca_layers": load_model(last_model).config.cca_layers,
        "enc_depth": args.enc_depth,
        "lr": args.lr,
        "batch_size": args.batch_size,
    }
    # the gain over the base, and (trend_of_neighbor_gain) over the same model reading another
    # sequence's neighbors: what the neighbors' text itself gives, without the adapter's extra capacity
    for key, pair in (("trend_of_gain", "base_minus_real"), ("trend_of_neighbor_gain", "other_minus_real")):
        for j, name in [*enumerate(NAMES), (len(NAMES), "all")]:
            rows = [report["retrofit"][s]["buckets"][j] for s in steps]
            if all(pair in r for r in rows):
                gains = [r[pair]["mean"] for r in rows]
                halves = [(r[pair]["ci95"][1] - r[pair]["ci95"][0]) / 2 for r in rows]
                report.setdefault(key, {})[name] = trend(steps, gains, halves, report["tokens_per_step"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, required=True, help="a work dir of retrieval_helps.py")
    parser.add_argument("--seed", type=int, default=0, help="which control-seed{N} to retrofit")
    parser.add_argument("--max-overlap", type=float, default=0.125, help="of the filtered evaluation")
    add_retrofit_options(parser)
    parser.add_argument("--out", type=Path, default=None, help="default: WORK_DIR/retrofit-seed{N}.json")
    args = parser.parse_args(argv)

    steps = parse_steps(args.steps)
    work = args.work_dir
    run_dir = work / f"retrofit-seed{args.seed}"
    check_checkpoints(run_dir, steps, args.score_only)
    db = RetrievalDatabase.open(work / "db")
    control_dir = work / f"control-seed{args.seed}" / "model"
    control = load_model(control_dir)
    heldout = select_split("heldout", database_sequences(db, control), db, control.config.retlm_data)
    buckets = Buckets(heldout, db)
    pad = int(db.pad_id)
    eos = eos_of(db)
    control_nll, _ = token_nll(control, heldout, pad_id=pad, retrieval=False, eos_id=eos)
    report: dict[str, Any] = {"seed": args.seed, "heldout_sequences": len(heldout), "steps": steps}

    retro_dir = work / f"retro-seed{args.seed}" / "model"
    if retro_dir.is_dir():  # the trained pair of retrieval_helps.py, by bucket, and filtered
        retro = load_model(retro_dir)
        on, _ = token_nll(retro, heldout, pad_id=pad, retrieval=True, eos_id=eos)
        off, _ = token_nll(retro, heldout, pad_id=pad, retrieval=False, eos_id=eos)
        filtered_view = OverlapView(heldout, int(db.chunk_size), pad, args.max_overlap)
        filtered, _ = token_nll(retro, filtered_view, pad_id=pad, retrieval=True, eos_id=eos)
        report["filtered_neighbors_dropped"] = [filtered_view.dropped, filtered_view.neighbors]
        report["trained_pair"] = buckets.table(
            {
                "retro_on": on,
                "retro_off": off,
                f"retro_filtered_{args.max_overlap:g}": filtered,
                "control": control_nll,
            },
            {
                "off_minus_on": ("retro_off", "retro_on"),
                "control_minus_on": ("control", "retro_on"),
                "off_minus_filtered": ("retro_off", f"retro_filtered_{args.max_overlap:g}"),
            },
        )

    retrofit_and_score(control_dir, db, run_dir, heldout, buckets, control_nll, args, report)
    out = args.out or work / f"retrofit-seed{args.seed}.json"
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report.get("trend_of_gain"), indent=2))


if __name__ == "__main__":
    main()
