"""Held-out perplexity with and without retrieval, and bits per byte.

Both numbers come from the same weights and the same target tokens: the only difference is whether
``retrieved`` is passed to the model. Scored tokens are every target that is not padding (the
end-of-document token counts; the first token of each sequence is input only).

Bits per byte = (summed negative log-likelihood in bits) / (number of UTF-8 bytes of the scored text),
the RETRO paper's metric: unlike perplexity it does not depend on the tokenizer. For a byte-level BPE
(GPT-2's, the default) the bytes are exact: the sum of the UTF-8 lengths of the scored target tokens
(special tokens count 0), which is the byte length of the source text they cover. For other tokenizers
they are counted on the tokenizer's decoding of the scored target tokens, sequence by sequence, with
special tokens dropped; for the uncased WordPiece tokenizer (``--tokenizer bert``) that decoded text is
lower-cased and whitespace-normalised, so it is within a few percent of, not equal to, the raw files.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from retlm.data import (
    IGNORE_INDEX,
    DocumentSplit,
    RetroCollator,
    RETRODataset,
    SplitSequences,
    open_database,
    sequence_doc_ids,
    split_datasets,
    spread_subset,
)
from retlm.errors import short_repr
from retlm.models.auto import load_model, resolve_model_dir
from retlm.training.checkpoint import check_model_fits_database
from retlm.training.options import SPLITS
from retlm.training.precision import autocast_for, resolve_device, resolve_precision
from retlm.training.resources import check_training_memory
from retlm.training.scoring import Score, causal_lm_loss, scoring_batches


def paired_bootstrap(
    differences: np.ndarray, weights: np.ndarray, samples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """``(ratio, low, high)``: ``sum(differences) / sum(weights)`` over units (sequences, strides...) and
    its 95% percentile interval, resampling the units with replacement, paired (each unit keeps its own
    difference). E.g. per-unit NLL differences in bits over per-unit bytes: a difference in bits per
    byte. Resamples with no weight (a sparse bucket) are left out."""
    differences, weights = np.asarray(differences, dtype=np.float64), np.asarray(weights, dtype=np.float64)
    total = weights.sum()
    if len(weights) == 0 or total <= 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(weights), size=(samples, len(weights)))
    counts = weights[picks].sum(1)
    ratios = differences[picks].sum(1) / np.where(counts > 0, counts, 1)
    ratios = ratios[counts > 0]
    return (
        float(differences.sum() / total),
        float(np.quantile(ratios, 0.025)),
        float(np.quantile(ratios, 0.975)),
    )


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


@torch.no_grad()
def score(
    model: torch.nn.Module,
    dataset: Dataset,
    *,
    pad_id: int,
    retrieval: bool,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    autocast: Any = None,
    rank: int = 0,
    world_size: int = 1,
    desc: str | None = None,
    eos_id: int | None = None,
) -> Score:
    """Summed NLL and token count of ``model`` over ``dataset`` (``(seq, retrieved)`` items).

    Under DDP each rank scores every ``world_size``-th sequence and the sums are all-reduced.
    """
    was_training = model.training
    model.eval()
    nll, tokens = 0.0, 0
    collate = RetroCollator(pad_id, retrieval=retrieval, eos_id=eos_id)
    try:
        for batch in scoring_batches(dataset, batch_size, collate, rank, world_size, desc):
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch.pop("shift_labels")
            with autocast or nullcontext():
                logits = model(input_ids=batch["input_ids"], retrieved=batch.get("retrieved")).logits
            nll += causal_lm_loss(logits, labels, reduction="sum").item()
            tokens += int((labels != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    nll, tokens = _all_reduce_sum([nll, float(tokens)], torch.device(device))
    return Score(nll=nll, tokens=int(tokens))


def count_bytes(
    dataset: Dataset,
    tokenizer: Any,
    *,
    pad_id: int,
    batch_size: int = 64,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    eos_id: int | None = None,
) -> int:
    """UTF-8 bytes of the scored targets: exact for a byte-level BPE, else of their decoding (see the
    module docstring)."""
    from retlm.tokenization import token_byte_lengths

    lengths = token_byte_lengths(tokenizer) if hasattr(tokenizer, "backend_tokenizer") else None
    total = 0
    collate = RetroCollator(pad_id, retrieval=False, eos_id=eos_id)
    for batch in scoring_batches(dataset, batch_size, collate, rank, world_size, None):
        if lengths is not None:
            labels = batch["shift_labels"]
            total += int(lengths[labels[labels != IGNORE_INDEX].numpy()].sum())
            continue
        targets = [row[row != IGNORE_INDEX].tolist() for row in batch["shift_labels"]]
        texts = tokenizer.batch_decode(targets, skip_special_tokens=True)
        total += sum(len(text.encode("utf-8")) for text in texts)
    return int(_all_reduce_sum([float(total)], torch.device(device))[0])


def compare_retrieval(
    model: torch.nn.Module,
    dataset: Dataset,
    *,
    pad_id: int,
    tokenizer: Any = None,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    autocast: Any = None,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
    eos_id: int | None = None,
) -> dict[str, Any]:
    """Scores of the same model on the same tokens with retrieval and with retrieval switched off."""
    n_bytes = (
        0
        if tokenizer is None
        else count_bytes(
            dataset, tokenizer, pad_id=pad_id, rank=rank, world_size=world_size, device=device, eos_id=eos_id
        )
    )
    runs = {}
    for name, retrieval in (("with_retrieval", True), ("without_retrieval", False)):
        result = score(
            model,
            dataset,
            pad_id=pad_id,
            retrieval=retrieval,
            batch_size=batch_size,
            device=device,
            autocast=autocast,
            rank=rank,
            world_size=world_size,
            desc=f"eval {name.replace('_', ' ')}" if progress else None,
            eos_id=eos_id,
        )
        result.bytes = n_bytes
        runs[name] = result
    with_r, without_r = runs["with_retrieval"], runs["without_retrieval"]
    return {
        "with_retrieval": with_r.as_dict(),
        "without_retrieval": without_r.as_dict(),
        "perplexity_ratio": without_r.perplexity / with_r.perplexity,
        "tokens": with_r.tokens,
        "bytes": n_bytes,
        "sequences": len(dataset),
    }


# ---- the `retlm eval` entry point ----


def _eos_id(db: Any) -> int | None:
    eos = getattr(db, "eos_id", None)
    return None if eos is None else int(eos)


def _tokenizer_of(db: Any) -> Any:
    tokenizer = getattr(db, "tokenizer", None)
    if tokenizer is None or hasattr(tokenizer, "batch_decode"):
        return tokenizer
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer))


def select_split(split: str, dataset: Dataset, db: Any, trained: dict[str, Any]) -> SplitSequences:
    """The sequences of ``split`` ("heldout", "train" or "all"), by the document split recorded in a trained
    model's ``config.retlm_data`` (``trained``)."""
    if split == "all":
        return SplitSequences(dataset, db, np.arange(len(dataset)))
    recorded = trained.get("split")
    if not recorded:
        raise ValueError(
            "the checkpoint records no training split (it was not trained by `retlm train`); "
            "evaluate with split='all' (`--split all`)"
        )
    doc_split = DocumentSplit.make(db.doc_ids, recorded["train_fraction"], recorded["seed"])
    expected = recorded.get("heldout_docs")
    if expected is not None and doc_split.heldout_docs.tolist() != expected:
        raise ValueError(
            "this database's documents differ from the one the model was trained on, so its "
            "held-out split is not the model's; evaluate with split='all' (`--split all`)"
        )
    train_set, heldout_set = split_datasets(dataset, db, doc_split, hide_heldout=False)
    chosen = heldout_set if split == "heldout" else train_set
    if len(chosen) == 0:
        raise ValueError(f"the {split} split is empty (train_fraction={recorded['train_fraction']})")
    return chosen


