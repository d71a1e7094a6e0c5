"""experiments/: the copyable-token rule, the bootstrap, and short runs of both experiments."""

import importlib
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "retrieval_helps.py"
spec = importlib.util.spec_from_file_location("retrieval_helps", SCRIPT)
retrieval_helps = importlib.util.module_from_spec(spec)
spec.loader.exec_module(retrieval_helps)


def test_copyable_means_the_bigram_is_in_a_neighbor_the_target_may_read():
    # chunk_size 2, seq_len 4: position t reads the neighbors of chunk (t + 1) // 2 - 1
    seq = torch.tensor([1, 2, 3, 4, 5])
    retrieved = torch.tensor(
        [
            [[9, 3, 4, 9]],  # neighbors of chunk 0: read from position 1 on
            [[1, 2, 4, 5]],
        ]
    )  # neighbors of chunk 1: read from position 3 on
    mask = retrieval_helps.copyable_mask([(seq, retrieved)], chunk_size=2)
    # t=0 reads nothing; t=1 (2->3) and t=2 (3->4) read chunk 0's neighbor; t=3 (4->5) chunk 1's
    assert mask.tolist() == [[False, False, True, True]]


def test_bootstrap_interval_contains_the_mean_and_shrinks_with_agreement():
    tokens = np.full(50, 100)
    mean, low, high = retrieval_helps.bootstrap(np.linspace(-1, 3, 50), tokens)
    assert low < mean < high and math.isclose(mean, 1 / 100)
    mean, low, high = retrieval_helps.bootstrap(np.full(50, 2.0), tokens)
    assert low == mean == high == 0.02


@pytest.mark.heavy
def test_the_experiment_runs_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(20):
        topic = ["rivers", "stars", "bread", "ships"][i % 4]
        text = " ".join(f"Note {i}.{j} is about {topic} in spring." for j in range(16))
        (corpus / f"d{i}.txt").write_text(text)
    model = tmp_path / "tiny.yaml"
    model.write_text(
        "decoder: retnet\nenc_dim: 32\nenc_depth: 1\ndec_dim: 32\ndec_depth: 2\n"
        "dec_cross_attn_layers: [2]\nheads: 2\ndim_head: 16\nzero_init_cca: true\n"
    )
    work = tmp_path / "work"
    retrieval_helps.main(
        [
            "--work-dir",
            str(work),
            "--corpus",
            str(corpus),
            "--steps",
            "3",
            "--seeds",
            "0",
            "--model-config",
            str(model),
            "--seq-len",
            "64",
            "--chunk-size",
            "16",
            "--batch-size",
            "2",
            "--quiet",
        ]
    )
    report = json.loads((work / "report.json").read_text())
    seed = report["seeds"]["0"]
    ppl = seed["perplexity"]
    assert all(math.isfinite(v) and v > 1 for v in ppl.values())
    # the bootstrap's point estimates are the perplexity ratios, computed another way
    assert math.isclose(
        seed["control_minus_retro_nats_per_token"]["mean"],
        math.log(ppl["control_trained_without_retrieval"] / ppl["retro_with_retrieval"]),
        abs_tol=1e-9,
    )
    assert math.isclose(
        seed["retro_off_minus_retro_nats_per_token"]["mean"],
        math.log(ppl["retro_without_retrieval"] / ppl["retro_with_retrieval"]),
        abs_tol=1e-9,
    )
    assert seed["retrieval_gain_nats"]["copyable_tokens"] > 0
    assert report["retro_beats_control_in_seeds"].endswith("of 1")

    # retrofitting the control with `retlm retrofit`: with retrieval off it stays the control exactly
    # (asserted inside), at every checkpoint; every bucket's tokens add up to the held-out tokens
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    retrofit = importlib.import_module("retrofit")
    retrofit.main(["--work-dir", str(work), "--seed", "0", "--steps", "1,2", "--batch-size", "2", "--quiet"])
    fitted = json.loads((work / "retrofit-seed0.json").read_text())
    assert fitted["steps"] == [1, 2] and set(fitted["retrofit"]) == {"1", "2"}
    control_bpb = fitted["trained_pair"][-1]["bits_per_byte"]["control"]
    control_nats = math.log(ppl["control_trained_without_retrieval"]) * seed["heldout_tokens"]
    control_bits = control_bpb * fitted["trained_pair"][-1]["bytes"]
    assert math.isclose(math.log(2) * control_bits, control_nats, rel_tol=1e-6)
    for step in ("1", "2"):
        rows = fitted["retrofit"][step]["buckets"]
        assert rows[-1]["bucket"] == "all" and rows[-1]["tokens"] == seed["heldout_tokens"]
        assert sum(r["tokens"] for r in rows[:-1]) == rows[-1]["tokens"]
        assert rows[-1]["bits_per_byte"]["base"] == control_bpb
        assert all(math.isfinite(v) for v in rows[-1]["bits_per_byte"].values())
    assert "all" in fitted["trend_of_gain"]

    # scoring the saved checkpoints again without training (--score-only), retrieval off checked at the
    # last one only (--check-base-once), gives the same figures; a step with no checkpoint is refused
    again = work / "again.json"
    retrofit.main(
        ["--work-dir", str(work), "--steps", "1,2", "--batch-size", "2", "--quiet", "--score-only"]
        + ["--check-base-once", "--out", str(again)]
    )
    rescored = json.loads(again.read_text())
    assert rescored["retrofit"] == fitted["retrofit"] and rescored["trend_of_gain"] == fitted["trend_of_gain"]
    try:
        retrofit.main(["--work-dir", str(work), "--steps", "1,3", "--quiet", "--score-only"])
    except SystemExit as err:
        assert "no checkpoint of step(s) [3]" in str(err)
    else:
        raise AssertionError("--score-only scored a checkpoint that does not exist")


