"""`retlm demo` end to end on a tiny corpus: it finishes, writes its report and plot, resumes after a
kill, reuses finished work, and refuses bad input with a clear message and the right exit code."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TINY_MODEL = """\
decoder: retnet
enc_dim: 32
enc_depth: 1
dec_dim: 32
dec_depth: 2
dec_cross_attn_layers: [2]
heads: 2
dim_head: 16
max_seq_len: 512
"""
TOPICS = ["rivers and lakes", "mountains and snow", "stars and planets", "bread and ovens", "ships and sails"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    for i in range(24):
        topic = TOPICS[i % len(TOPICS)]
        text = " ".join(
            f"Note {i}.{j} tells of {topic}, and how the {topic} change with the seasons." for j in range(12)
        )
        (folder / f"doc{i:02d}.txt").write_text(text)
    return folder


def demo_args(corpus, work, model_yaml, minutes="0.05", prompt=(), pretrained="none"):
    return [
        "demo",
        "--corpus",
        str(corpus),
        "--work-dir",
        str(work),
        "--minutes",
        minutes,
        "--model-config",
        str(model_yaml),
        "--seq-len",
        "64",
        "--chunk-size",
        "16",
        "--batch-size",
        "2",
        "--eval-sequences",
        "8",
        "--max-new-tokens",
        "40",
        *prompt,
        "--pretrained",
        str(pretrained),
        "--pretrained-tokens",
        "96",
        "--no-progress",
    ]


def run_cli(args, **kwargs):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "retlm", *args], capture_output=True, text=True, env=env, timeout=600, **kwargs
    )


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A tiny random GPT-2 with GPT-2's tokenizer, saved as an HF folder: the demo's pretrained LM in tests
    (SmolLM2 itself takes minutes on 2 cores)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from retlm.tokenization import load_tokenizer

    folder = tmp_path_factory.mktemp("tiny-lm")
    tokenizer = load_tokenizer("gpt2")
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=1024, n_embd=32, n_layer=2, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model_yaml(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny.yaml"
    path.write_text(TINY_MODEL)
    return path


@pytest.mark.heavy
def test_demo_runs_end_to_end_and_a_second_run_reuses_everything(corpus, model_yaml, tiny_lm, tmp_path):
    work = tmp_path / "work"
    first = run_cli(demo_args(corpus, work, model_yaml, pretrained=tiny_lm))
    assert first.returncode == 0, first.stderr[-3000:]
    report = json.loads((work / "report.json").read_text())
    heldout = report["heldout"]
    assert heldout["tokens"] > 0 and heldout["with_retrieval"]["perplexity"] > 1
    assert heldout["without_retrieval"]["perplexity"] > 1
    assert (work / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["training"]["steps"] > 0
    assert heldout["with_retrieval"]["bits_per_byte"] > 0 and heldout["bytes"] > heldout["tokens"]
    lines = first.stdout.strip().splitlines()
    assert lines[-3].startswith("held-out perplexity with retrieval:") and "bits per byte" in lines[-3]
    assert lines[-1].startswith("ratio (without / with):")
    # two prompts from held-out documents, cased text, every neighbor under its document's name
    model_config = json.loads((work / "run" / "model" / "config.json").read_text())
    heldout_docs = set(model_config["retlm_data"]["split"]["heldout_docs"])
    generations = report["generations"]
    assert len(generations) == 2 and {g["doc_id"] for g in generations} <= heldout_docs
    for i, g in enumerate(generations, 1):
        assert g["prompt"].startswith("Note ") and g["text"].startswith(g["prompt"])
        assert f"=== prompt {i} of 2 (held out: {g['document']}) ===" in first.stdout
        neighbors = [n for chunk in g["chunks"] for n in chunk["neighbors"]]
        assert neighbors and all(n["doc_name"].startswith("doc") for n in neighbors)
        assert all(n["doc_id"] != g["doc_id"] for n in neighbors)  # the prompt's own document is excluded
    assert "chunk 0: (of the prompt)" in first.stdout and "  neighbor 1: doc" in first.stdout
    assert "    | Note " in first.stdout
    # the pretrained LM first: held-out bits per byte three ways, then its continuations with sources
    pretrained = report["pretrained"]
    scores = pretrained["heldout"]
    for variant in ("without_retrieval", "with_retrieval", "unrelated_neighbors"):
        assert scores[variant]["bits_per_byte"] > 0 and scores[variant]["tokens"] > 0
    assert first.stdout.index("[2/6] pretrained LM") < first.stdout.index("[4/6] model with retrieval")
    assert len(pretrained["generations"]) == 2
    for g in pretrained["generations"]:
        read = [n for step in g["retrievals"] for n in step["neighbors"]]
        assert read and all(n["doc_id"] != g["doc_id"] for n in read)
    assert [g["prompt"] for g in pretrained["generations"]] == [g["prompt"] for g in generations]
    # the last lines: both models side by side
    table = lines[-6:-3]
    header = "held-out bits per byte  without retrieval  with retrieval  unrelated neighbors"
    assert table[0].split() == header.split()
    assert table[1].startswith(f"{tiny_lm} (pretrained, frozen)")
    assert table[2].startswith("RETRO trained here")

    second = run_cli(demo_args(corpus, work, model_yaml, prompt=["--prompt", "Note 3.1 tells of"]))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "database: reusing" in second.stdout and "reused" in second.stdout
    again = json.loads((work / "report.json").read_text())
    assert again["heldout"] == report["heldout"]
    assert again["training"]["steps"] == report["training"]["steps"]
    assert [g["prompt"] for g in again["generations"]] == ["Note 3.1 tells of"]

    # a work directory whose database was built with another tokenizer is a one-line error
    third = run_cli([*demo_args(corpus, work, model_yaml), "--tokenizer", "bert"])
    assert third.returncode == 1 and "was built with tokenizer 'gpt2', not 'bert'" in third.stderr
    assert len(third.stderr.strip().splitlines()) == 1


@pytest.mark.heavy
def test_demo_resumes_after_a_kill(corpus, model_yaml, tmp_path):
    work = tmp_path / "work"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "retlm", *demo_args(corpus, work, model_yaml, "0.3")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    deadline = time.time() + 300
    while time.time() < deadline and not list((work / "run").glob("checkpoint-*")):
        assert proc.poll() is None, proc.communicate()[1].decode()[-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (work / "db" / "manifest.json").is_file() and not (work / "report.json").exists()
    resumed = run_cli(demo_args(corpus, work, model_yaml, "0.3"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "database: reusing" in resumed.stdout
    assert json.loads((work / "report.json").read_text())["training"]["steps"] > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--minutes", "0"], "--minutes must be positive"),
        (["--minutes", "-1"], "--minutes must be positive"),
        (["--corpus", "/nonexistent/retlm-corpus"], "no such folder"),
    ],
)
@pytest.mark.heavy
def test_demo_bad_usage_exits_2_without_traceback(args, message, tmp_path):
    result = run_cli(["demo", "--work-dir", str(tmp_path / "w"), *args])
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.heavy
def test_demo_empty_corpus_is_usage_and_read_only_work_dir_fails_with_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli(["demo", "--corpus", str(empty), "--work-dir", str(tmp_path / "w")])
    assert result.returncode == 2 and "holds no file" in result.stderr and "Traceback" not in result.stderr

    if os.geteuid() == 0:  # root writes through mode bits; sysfs refuses everyone
        read_only = Path("/sys/retlm-demo-test")
    else:
        read_only = tmp_path / "ro"
        read_only.mkdir()
        read_only.chmod(0o555)
    (tmp_path / "doc.txt").write_text("some text")
    result = run_cli(["demo", "--work-dir", str(read_only), "--corpus", str(tmp_path)])
    assert result.returncode == 1, result.stderr
    assert "is not writable" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_prose_prompt_cuts_at_the_last_sentence_end_and_skips_chunks_without_one():
    from retlm.demo import prose_prompt

    prose = "Open a gzip file.  The mode is 'rb' by default (e.g. binary).\nThe filename argument can be"
    assert prose_prompt(prose) == "Open a gzip file.  The mode is 'rb' by default (e.g. binary)."
    assert prose_prompt("A heading\n=========\n+----+\n| ID |\n+----+\n") is None  # a table: no sentence
    # a sentence end that would keep less than half of the chunk is not a prompt either
    assert prose_prompt("Notes. " + "x" * 40) is None
    assert prose_prompt("Version 3.12 is out! Then") == "Version 3.12 is out!"  # "3.12": not an end
