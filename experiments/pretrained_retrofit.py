"""RETRO-fitting a pretrained LM (SmolLM2-135M by default), scored against the frozen base, against itself
reading unrelated neighbors, and against In-Context RALM on the same held-out windows.

The base is frozen; only the neighbor encoder and the chunked cross-attention layers train, with
retrieval, on the training documents of a database built with the base's tokenizer
(``retlm build-db TEXTS --out DB --tokenizer smollm2-135m``). Each checkpoint (``--steps``) is scored on
the held-out sequences three ways (real neighbors, another sequence's neighbors, retrieval off = the base,
checked), in bits per byte by overlap bucket with paired bootstrap 95% intervals, exactly as
``retrofit.py`` does; the trend of the gain with steps is extrapolated to the run that would resolve it.

In-Context RALM reads the same neighbors as text: for each held-out sequence of ``seq_len`` tokens, chunk
``i``'s neighbors (each with its continuation) are placed in front of the sequence's text before chunk
``i + 1``, which is then scored (stride = one chunk, query = the chunk just completed). So both methods
score the same target tokens with the same neighbors; only the way the LM reads them differs. The report
also gives each method's inference cost: tokens the LM processes per scored token.

    retlm build-db DEMO/corpus --out smol-db --tokenizer smollm2-135m --glob '*.txt' --seq-len 512
    cd experiments && python pretrained_retrofit.py --base smollm2-135m --db ../smol-db \
        --work-dir ../smol-rf --steps 40,120,360 --batch-size 2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from retrofit import Buckets, add_retrofit_options, check_checkpoints, eos_of, retrofit_and_score

from retlm.data import RETRODataset, spread_subset
from retlm.retrieval import RetrievalDatabase
from retlm.training.evaluation import select_split
from retlm.training.leakage import token_nll
from retlm.training.options import TrainOptions


def load_base(name: str) -> tuple[Any, Any, str]:
    """The base model (frozen, eval mode), its tokenizer, and the local folder it came from."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        from retlm.models.pretrained import pretrained_path

        folder = str(pretrained_path(name))
    except ImportError:  # before retlm.models.pretrained existed: a folder only
        folder = name
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    return model, AutoTokenizer.from_pretrained(folder), folder


