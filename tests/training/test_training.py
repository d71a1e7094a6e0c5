"""Training and evaluation on a small synthetic database (tests/helpers/training_helpers.py).

Numbers are checked against independent references: the document split against the sequences' own
document ids, evaluation against a float64 recomputation of the NLL, bytes against the toy tokenizer's
one-byte-per-token rule.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from training_helpers import (
    EOS,
    FIRST_WORD,
    PAD,
    ToyTokenizer,
    open_twin_database,
    tiny_model_config,
    write_twin_database,
)

from retlm.data import DocumentSplit, RETRODataset, sequence_doc_ids, split_datasets
from retlm.models.auto import latest_checkpoint
from retlm.training import evaluate, format_table, load_model, read_metrics, train

FAST = dict(batch_size=4, lr=3e-3, log_every=1, progress=False)


@pytest.fixture(scope="module")
def trained(db, tmp_path_factory):
    """One short run shared by the tests that only read its outputs."""
    run_dir = tmp_path_factory.mktemp("run") / "run"
    result = train(db, tiny_model_config(), run_dir, max_steps=12, eval_every=6, save_every=6, **FAST)
    return run_dir, result


# ---- the split ----


def test_document_split_holds_out_whole_documents_and_hides_them_from_neighbors(db):
    split = DocumentSplit.make(db.doc_ids, train_fraction=0.75, seed=3)
    n_docs = len(np.unique(db.doc_ids))
    assert len(split.heldout_docs) == round(0.25 * n_docs)
    assert DocumentSplit.make(db.doc_ids, 0.75, 3).heldout_docs.tolist() == split.heldout_docs.tolist()
    assert DocumentSplit.make(db.doc_ids, 0.75, 4).heldout_docs.tolist() != split.heldout_docs.tolist()

    dataset = RETRODataset.from_database(db)
    train_set, heldout_set = split_datasets(dataset, db, split)
    docs_of_seq = sequence_doc_ids(db)
    assert set(docs_of_seq[train_set.indices]).isdisjoint(split.heldout_docs)
    assert set(docs_of_seq[heldout_set.indices]) == set(split.heldout_docs)
    assert len(train_set) + len(heldout_set) == len(dataset)

    # A training sequence sees a neighbor only if it comes from a training document.
    c = db.chunk_size
    for i in range(len(train_set)):
        _, retrieved = train_set[i]
        _, unmasked = dataset[int(train_set.indices[i])]
        first = int(db.seqs[train_set.indices[i]])
        neighbors = np.asarray(db.knn[first : first + retrieved.shape[0]])
        hidden = np.isin(np.asarray(db.doc_ids)[neighbors], split.heldout_docs)
        assert (retrieved[torch.from_numpy(hidden)] == PAD).all()
        assert torch.equal(retrieved[torch.from_numpy(~hidden)], unmasked[torch.from_numpy(~hidden)])
        assert retrieved.shape[-1] == 2 * c


def test_split_rejects_bad_fractions(db):
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="train_fraction"):
            DocumentSplit.make(db.doc_ids, bad, 0)
    with pytest.raises(ValueError, match="at least 2 documents"):
        DocumentSplit.make(np.zeros(5, dtype=np.int32), 0.9, 0)
    assert len(DocumentSplit.make(db.doc_ids, 1.0, 0).heldout_docs) == 0


# ---- the training run ----


@pytest.mark.heavy
def test_training_logs_every_step_evaluates_and_commits_checkpoints(trained):
    run_dir, result = trained
    assert result.global_step == 12 and result.stop_reason == "max_steps"
    records = read_metrics(run_dir / "metrics.jsonl")
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert sorted(losses) == list(range(1, 13))
    assert np.mean([losses[s] for s in (10, 11, 12)]) < np.mean([losses[s] for s in (1, 2, 3)]) - 0.2
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [6, 12]
    assert all(r["eval_perplexity"] == pytest.approx(math.exp(r["eval_loss"])) for r in evals)
    assert all("eval_loss_no_retrieval" in r for r in evals)

    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-6"]
    for folder in (run_dir / "checkpoint-12", run_dir / "model"):
        assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
        assert not (folder / "training_args.bin").exists()  # no pickle left for anyone to unpickle
    assert not (run_dir / ".staging").exists()
    run = json.loads((run_dir / "retlm_run.json").read_text())
    assert run["status"] == "finished" and run["global_step"] == 12
    config = json.loads((run_dir / "model" / "config.json").read_text())
    assert config["retlm_data"]["tokenizer"] == ToyTokenizer.name_or_path
    assert config["retlm_data"]["split"]["heldout_docs"] == run["split"]["heldout_docs"]


def test_second_call_returns_the_finished_run_without_training(trained, db):
    run_dir, first = trained
    before = (run_dir / "metrics.jsonl").read_text()
    again = train(db, tiny_model_config(), run_dir, max_steps=12, eval_every=6, save_every=6, **FAST)
    assert again.stop_reason == "already_finished" and again.global_step == 12
    assert (run_dir / "metrics.jsonl").read_text() == before


def test_resume_refuses_changed_settings(trained, db):
    run_dir, _ = trained
    with pytest.raises(ValueError, match="batch_size: was 4, now 2"):
        train(db, tiny_model_config(), run_dir, max_steps=20, **{**FAST, "batch_size": 2})
    with pytest.raises(FileExistsError, match="already holds a training run"):
        train(db, tiny_model_config(), run_dir, max_steps=20, resume="never", **FAST)


# ---- evaluation ----


def _reference_nll(model, dataset, indices, retrieval: bool) -> tuple[float, int, int]:
    """float64 log-softmax, one sequence at a time; bytes by the toy tokenizer's rule."""
    nll, tokens, n_bytes = 0.0, 0, 0
    model.eval()
    with torch.no_grad():
        for i in indices:
            seq, retrieved = dataset[int(i)]
            logits = model(input_ids=seq[None, :-1], retrieved=retrieved[None] if retrieval else None).logits
            logp = torch.log_softmax(logits[0].double(), dim=-1)
            targets = seq[1:]
            scored = targets != PAD
            nll -= logp[scored.nonzero()[:, 0], targets[scored]].sum().item()
            tokens += int(scored.sum())
            n_bytes += int((targets >= FIRST_WORD).sum())
    return nll, tokens, n_bytes


