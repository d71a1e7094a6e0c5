"""Loss and bits per byte bucketed by neighbor overlap (retlm/training/leakage.py), against a float64
reference that scores every target by hand and buckets it with the naive overlap of test_overlap.py;
the filtered evaluation; the `retlm eval` table and plot.

On the twin database (tests/helpers/training_helpers.py) each chunk's first neighbor is the same chunk of an
identical document, so its continuation holds the next chunk whole: most chunks overlap their
neighbors fully, which is what the filtered evaluation must remove.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from overlap_reference import naive_overlap
from training_helpers import tiny_model_config

from retlm.data import RETRODataset
from retlm.training import evaluate, load_model, train
from retlm.training.evaluation import compare_retrieval, count_bytes, select_split
from retlm.training.leakage import UNBUCKETED_NAME, OverlapView, format_overlap_table, score_by_overlap
from retlm.training.overlap import BUCKET_EDGES, BUCKET_NAMES, sequence_overlaps
from retlm.training.plot import plot_overlap_buckets

C = 8


@pytest.fixture(scope="module")
def trained(db, tmp_path_factory):
    run = tmp_path_factory.mktemp("run") / "run"
    train(db, tiny_model_config(), run, max_steps=8, batch_size=4, lr=1e-2, save_every=None, progress=False)
    model = load_model(run)
    heldout = select_split("heldout", RETRODataset.from_database(db, seq_len=32), db, model.config.retlm_data)
    return run, model, heldout


def reference(model, dataset, retrieval: bool) -> dict[str, tuple[float, int]]:
    """float64 NLL sum and token count per bucket, one target at a time, buckets by the naive overlap."""
    model = model.double()
    sums = {name: [0.0, 0] for name in (*BUCKET_NAMES, UNBUCKETED_NAME)}
    for i in range(len(dataset)):
        seq, retrieved = (torch.as_tensor(np.asarray(t)) for t in dataset[i])
        with torch.no_grad():
            logits = model(input_ids=seq[None, :-1], retrieved=retrieved[None] if retrieval else None).logits[
                0
            ]
        logp = torch.log_softmax(logits.double(), dim=-1)
        n = retrieved.shape[0]
        for t in range(len(seq) - 1):
            target = int(seq[t + 1])
            if target == 0:  # padding is not scored
                continue
            v = (t + 1) // C
            if v == 0 or v == n:
                name = UNBUCKETED_NAME
            else:
                share, _ = naive_overlap(seq[v * C : v * C + C].tolist(), retrieved[v - 1].tolist())
                name = next(
                    b for b, hi in zip(BUCKET_NAMES, BUCKET_EDGES[1:], strict=True) if share < hi or hi == 1
                )
            sums[name][0] -= float(logp[t, target])
            sums[name][1] += 1
    model.float()
    return {k: (v[0], v[1]) for k, v in sums.items()}


@pytest.mark.heavy
def test_buckets_match_a_float64_per_target_reference(db, trained):
    _, model, heldout = trained
    subset = torch.utils.data.Subset(heldout, range(min(6, len(heldout))))
    result = score_by_overlap(model.double(), subset, pad_id=0, chunk_size=C, tokenizer=db.tokenizer)
    model.float()
    for retrieval, key in ((True, "with_retrieval"), (False, "without_retrieval")):
        expected = reference(model, subset, retrieval)
        for row in result["overlap"]["buckets"]:
            nll, tokens = expected[row["bucket"]]
            assert row["tokens"] == tokens, row["bucket"]
            if tokens:
                # the evaluation's cross-entropy runs in float32 (evaluate.causal_lm_loss): ~1e-7 per token
                assert abs(row[key]["loss"] - nll / tokens) < 1e-6, (row["bucket"], key)
    assert result["overlap"]["buckets"][3]["tokens"] > 0  # the twins put chunks in the 50-100% bucket


@pytest.mark.heavy
def test_buckets_add_up_to_the_plain_evaluation(db, trained):
    _, model, heldout = trained
    result = score_by_overlap(model, heldout, pad_id=0, chunk_size=C, tokenizer=db.tokenizer)
    plain = compare_retrieval(model, heldout, pad_id=0, tokenizer=db.tokenizer)
    rows = result["overlap"]["buckets"]
    assert result["tokens"] == plain["tokens"] == sum(r["tokens"] for r in rows)
    assert (
        result["bytes"]
        == plain["bytes"]
        == count_bytes(heldout, db.tokenizer, pad_id=0)
        == sum(r["bytes"] for r in rows)
    )
    assert sum(r["chunks"] for r in rows) == len(heldout) * (32 // C + 1)
    for key in ("with_retrieval", "without_retrieval"):
        for metric in ("loss", "bits_per_byte"):
            assert math.isclose(result[key][metric], plain[key][metric], rel_tol=1e-6), (key, metric)
        nats = sum(r[key]["loss"] * r["tokens"] for r in rows if r["tokens"])
        assert math.isclose(nats / result["tokens"], result[key]["loss"], rel_tol=1e-9)
    # retrieval off does not depend on the neighbors; the first chunk reads none either way
    unbucketed = rows[-1]
    assert unbucketed["bucket"] == UNBUCKETED_NAME


def test_max_overlap_drops_exactly_the_neighbors_above_it(db, trained):
    _, model, heldout = trained
    view = OverlapView(heldout, C, 0, max_overlap=0.5)
    assert view.dropped > 0
    for i in range(len(view)):
        seq, retrieved = view[i]
        original = np.asarray(heldout[i][1])
        _, single = sequence_overlaps(np.asarray(seq), original, C, 0)
        kept = ~(np.asarray(retrieved) == 0).all(axis=-1)
        was = ~((original == 0) | (original < 0)).all(axis=-1)
        np.testing.assert_array_equal(kept, was & (single <= 0.5))
    filtered = score_by_overlap(
        model, heldout, pad_id=0, chunk_size=C, tokenizer=db.tokenizer, max_overlap=0.5
    )
    full = score_by_overlap(model, heldout, pad_id=0, chunk_size=C, tokenizer=db.tokenizer)
    assert filtered["overlap"]["dropped_neighbors"] == view.dropped
    assert filtered["without_retrieval"] == full["without_retrieval"]
    assert filtered["with_retrieval"]["loss"] != full["with_retrieval"]["loss"]
    assert filtered["overlap"]["buckets"][3]["tokens"] < full["overlap"]["buckets"][3]["tokens"]
    with pytest.raises(ValueError, match="max_overlap"):
        OverlapView(heldout, C, 0, max_overlap=1.5)


def test_evaluate_reports_the_buckets_and_they_print_and_plot(db, trained, tmp_path):
    run, _, _ = trained
    result = evaluate(run, db, progress=False, max_overlap=0.25)
    assert result["overlap"]["max_overlap"] == 0.25 and len(result["overlap"]["buckets"]) == 5
    table = format_overlap_table(result)
    assert all(name in table for name in (*BUCKET_NAMES, UNBUCKETED_NAME)) and "more than 25%" in table
    png = plot_overlap_buckets(result, tmp_path / "overlap.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "overlap" not in evaluate(run, db, progress=False, by_overlap=False)


def test_chunk_bytes_are_exact_for_gpt2_bpe_and_add_up_for_other_tokenizers(db):
    from retlm.tokenization import gpt2_tokenizer
    from retlm.training.leakage import byte_lengths_of, target_chunk_bytes

    tokenizer = gpt2_tokenizer()
    text = "Naïve café, déjà vu: the with statement\nwraps a block — “quoted” text. " * 3
    ids = np.array(tokenizer(text)["input_ids"][: 4 * C])
    labels = ids.copy()
    labels[-3:] = -100  # not scored
    lengths = byte_lengths_of(tokenizer)
    exact = target_chunk_bytes(tokenizer, labels, C, lengths)
    decoded = target_chunk_bytes(tokenizer, labels, C)  # the other tokenizers' way, on the same tokens
    assert exact.sum() == decoded.sum() == len(tokenizer.decode(ids[:-3]).encode("utf-8"))
    chunk = (np.arange(len(labels)) + 1) // C
    for v in range(len(exact)):
        assert exact[v] == sum(int(lengths[t]) for t in labels[(chunk == v) & (labels >= 0)])
    assert byte_lengths_of(db.tokenizer) is None  # the toy tokenizer is counted on its decoding