@pytest.mark.heavy
def test_gpt2_trained_from_scratch_then_retrofitted(tmp_path, monkeypatch):
    """experiments/gpt2_scratch.py on a tiny database: the GPT-2 base never trains on a held-out document,
    `retlm retrofit --base` takes its folder, retrieval off is the base exactly, and the report has every
    bucket with paired intervals at every checkpoint."""
    from retlm.cli.main import main as cli
    from retlm.data import sequence_doc_ids
    from retlm.demo import DemoOptions, build_database
    from retlm.training import load_model
    from retlm.training.evaluation import count_bytes, select_split
    from retlm.training.leakage import token_nll

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    gpt2_scratch = importlib.import_module("gpt2_scratch")
    retrofit = importlib.import_module("retrofit")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):
        topic = ["rivers", "stars", "bread"][i % 3]
        (corpus / f"d{i}.txt").write_text(
            " ".join(f"Note {i}.{j} is about {topic} in May." for j in range(16))
        )
    db = build_database(
        DemoOptions(
            work_dir=tmp_path, corpus=corpus, seq_len=64, chunk_size=16, tokenizer="gpt2", progress=False
        )
    )
    work = tmp_path / "work"
    tiny = ["--layers", "2", "--width", "32", "--heads", "2", "--base-batch-size", "2", "--batch-size", "2"]
    gpt2_scratch.main(
        [
            "--db",
            str(db.path),
            "--work-dir",
            str(work),
            "--base-steps",
            "3",
            "--steps",
            "1,2",
            "--quiet",
            *tiny,
        ]
    )
    report = json.loads((work / "report.json").read_text())

    # the base: a plain GPT2LMHeadModel in safetensors, trained 3 steps on the training documents only
    base_dir = work / "gpt2" / "model"
    assert (base_dir / "model.safetensors").is_file()
    base = load_model(base_dir)
    assert type(base).__name__ == "GPT2LMHeadModel" and base.config.n_layer == 2
    assert report["base"]["steps"] == 3 and report["base"]["tokens"] == 3 * 2 * 64
    heldout_docs = report["base"]["split"]["heldout_docs"]
    assert heldout_docs and base.config.retlm_data["split"]["heldout_docs"] == heldout_docs
    seq_docs = sequence_doc_ids(db)
    held = np.isin(seq_docs, heldout_docs)
    assert (
        report["base"]["train_sequences"] == int((~held).sum()) and report["heldout_sequences"] == held.sum()
    )
    assert report["base"]["train_documents"] + len(heldout_docs) == len(np.unique(seq_docs))
    # the retrofit kept the base's split, so it trains on the same sequences
    fitted = load_model(work / "retrofit" / "checkpoint-2")
    assert fitted.config.retlm_data["split"] == report["base"]["split"]
    assert report["retrofit_train_sequences"] == report["base"]["train_sequences"]

    # retrieval off gives the plain GPT-2's per-target losses exactly, and the report's base bpb is its own
    heldout = select_split(
        "heldout", retrieval_helps.database_sequences(db, base), db, base.config.retlm_data
    )
    pad, eos = int(db.pad_id), int(db.eos_id)
    plain, labels = token_nll(base, heldout, pad_id=pad, retrieval=False, eos_id=eos)
    off, _ = token_nll(fitted, heldout, pad_id=pad, retrieval=False, eos_id=eos)
    on, _ = token_nll(fitted, heldout, pad_id=pad, retrieval=True, eos_id=eos)
    assert np.array_equal(off, plain) and not np.array_equal(on, plain)
    n_bytes = count_bytes(heldout, db.tokenizer, pad_id=pad, eos_id=eos)
    for step in ("1", "2"):
        rows = report["retrofit"][step]["buckets"]
        assert [r["bucket"] for r in rows] == [*retrofit.NAMES, "all"]
        assert rows[-1]["bytes"] == n_bytes and rows[-1]["tokens"] == int((labels != -100).sum())
        assert sum(r["tokens"] for r in rows[:-1]) == rows[-1]["tokens"]
        assert sum(r["chunks"] for r in rows[:-1]) == rows[-1]["chunks"]
        assert all((r["chunks"] > 0) == (r["tokens"] > 0) for r in rows)
        assert math.isclose(
            rows[-1]["bits_per_byte"]["base"], plain.sum() / math.log(2) / n_bytes, rel_tol=1e-12
        )
        for row in rows:
            if "bits_per_byte" not in row:
                continue  # a bucket with no chunk
            assert set(row["bits_per_byte"]) == {"real_neighbors", "other_neighbors", "base"}
            for pair in ("base_minus_real", "other_minus_real"):
                low, high = row[pair]["ci95"]
                assert low <= row[pair]["mean"] <= high
    assert "all" in report["trend_of_gain"] and "all" in report["trend_of_neighbor_gain"]
    assert report["tokens_per_step"] == 2 * 64

    # `retlm retrofit --base` takes the run directory as it is
    code = cli(
        ["retrofit", "--base", str(work / "gpt2"), "--db", str(db.path), "--out", str(tmp_path / "cli-run")]
        + ["--max-steps", "1", "--batch-size", "2", "--no-progress", "--save-every", "0"]
    )
    assert code in (0, None) and (tmp_path / "cli-run" / "model" / "model.safetensors").is_file()