def test_evaluate_matches_a_float64_reference_with_and_without_retrieval(trained, db):
    run_dir, _ = trained
    result = evaluate(run_dir, db, progress=False)
    model = load_model(run_dir)
    dataset = RETRODataset.from_database(db)
    heldout = json.loads((run_dir / "retlm_run.json").read_text())["split"]["heldout_docs"]
    indices = np.flatnonzero(np.isin(sequence_doc_ids(db), heldout))
    assert result["sequences"] == len(indices) and result["documents"] == len(heldout)
    for key, retrieval in (("with_retrieval", True), ("without_retrieval", False)):
        nll, tokens, n_bytes = _reference_nll(model, dataset, indices, retrieval)
        assert result["tokens"] == tokens and result["bytes"] == n_bytes
        assert result[key]["loss"] == pytest.approx(nll / tokens, rel=1e-5)
        assert result[key]["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
        assert result[key]["bits_per_byte"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-5)
    ratio = result["without_retrieval"]["perplexity"] / result["with_retrieval"]["perplexity"]
    assert result["perplexity_ratio"] == pytest.approx(ratio)
    table = format_table(result)
    assert "with retrieval" in table and "without retrieval" in table and "bits/byte" in table


def test_evaluate_splits_and_bad_input(trained, db, tmp_path):
    run_dir, _ = trained
    everything = evaluate(run_dir, db, split="all", progress=False)
    held = evaluate(run_dir, db, split="heldout", progress=False)
    trained_part = evaluate(run_dir, db, split="train", progress=False)
    assert everything["sequences"] == held["sequences"] + trained_part["sequences"]
    assert everything["tokens"] == held["tokens"] + trained_part["tokens"]
    one = evaluate(run_dir, db, max_sequences=1, progress=False)
    assert one["sequences"] == 1 and one["documents"] == 1
    with pytest.raises(ValueError, match="unknown split 'test'"):
        evaluate(run_dir, db, split="test")
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        evaluate(tmp_path / "nothing", db)
    with pytest.raises(FileNotFoundError, match="holds no model"):
        evaluate(tmp_path, db)


def test_tokenizer_and_chunking_mismatches_are_refused(trained, tmp_path):
    run_dir, _ = trained
    other = open_twin_database(write_twin_database(tmp_path / "other"))
    other.manifest["tokenizer"]["name"] = "bert-base-cased"
    with pytest.raises(
        ValueError,
        match="tokenizer mismatch: the model was trained with tokenizer "
        "'toy-letters' but the database uses 'bert-base-cased'",
    ):
        evaluate(run_dir, other)
    wider = open_twin_database(write_twin_database(tmp_path / "wider", vocab_size=80))
    with pytest.raises(ValueError, match="64-token vocabulary but the database's tokenizer has 80"):
        evaluate(run_dir, wider)
    rechunked = open_twin_database(write_twin_database(tmp_path / "rechunked", chunk_size=4, seq_len=32))
    with pytest.raises(ValueError, match="chunk_size=8 but the database was chunked with chunk_size=4"):
        evaluate(run_dir, rechunked)
    with pytest.raises(ValueError, match="model has 32 token embeddings but the database's tokenizer"):
        train(rechunked, {**tiny_model_config(), "num_tokens": 32, "chunk_size": 4}, tmp_path / "r")


# ---- the time budget ----


@pytest.mark.heavy
def test_time_budget_picks_the_steps_and_stops_with_a_checkpoint(db, tmp_path):
    run_dir = tmp_path / "run"
    budget_s = 6.0
    result = train(db, tiny_model_config(), run_dir, minutes=budget_s / 60, save_every=None, **FAST)
    run = json.loads((run_dir / "retlm_run.json").read_text())
    assert run["max_steps_source"] == "time_budget" and result.max_steps == run["max_steps"] >= 1
    assert result.stop_reason in ("time_budget", "max_steps")
    # the clock stops the run at the first step end past the budget; a step here takes well under 1 s
    assert result.elapsed_s < budget_s + 10.0  # loose: other jobs share these cores
    assert latest_checkpoint(run_dir).name == f"checkpoint-{result.global_step}"
    assert (run_dir / "model" / "model.safetensors").is_file()


@pytest.mark.heavy
def test_time_budget_callback_stops_at_the_budget(db, tmp_path):
    result = train(
        db, tiny_model_config(), tmp_path / "run", max_steps=10_000, minutes=3 / 60, save_every=None, **FAST
    )
    assert result.stop_reason == "time_budget" and result.global_step < 10_000
    assert 3.0 <= result.elapsed_s < 13.0  # 10_000 steps would take minutes
    assert latest_checkpoint(tmp_path / "run").name == f"checkpoint-{result.global_step}"


# ---- bad input ----


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(minutes=0), "minutes .*must be positive, got 0"),
        (dict(minutes=-1), "minutes .*must be positive"),
        (
            dict(schedule="exponential"),
            "unknown schedule 'exponential'; choose one of cosine, linear, constant",
        ),
        (dict(max_steps=0), "max_steps must be positive"),
        (dict(batch_size=0), "batch_size must be positive"),
        (dict(train_fraction=0), r"train_fraction must be in \(0, 1\]"),
        (dict(precision="fp8"), "unknown precision 'fp8'"),
        (dict(resume="sometimes"), "resume must be 'auto', 'never' or a checkpoint directory"),
        (dict(seq_len=20), "seq_len 20 must be a multiple of the database's chunk_size 8"),
        (dict(seq_len=64), "seq_len 64 is longer than the model's max_seq_len 32"),
    ],
)
def test_bad_training_options_are_refused(db, tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        train(db, tiny_model_config(), tmp_path / "run", **{**FAST, **options})


def test_bad_paths_are_refused(db, tmp_path):
    with pytest.raises(FileNotFoundError, match="no retrieval database at"):
        train(tmp_path / "missing-db", tiny_model_config(), tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="no model config 'retro-huge'"):
        train(db, "retro-huge", tmp_path / "run")
    (tmp_path / "a-file").write_text("")
    with pytest.raises(NotADirectoryError, match="exists and is not a directory"):
        train(db, tiny_model_config(), tmp_path / "a-file", max_steps=1, **FAST)
    if torch.cuda.is_available():
        return
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        train(db, tiny_model_config(), tmp_path / "run", precision="fp16", **FAST)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_run_directory_is_refused(db, tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match="is not writable"):
            train(db, tiny_model_config(), out, max_steps=1, **FAST)
    finally:
        out.chmod(0o700)


def test_eos_and_pad_constants_match_the_twin_database(db):
    # guards the reference above: EOS is scored (a real prediction), PAD is not
    assert db.eos_id == EOS and db.pad_id == PAD and EOS < FIRST_WORD


def test_builtin_model_configs(db):
    from retlm.models.retro import RetroConfig, RetroForCausalLM
    from retlm.training import builtin_configs
    from retlm.training.config import build_config, read_model_config

    assert {"retro-tiny", "retro-tiny-transformer", "retro-seed"} <= set(builtin_configs())
    tiny = read_model_config("retro-tiny")
    assert tiny["decoder"] == "retnet" and "chunk_size" not in tiny and "num_tokens" not in tiny
    assert {**read_model_config("retro-tiny-transformer"), "decoder": "retnet"} == {
        k: v for k, v in tiny.items() if k != "retnet_v_dim"
    }
    # the seed README's usage example, as written there
    seed = RetroConfig(**read_model_config("retro-seed"))
    names = (
        "chunk_size",
        "max_seq_len",
        "enc_dim",
        "enc_depth",
        "dec_dim",
        "dec_depth",
        "dec_cross_attn_layers",
        "heads",
        "dim_head",
        "dec_attn_dropout",
        "dec_ff_dropout",
    )
    assert [getattr(seed, n) for n in names] == [64, 2048, 896, 2, 796, 12, [3, 6, 9, 12], 8, 64, 0.25, 0.25]
    # completed from the database: vocabulary, chunking, padding and length
    config, _ = build_config("retro-tiny", db, seq_len=32)
    assert (config.num_tokens, config.chunk_size, config.pad_id, config.max_seq_len) == (64, 8, PAD, 32)
    assert isinstance(RetroForCausalLM(config), RetroForCausalLM)
    with pytest.raises(ValueError, match="chunk size mismatch"):
        build_config("retro-seed", db, seq_len=32)


def test_bf16_autocast_on_cpu_trains(db, trained, tmp_path):
    result = train(
        db, tiny_model_config(), tmp_path / "run", max_steps=3, precision="bf16", save_every=None, **FAST
    )
    run = json.loads((tmp_path / "run" / "retlm_run.json").read_text())
    assert run["options"]["precision"] == "bf16" and result.global_step == 3
    losses = [r["loss"] for r in read_metrics(result.metrics_file) if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    # same weights and first batch as the fp32 run: bf16 matmuls change the loss a little, not a lot
    fp32_first = next(r["loss"] for r in read_metrics(trained[0] / "metrics.jsonl") if "loss" in r)
    assert 0 < abs(losses[0] - fp32_first) < 0.05


@pytest.mark.heavy
def test_time_budget_counts_across_resumes(db, tmp_path):
    run_dir = tmp_path / "run"
    options = dict(max_steps=10_000, save_every=None, **FAST)
    first = train(db, tiny_model_config(), run_dir, minutes=2 / 60, **options)
    assert first.stop_reason == "time_budget"
    again = train(db, tiny_model_config(), run_dir, minutes=2 / 60, **options)
    assert again.stop_reason == "already_finished" and again.global_step == first.global_step
    # A budget 3 s beyond what the first run used (on a loaded box the first run can overshoot its 2 s by
    # seconds while it checkpoints, so a fixed 4 s budget could already be spent).
    budget_s = first.elapsed_s + 3.0
    longer = train(db, tiny_model_config(), run_dir, minutes=budget_s / 60, **options)
    assert longer.stop_reason == "time_budget" and longer.global_step > first.global_step
    assert longer.elapsed_s >= budget_s
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, longer.global_step + 1))
    # the clock of the resumed run starts where the first run's checkpoint left it, not at 0
    resumed = records[first.global_step]
    assert resumed["elapsed_s"] >= 2.0 and resumed["elapsed_s"] >= records[first.global_step - 1]["elapsed_s"]


