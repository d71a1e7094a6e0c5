"""`retlm train` and `retlm eval` on a real RetrievalDatabase (GPT-2 tokens, tiny random embedder), and on
one built the seed's way (`--tokenizer bert`)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import yaml
from training_helpers import build_real_database, tiny_bert_embedder, tiny_model_config

from retlm.cli.main import main
from retlm.training import read_metrics

TRAIN_FLAGS = ["--batch-size", "4", "--lr", "3e-3", "--no-progress"]


@pytest.fixture(scope="module")
def dbs(tmp_path_factory, real_db):
    return tmp_path_factory.mktemp("real"), real_db


@pytest.fixture(scope="module")
def model_yaml(dbs):
    root, _ = dbs
    config = {k: v for k, v in tiny_model_config().items() if k not in ("num_tokens", "max_seq_len")}
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def run_dir(dbs, model_yaml):
    root, db = dbs
    out = root / "run"
    code = main(
        [
            "train",
            "--db",
            str(db.path),
            "--model-config",
            str(model_yaml),
            "--out",
            str(out),
            "--max-steps",
            "6",
            "--eval-every",
            "3",
            "--save-every",
            "3",
            *TRAIN_FLAGS,
        ]
    )
    assert code == 0
    return out


@pytest.mark.heavy
def test_train_command_writes_a_run(run_dir):
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if "eval_loss" in r] == [3, 6]
    run = json.loads((run_dir / "retlm_run.json").read_text())
    assert run["status"] == "finished" and run["fixed"]["database"]["vocab_size"] == 50257
    assert (run_dir / "model" / "model.safetensors").is_file()


@pytest.mark.heavy
def test_every_model_folder_holds_its_tokenizer(run_dir):
    from transformers import AutoTokenizer, pipeline

    import retlm.models.retro  # noqa: F401  (registers RETRO with the Auto classes)

    for folder in (run_dir / "model", run_dir / "checkpoint-6"):
        tokenizer = AutoTokenizer.from_pretrained(folder)
        assert tokenizer("Hello world")["input_ids"] == [15496, 995]
    generator = pipeline("text-generation", str(run_dir / "model"), device="cpu")
    out = generator("The with statement", max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert out.startswith("The with statement") and len(out) > len("The with statement")


@pytest.mark.heavy
def test_eval_command_prints_a_table_and_json(dbs, run_dir, capsys, tmp_path):
    _, db = dbs
    assert (
        main(
            [
                "eval",
                str(run_dir),
                "--db",
                str(db.path),
                "--no-progress",
                "--output",
                str(tmp_path / "eval.json"),
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    assert "with retrieval" in table and "without retrieval" in table and "perplexity" in table
    assert main(["eval", str(run_dir / "checkpoint-6"), "--db", str(db.path), "--json", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result == json.loads((tmp_path / "eval.json").read_text()) | {"checkpoint": result["checkpoint"]}
    assert result["split"] == "heldout" and result["tokens"] > 0 and result["bytes"] > result["tokens"]
    for key in ("with_retrieval", "without_retrieval"):
        assert 1.0 < result[key]["perplexity"] < 50257 and result[key]["bits_per_byte"] > 0


def test_train_options_from_a_yaml_config_file(dbs, model_yaml, tmp_path, capsys):
    _, db = dbs
    options = tmp_path / "train.yaml"
    options.write_text(
        yaml.safe_dump({"max-steps": 2, "batch_size": 4, "save_every": 0, "no_progress": True})
    )
    out = tmp_path / "run"
    argv = ["train", "--config", str(options), "--db", str(db.path), "--model-config", str(model_yaml)]
    argv += ["--out", str(out)]
    assert main(argv) == 0
    assert "trained 2/2 steps" in capsys.readouterr().out
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-2"]  # the end is always saved
    assert main(argv) == 0  # the same command again
    assert "already finished (2 steps); nothing to do" in capsys.readouterr().out


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--minutes", "0"], "minutes (the time budget) must be positive, got 0.0"),
        (["--schedule", "step"], "argument --schedule: invalid choice: 'step'"),
        (["--max-steps", "-3"], "max_steps must be positive, got -3"),
        (["--train-fraction", "1.5"], "train_fraction must be in (0, 1], got 1.5"),
    ],
)
def test_bad_train_usage_exits_2_without_traceback(dbs, tmp_path, capsys, flags, message):
    _, db = dbs
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--db", str(db.path), "--out", str(tmp_path / "run"), *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_missing_database_and_checkpoint_are_usage_errors(tmp_path, capsys):
    for argv in (
        ["train", "--db", str(tmp_path / "nope"), "--out", str(tmp_path / "run")],
        ["eval", str(tmp_path / "nope"), "--db", str(tmp_path)],
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "no retrieval database at" in err and "MODEL: no such file or folder" in err


def test_failures_exit_1_with_one_line(dbs, run_dir, model_yaml, tmp_path, capsys):
    root, db = dbs
    (tmp_path / "file").write_text("")
    code = main(
        [
            "train",
            "--db",
            str(db.path),
            "--model-config",
            str(model_yaml),
            "--out",
            str(tmp_path / "file"),
            "--max-steps",
            "1",
            *TRAIN_FLAGS,
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and "exists and is not a directory" in err and len(err.strip().splitlines()) == 1

    # a database built with another LM tokenizer (the seed's WordPiece) is refused
    other = bert_db(root)
    capsys.readouterr()  # what building it printed
    assert main(["eval", str(run_dir), "--db", str(other.path), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert (
        "tokenizer mismatch: the model was trained with tokenizer 'gpt2' but the database uses 'bert'" in err
    )
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def bert_db(root):
    path = root / "bert-db"
    if (path / "manifest.json").is_file():
        from retlm import RetrievalDatabase

        return RetrievalDatabase.open(path)
    return build_real_database(path, tiny_bert_embedder(root / "embedder"), tokenizer="bert")


def test_a_bert_database_still_trains_and_evaluates(dbs, model_yaml, capsys):
    root, _ = dbs
    db = bert_db(root)
    assert (db.pad_id, db.eos_id, db.manifest["tokenizer"]["vocab_size"]) == (0, 102, 30522)
    out = root / "bert-run"
    assert (
        main(
            [
                "train",
                "--db",
                str(db.path),
                "--model-config",
                str(model_yaml),
                "--out",
                str(out),
                "--max-steps",
                "2",
                *TRAIN_FLAGS,
            ]
        )
        == 0
    )
    assert "trained 2/2 steps" in capsys.readouterr().out
    assert main(["eval", str(out), "--db", str(db.path), "--json", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 1.0 < result["with_retrieval"]["perplexity"] < 30522 and result["bytes"] > result["tokens"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_out_dir_exits_1(dbs, model_yaml, tmp_path, capsys):
    _, db = dbs
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        assert (
            main(
                [
                    "train",
                    "--db",
                    str(db.path),
                    "--model-config",
                    str(model_yaml),
                    "--out",
                    str(out),
                    "--max-steps",
                    "1",
                    *TRAIN_FLAGS,
                ]
            )
            == 1
        )
        assert "is not writable" in capsys.readouterr().err
    finally:
        out.chmod(0o700)


def test_generate_command_shows_each_neighbor_under_its_document(dbs, run_dir, capsys):
    _, db = dbs
    assert (
        main(
            [
                "generate",
                str(run_dir),
                "--db",
                str(db.path),
                "The with statement",
                "--max-new-tokens",
                "20",
                "--show-neighbors",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("The with statement")
    assert "chunk 0: (generated)" in out and "chunk 1: (generated)" in out
    assert "  neighbor 1: doc-" in out and "(score " in out and "\n    | " in out


def test_generate_text_can_exclude_the_prompts_document(dbs, run_dir):
    from retlm.generation import generate_text
    from retlm.training import load_model

    _, db = dbs
    model = load_model(run_dir)
    doc = 5
    first = int(np.flatnonzero(np.asarray(db.doc_ids) == doc)[0])
    prompt = db.chunk_text(first) + db.chunk_text(first + 1)  # two chunks of document 5
    free = generate_text(model, db, prompt, max_new_tokens=8, seed=0)
    assert any(n.doc_id == doc for _, ns in free.chunks for n in ns)  # it finds its own text
    excluded = generate_text(model, db, prompt, max_new_tokens=8, seed=0, exclude_doc_id=doc)
    neighbors = [n for _, ns in excluded.chunks for n in ns]
    assert neighbors and all(n.doc_id != doc and n.doc_name == db.doc_name(n.doc_id) for n in neighbors)
    assert excluded.prompt_chunks == 2 and excluded.text.startswith(prompt)