class BaseAsRetro(torch.nn.Module):
    """A plain causal LM called the way ``token_nll`` calls a RETRO (``retrieved`` ignored)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, retrieved: Any = None, **kwargs: Any) -> Any:
        kwargs.pop("retrieval", None)
        return self.model(input_ids=input_ids, **kwargs)


def in_context_nll(model: Any, heldout: Any, db: Any) -> tuple[np.ndarray, int]:
    """Per-target NLL ``(N, seq_len)`` of each held-out sequence with In-Context RALM, and the number of
    tokens the LM processed in all.

    The targets RETRO's CCA lets read chunk ``j``'s neighbors (positions ``(j + 1) * c - 1`` to
    ``(j + 2) * c - 2``: from the chunk's last token, once it is complete, to the next chunk's second-last)
    are scored here with those same neighbors (``retrieved[j]``, each neighbor followed by its
    continuation) placed in front of the sequence; the first ``c - 1`` targets read none, in both. One
    forward pass per chunk: ``[neighbor tokens | sequence up to the last scored position]``.
    """
    pad, c = int(db.pad_id), int(db.chunk_size)
    rows, processed = [], 0
    for i in range(len(heldout)):
        seq, retrieved = heldout[i]
        seq = torch.as_tensor(np.asarray(seq), dtype=torch.long)
        retrieved = torch.as_tensor(np.asarray(retrieved), dtype=torch.long)
        seq_len = len(seq) - 1
        nll = np.zeros(seq_len)
        with torch.no_grad():
            logits = model(input_ids=seq[None, : c - 1]).logits[0]
            processed += c - 1
            nll[: c - 1] = F.cross_entropy(logits, seq[1:c], reduction="none").numpy()
            for j in range(seq_len // c):
                first, last = (j + 1) * c - 1, min((j + 2) * c - 2, seq_len - 1)
                tokens = retrieved[j].reshape(-1)
                prefix = tokens[tokens != pad]
                ids = torch.cat([prefix, seq[: last + 1]])
                out = model(input_ids=ids[None]).logits[0, len(prefix) + first : len(prefix) + last + 1]
                processed += len(ids)
                nll[first : last + 1] = F.cross_entropy(
                    out, seq[first + 1 : last + 2], reduction="none"
                ).numpy()
        rows.append(nll)
    return np.stack(rows), processed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="smollm2-135m", help="a pretrained name or model folder")
    parser.add_argument("--db", type=Path, required=True, help="a database built with the base's tokenizer")
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--max-heldout", type=int, default=48, help="held-out sequences scored (spread)")
    parser.add_argument("--no-in-context", action="store_true", help="skip In-Context RALM (scored already)")
    add_retrofit_options(parser)
    args = parser.parse_args(argv)

    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    run_dir = work / "retrofit"
    check_checkpoints(run_dir, sorted({int(s) for s in args.steps.split(",")}), args.score_only)
    db = RetrievalDatabase.open(args.db)
    base, _, folder = load_base(args.base)
    # retrofit() trains on TrainOptions' default split (a pretrained base records none): hold out the same
    defaults = TrainOptions()
    split = {"split": {"train_fraction": defaults.train_fraction, "seed": defaults.seed}}
    dataset = RETRODataset.from_database(db, seq_len=int(db.seq_len))
    heldout = spread_subset(select_split("heldout", dataset, db, split), args.max_heldout)
    buckets = Buckets(heldout, db)
    pad, eos = int(db.pad_id), eos_of(db)
    report: dict[str, Any] = {
        "base": args.base,
        "heldout_sequences": len(heldout),
        "seq_len": int(db.seq_len),
    }

    start = time.perf_counter()
    base_nll, _ = token_nll(BaseAsRetro(base), heldout, pad_id=pad, retrieval=False, eos_id=eos)
    report["base_seconds"] = round(time.perf_counter() - start, 1)
    ralm_nll = None
    if not args.no_in_context:
        ralm_nll = score_in_context(base, base_nll, heldout, db, buckets, report)
    retrofit_and_score(Path(folder), db, run_dir, heldout, buckets, base_nll, args, report)
    last = max(int(s) for s in args.steps.split(","))
    final = report["retrofit"][last]["buckets"][-1]["bits_per_byte"]
    report["summary"] = {
        "base": final["base"],
        "retrofit_real": final["real_neighbors"],
        "retrofit_other": final["other_neighbors"],
    }
    if ralm_nll is not None:
        report["summary"]["in_context"] = float(buckets.bits(ralm_nll).sum() / buckets.bytes.sum())
    out = work / "report.json"
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report["summary"], indent=2))


def score_in_context(
    base: Any, base_nll: np.ndarray, heldout: Any, db: Any, buckets: Buckets, report: dict[str, Any]
) -> np.ndarray:
    """In-Context RALM's per-target NLL on ``heldout``, its table against the base and its cost, into
    ``report``."""
    start = time.perf_counter()
    ralm_nll, processed = in_context_nll(base, heldout, db)
    report["in_context_seconds"] = round(time.perf_counter() - start, 1)
    scored = int(buckets.scored.sum())
    report["cost_tokens_processed_per_scored_token"] = {
        "base": 1.0,
        "in_context_ralm": processed / scored,
        # the decoder reads each token once; the (small) neighbor encoder reads k neighbors of 2c tokens
        # per chunk of c tokens
        "retrofit_decoder": 1.0,
        "retrofit_encoder": 2.0 * int(db.num_neighbors),
    }
    ralm_table = buckets.table(
        {"in_context": ralm_nll, "base": base_nll}, {"base_minus_in_context": ("base", "in_context")}
    )
    report["in_context"] = ralm_table
    print(json.dumps({"in_context": ralm_table[-1]}, indent=2), flush=True)
    return ralm_nll


if __name__ == "__main__":
    main()
