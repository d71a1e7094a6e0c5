"""Training across processes with accelerate: ``accelerate launch --multi_gpu --num_processes 2`` on CPU
(the launcher is torchrun's; the processes use gloo) with DDP (``accelerator.prepare``) and with FSDP
(torch's ``fully_shard``, every decoder layer and the model; accelerate's FSDP plugin needs GPUs), for
RETRO with both decoders and for RetNet. With the same global batch and seed, the losses of the first
three AdamW steps must equal those of one process within 1e-5 (float32; only the order of the gradient
sums differs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CHILD = Path(__file__).resolve().parents[1] / "helpers" / "accelerate_child.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
MODELS = ("retro-transformer", "retro-retnet", "retnet")


def run(cmd: list[str], out: Path) -> dict:
    result = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=400, start_new_session=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("single") / "losses.json"
    return run([sys.executable, str(CHILD), "single", str(out)], out)


# FSDP2's all-gather records an event on a CPU stream, which torch 2.6 (the floor) lacks.
FSDP_ON_CPU = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 7)


@pytest.mark.parametrize(
    "mode",
    [
        "ddp",
        pytest.param(
            "fsdp", marks=pytest.mark.skipif(not FSDP_ON_CPU, reason="FSDP2 on CPU needs torch >= 2.7")
        ),
    ],
)
@pytest.mark.heavy
def test_two_processes_match_one(single, mode, tmp_path):
    out = tmp_path / "losses.json"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    got = run([*launch, str(CHILD), mode, str(out)], out)
    assert got["world_size"] == 2 and single["world_size"] == 1
    for name in MODELS:
        assert len(got["losses"][name]) == 3
        assert got["losses"][name] == pytest.approx(single["losses"][name], abs=1e-5), name
        assert got["losses"][name][-1] < got["losses"][name][0]  # it trained
        if mode == "ddp":
            assert got["wrapper"][name] == "DistributedDataParallel"
        else:  # each rank holds half of every parameter
            assert got["local_fraction"][name] == pytest.approx(0.5, abs=0.02), name
