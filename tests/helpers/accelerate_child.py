"""A training process for the multi-process tests. Not a test module.

    accelerate launch --cpu --num_processes 2 tests/helpers/accelerate_child.py {ddp|fsdp} OUT.json
    python tests/helpers/accelerate_child.py single OUT.json

Trains three tiny models (RETRO with the transformer decoder, RETRO with the RetNet decoder, RetNet)
for ``STEPS`` AdamW steps on the same fixed global batch, every process taking its contiguous share of
the rows; writes the global mean loss of every step (rank 0). ``ddp`` wraps the model with
``accelerator.prepare`` (DistributedDataParallel, gloo); ``fsdp`` shards every decoder layer and the
whole model with torch's ``fully_shard`` (FSDP2; accelerate's FSDP plugin does not run on CPU).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

STEPS, BATCH, SEQ, VOCAB = 3, 4, 32, 64


def models():
    from training_helpers import tiny_model_config

    from retlm import RetNetConfig, RetNetForCausalLM
    from retlm.models.retro import RetroConfig, RetroForCausalLM

    for decoder in ("transformer", "retnet"):
        torch.manual_seed(0)
        options = tiny_model_config(vocab_size=VOCAB, chunk_size=8, seq_len=SEQ, decoder=decoder)
        config = RetroConfig(**options)
        yield f"retro-{decoder}", RetroForCausalLM(config), True
    torch.manual_seed(0)
    config = RetNetConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=2, ffn_proj_size=64)
    yield "retnet", RetNetForCausalLM(config), False


def layers_of(model: torch.nn.Module) -> list[torch.nn.Module]:
    return list(model.model.layers)


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    generator = torch.Generator().manual_seed(1)
    seq = torch.randint(1, VOCAB, (BATCH, SEQ + 1), generator=generator)
    retrieved = torch.randint(0, VOCAB, (BATCH, SEQ // 8, 2, 16), generator=generator)
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    results = {"world_size": world, "mode": mode, "losses": {}}
    for name, model, is_retro in models():
        optimizer_params = None
        if mode == "fsdp":
            from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

            for layer in layers_of(model):
                fully_shard(layer)
                if is_retro:  # RetroModel calls these sub-layer methods, not the layer's forward
                    for method in ("mix", "cross", "feed_forward"):
                        register_fsdp_forward_method(layer, method)
            fully_shard(model)
            optimizer_params = model.parameters()
        optimizer = torch.optim.AdamW(optimizer_params or model.parameters(), lr=1e-2)
        if mode == "ddp":
            model, optimizer = accelerator.prepare(model, optimizer)
        model.train()
        losses = []
        for _ in range(STEPS):
            inputs = {"input_ids": seq[rows, :-1], "labels": seq[rows, :-1]}
            if is_retro:
                inputs["retrieved"] = retrieved[rows]
            loss = model(**inputs).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(accelerator.reduce(loss.detach(), reduction="mean").item())
        results["losses"][name] = losses
        local = sum(getattr(p, "to_local", lambda p=p: p)().numel() for p in model.parameters())
        results.setdefault("wrapper", {})[name] = type(model).__name__
        results.setdefault("local_fraction", {})[name] = local / sum(p.numel() for p in model.parameters())
    if accelerator.is_main_process:
        out.write_text(json.dumps(results))
    accelerator.wait_for_everyone()
    # About one launch in ten, a gloo/FSDP2 thread outlives the process group and the interpreter's
    # teardown aborts ("terminate called without an active exception") after the results are written.
    # Both ranks have passed the barrier, so leave without the C++ destructors.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