def test_loss_curves_png(trained, tmp_path):
    from retlm.training import plot_loss_curves

    png = plot_loss_curves(trained[0] / "metrics.jsonl", tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="no loss records"):
        plot_loss_curves(tmp_path / "empty.jsonl", tmp_path / "none.png")


def test_unwritable_run_directory_is_refused_even_as_root(db, tmp_path, monkeypatch):
    # root writes into chmod-read-only folders, so make the write probe fail the way EACCES does
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("retlm.utils.tempfile.NamedTemporaryFile", refuse)
    with pytest.raises(PermissionError, match="run directory .* is not writable: Permission denied"):
        train(db, tiny_model_config(), tmp_path / "run", max_steps=1, **FAST)


def test_no_retrieval_baseline(db, tmp_path):
    run_dir = tmp_path / "baseline"
    train(
        db, tiny_model_config(), run_dir, max_steps=3, eval_every=3, retrieval=False, save_every=None, **FAST
    )
    last_eval = [r for r in read_metrics(run_dir / "metrics.jsonl") if "eval_loss" in r][-1]
    assert "eval_loss_no_retrieval" not in last_eval  # its eval_loss is already without retrieval
    result = evaluate(run_dir, db, progress=False)
    assert result["trained_with_retrieval"] is False
    assert result["without_retrieval"]["loss"] == pytest.approx(last_eval["eval_loss"], rel=1e-5)
    assert "trained without retrieval" in format_table(result)


