"""Resume after a kill continues the same loss curve: real processes, killed with SIGKILL.

An uninterrupted run and a run that is killed (once in the middle of a step, once in the middle of
writing a checkpoint) and resumed must log the same per-step losses and end with the same weights.
Dropout is on, so the resumed RNG state matters too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from retlm.training import read_metrics

CHILD = Path(__file__).resolve().parents[1] / "helpers" / "training_child.py"
MAX_STEPS = 14
# float32 CPU training from the same state runs the same kernels on the same numbers: we expect
# bit-identical losses and allow only float32 rounding noise.
LOSS_RTOL = 1e-6


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _run(db: Path, run_dir: Path, *extra: str) -> None:
    subprocess.run(
        [sys.executable, str(CHILD), str(db), str(run_dir), str(MAX_STEPS), *extra],
        check=True,
        env=_env(),
        timeout=300,
        capture_output=True,
    )


def _run_and_kill(db: Path, run_dir: Path, *hang: str) -> None:
    """Start a run that blocks at a chosen point, wait until it gets there, SIGKILL it."""
    marker = Path(str(run_dir) + ".hung")
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), str(db), str(run_dir), str(MAX_STEPS), *hang],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 300
    while not marker.exists():
        if proc.poll() is not None:
            stderr = proc.stderr.read().decode()[-2000:]
            pytest.fail(f"the run ended before reaching its kill point: {stderr}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the run never reached its kill point")
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    marker.unlink()


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


def _eval_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["eval_loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "eval_loss" in r}


@pytest.fixture(scope="module")
def db(twin_db) -> Path:
    return twin_db.path


@pytest.fixture(scope="module")
def reference(db, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    _run(db, run_dir)
    return run_dir


def _assert_same_run(run_dir: Path, reference: Path) -> None:
    expected, got = _losses(reference), _losses(run_dir)
    assert sorted(got) == list(range(1, MAX_STEPS + 1)), "every step logged exactly once"
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=LOSS_RTOL), f"loss differs at step {step}"
    assert _eval_losses(run_dir) == pytest.approx(_eval_losses(reference), rel=LOSS_RTOL)
    a = load_file(reference / "model" / "model.safetensors")
    b = load_file(run_dir / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.heavy
def test_kill_mid_step_then_resume_continues_the_same_loss_curve(db, reference, tmp_path):
    run_dir = tmp_path / "run"
    _run_and_kill(db, run_dir, "--hang-at-step", "6")  # checkpoints at 4; steps 5-6 logged, then killed
    assert [p.name for p in run_dir.glob("checkpoint-*")] == ["checkpoint-4"]
    assert max(_losses(run_dir)) == 6
    _run(db, run_dir)  # resume="auto"
    _assert_same_run(run_dir, reference)


@pytest.mark.heavy
def test_kill_while_writing_a_checkpoint_resumes_from_the_previous_one(db, reference, tmp_path):
    run_dir = tmp_path / "run"
    _run_and_kill(db, run_dir, "--hang-in-save", "8")  # checkpoint-8 written to staging, not committed
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-4"]
    assert (run_dir / ".staging" / "checkpoint-8").is_dir()
    _run(db, run_dir)
    _assert_same_run(run_dir, reference)
    assert not (run_dir / ".staging").exists()
