"""`retlm train` unchanged under `torchrun --nproc_per_node 2` (DDP, gloo on CPU), on a real database."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import yaml
from training_helpers import tiny_model_config

from retlm.training import evaluate, read_metrics


@pytest.mark.heavy
def test_torchrun_two_processes_train_and_evaluate_consistently(tmp_path, real_db):
    db = real_db
    model_yaml = tmp_path / "tiny.yaml"
    model_yaml.write_text(yaml.safe_dump({k: v for k, v in tiny_model_config().items() if k != "num_tokens"}))
    run_dir = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "retlm",
        "train",
        "--db",
        str(db.path),
        "--model-config",
        str(model_yaml),
        "--out",
        str(run_dir),
        "--max-steps",
        "6",
        "--eval-every",
        "3",
        "--save-every",
        "3",
        "--eval-sequences",
        "0",
        "--batch-size",
        "4",
        "--lr",
        "3e-3",
        "--no-progress",
    ]
    # A session of its own, so that a hang can be ended together with the workers torchrun started.
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("torchrun did not finish within 300 s")
    assert proc.returncode == 0, stderr[-3000:]
    assert stdout.count("trained 6/6 steps") == 1  # the main process reports and writes the files

    run = json.loads((run_dir / "retlm_run.json").read_text())
    assert run["fixed"]["world_size"] == 2 and run["status"] == "finished" and run["global_step"] == 6
    records = read_metrics(run_dir / "metrics.jsonl")
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 6, "the main process alone writes one record per step"
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    assert (run_dir / "model" / "model.safetensors").is_file()

    # The in-training evaluation shards the held-out sequences over the two ranks and all-reduces the
    # sums; one process scoring them all must find the same per-token loss.
    last_eval = [r for r in records if "eval_loss" in r][-1]
    assert last_eval["step"] == 6
    result = evaluate(run_dir, db, progress=False)
    assert result["with_retrieval"]["loss"] == pytest.approx(last_eval["eval_loss"], rel=1e-5)
    assert result["without_retrieval"]["loss"] == pytest.approx(last_eval["eval_loss_no_retrieval"], rel=1e-5)
