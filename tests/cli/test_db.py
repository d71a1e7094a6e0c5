"""`retlm build-db | search | db-info`: in-process, by exit code in a subprocess, and killed mid-build."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from retlm.cli.main import main
from retlm.demo.corpus import pydoc_topics

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("texts")
    for name, text in list(pydoc_topics())[:8]:
        (folder / f"{name}.txt").write_text(text[:1200])
    return folder


@pytest.fixture(scope="module")
def db_path(text_dir, tiny_encoder, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "db"
    code = main(
        [
            "build-db",
            str(text_dir),
            "--out",
            str(out),
            "--chunk-size",
            "16",
            "--seq-len",
            "64",
            "--embedder",
            tiny_encoder,
            "--no-progress",
        ]
    )
    assert code == 0
    return out


def retlm(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "retlm", *map(str, args)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=timeout,
    )


@pytest.mark.heavy
def test_search_and_info_in_process(db_path, capsys):
    capsys.readouterr()
    assert main(["search", str(db_path), "the assert statement", "-k", "2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["query"] == "the assert statement" and len(rows[0]["neighbors"]) == 2
    assert main(["search", str(db_path), "the assert statement", "-k", "3"]) == 0
    out = capsys.readouterr().out
    # each hit under its source document's name, then its text line by line, layout kept
    assert re.search(r"^  1\. topic-\S+\.txt  score ", out, re.M)
    assert re.search(r"^  3\. \S+  score ", out, re.M)
    assert "     | " in out
    assert main(["db-info", str(db_path), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "verified" in out and "Flat" in out and "gpt2 (50257 tokens" in out and "re-tokenized" in out
    assert main(["db-info", str(db_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["chunk_size"] == 16


@pytest.mark.heavy
def test_exit_codes_and_messages(db_path, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = retlm("build-db", empty, "--out", tmp_path / "x")
    assert result.returncode == 2 and "matches the glob" in result.stderr
    result = retlm("search", db_path, "q", "-k", "0")
    assert result.returncode == 2 and "-k must be a positive integer" in result.stderr
    result = retlm("build-db", empty, "--out", tmp_path / "y", "--chunk-size", "0")
    assert result.returncode == 2 and "chunk_size" in result.stderr
    result = retlm("db-info", tmp_path)
    assert result.returncode == 1 and "not a retrieval database" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    result = retlm("build-db", "--help")
    assert result.returncode == 0
    options = ("--chunk-size", "--neighbors", "--tokenizer", "--embedder", "--pooling", "--shard", "--stage")
    for option in (*options, "--glob"):
        assert option in result.stdout


@pytest.mark.heavy
def test_killed_build_resumes_byte_identical(text_dir, tmp_path):
    """SIGKILL a real build while it embeds (MiniLM, small batches), re-run it, compare every file."""
    args = ["--chunk-size", "16", "--seq-len", "64", "--batch-size", "1", "--no-progress"]  # blocks of 16
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    assert retlm("build-db", text_dir, "--out", reference, *args).returncode == 0

    proc = subprocess.Popen(
        [sys.executable, "-m", "retlm", "build-db", str(text_dir), "--out", str(resumed), *args],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    marker = resumed / "embeddings.dat.progress"
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, "the build finished before it could be killed"
        assert time.monotonic() < deadline, "the build never reached the embedding stage"
        try:
            if json.loads(marker.read_text())["rows_done"] >= 16:
                break
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (resumed / "manifest.json").exists() and (resumed / "embeddings.dat.partial").exists()

    assert retlm("build-db", text_dir, "--out", resumed, *args).returncode == 0
    files = sorted(p.relative_to(reference) for p in reference.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(resumed) for p in resumed.rglob("*") if p.is_file())
    for name in files:
        assert (reference / name).read_bytes() == (resumed / name).read_bytes(), name
    assert Path(reference / "embeddings.dat").stat().st_size > 0