def evaluate(
    checkpoint: str | Path,
    db: Any,
    *,
    split: str = "heldout",
    batch_size: int = 8,
    max_sequences: int | None = None,
    device: str | None = None,
    precision: str = "fp32",
    progress: bool = True,
    by_overlap: bool = True,
    max_overlap: float | None = None,
) -> dict[str, Any]:
    """Perplexity and bits per byte of a trained model with and without retrieval.

    ``checkpoint`` is a run dir, a model dir or a ``checkpoint-N`` dir; ``db`` a database or its path.
    ``split`` picks the held-out documents of training (default), the training ones, or all.
    Returns ``{"with_retrieval": {loss, perplexity, bits_per_byte}, "without_retrieval": {...},
    "perplexity_ratio", "tokens", "bytes", "sequences", "documents", "split", "checkpoint", "precision",
    "trained_with_retrieval"}``. For a model trained without retrieval (``--no-retrieval``) only the
    "without_retrieval" numbers are meaningful.

    ``by_overlap`` (default) adds ``"overlap"``: the same numbers per bucket of neighbor overlap
    (:func:`retlm.training.leakage.score_by_overlap`, from the same forward passes); ``max_overlap`` drops
    the neighbors that overlap the chunk reading them by more than that fraction (the paper's filtered
    evaluation; the "with_retrieval" numbers are then those of the filtered neighbors).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {short_repr(split)}; choose one of {', '.join(SPLITS)}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    device = resolve_device(device)  # a bad device or precision is refused before anything is loaded
    precision = resolve_precision(precision, device)
    db = open_database(db)
    model_dir = resolve_model_dir(checkpoint)
    model = load_model(model_dir)
    check_model_fits_database(model.config, db)
    trained = getattr(model.config, "retlm_data", None) or {}
    model.to(device)

    dataset = RETRODataset.from_database(db, seq_len=trained.get("seq_len"))
    chosen = spread_subset(select_split(split, dataset, db, trained), max_sequences)
    check_training_memory(model.config, min(batch_size, max(len(chosen), 1)), dataset.seq_len, training=False)
    n_docs = len(np.unique(sequence_doc_ids(db)[chosen.indices]))
    common = dict(
        pad_id=int(db.pad_id),
        tokenizer=_tokenizer_of(db),
        batch_size=batch_size,
        device=device,
        autocast=autocast_for(precision, device),
        progress=progress,
        eos_id=_eos_id(db),
    )
    if by_overlap or max_overlap is not None:
        from retlm.training.leakage import score_by_overlap

        result = score_by_overlap(
            model, chosen, chunk_size=int(db.chunk_size), max_overlap=max_overlap, **common
        )
    else:
        result = compare_retrieval(model, chosen, **common)
    result.update(
        split=split,
        documents=n_docs,
        checkpoint=str(model_dir),
        precision=precision,
        trained_with_retrieval=trained.get("retrieval"),
    )
    return result


def format_table(result: dict[str, Any]) -> str:
    """The result of ``evaluate`` as a small text table."""

    def cell(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    rows = [("", "loss (nats)", "perplexity", "bits/byte")]
    for key in ("with_retrieval", "without_retrieval"):
        r = result[key]
        rows.append((key.replace("_", " "), cell(r["loss"]), cell(r["perplexity"]), cell(r["bits_per_byte"])))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]

    def line(row: tuple[str, ...]) -> str:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        return "  ".join(cells)

    lines = [line(row) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"perplexity without / with retrieval: {result['perplexity_ratio']:.3f}")
    if result.get("trained_with_retrieval") is False:
        lines.append(
            "note: this model was trained without retrieval (the baseline): read its 'without retrieval' row"
        )
    lines.append(
        f"{result.get('split', '?')} split: {result['sequences']} sequences"
        + (f" from {result['documents']} documents" if "documents" in result else "")
        + f", {result['tokens']} scored tokens, {result['bytes']} bytes"
    )
    return "\n".join(lines)