def test_hf_trainer_resume_never_unpickles_arbitrary_objects():
    """Resume reads optimizer / scheduler / RNG states that HF Trainer saved with torch.save. Guard the
    claim in docs/training.md: every torch.load in the Trainer we run on passes weights_only=True."""
    import inspect
    import re

    import transformers.trainer

    source = inspect.getsource(transformers.trainer)
    calls = [m.start() for m in re.finditer(r"torch\.load\(", source)]
    assert calls, "expected the Trainer to load its states with torch.load"
    for start in calls:
        depth, end = 0, start
        for end in range(start + len("torch.load"), len(source)):
            depth += {"(": 1, ")": -1}.get(source[end], 0)
            if depth == 0:
                break
        assert "weights_only=True" in source[start:end], source[start : end + 1]


def test_a_kill_between_last_checkpoint_and_final_model_is_repaired(db, tmp_path):
    run_dir = tmp_path / "run"
    options = dict(save_every=2, **FAST)
    train(db, tiny_model_config(), run_dir, max_steps=2, **options)
    first_model = (run_dir / "model" / "model.safetensors").read_bytes()
    train(db, tiny_model_config(), run_dir, max_steps=4, **options)  # extends the run to 4 steps
    # simulate a kill after checkpoint-4 was committed but before model/ and the run file were updated
    import shutil

    shutil.rmtree(run_dir / "model")
    shutil.copytree(run_dir / "checkpoint-2", run_dir / "model")
    (run_dir / "model" / "retlm_step.json").write_text('{"global_step": 2}')
    again = train(db, tiny_model_config(), run_dir, max_steps=4, **options)
    assert again.stop_reason == "already_finished" and again.global_step == 4
    repaired = (run_dir / "model" / "model.safetensors").read_bytes()
    assert repaired == (run_dir / "checkpoint-4" / "model.safetensors").read_bytes() != first_model
