"""One loss convention (issue #11, item 6): HF labels with -100 ignored, and the model computes the loss.

The collator gives ``labels`` (HF's, shifted inside the model) and ``shift_labels`` (already aligned
with the logits, holding the last position's target too); the trainer trains on ``model(**batch).loss``
and the seed's ``RETRO(seq, retrieved, return_loss=True)`` maps onto the same path. Each is compared with
a naive float64 cross-entropy over the scored targets.
"""

from __future__ import annotations

import pytest
import torch

from retlm import RETRO, RetNetConfig, RetNetForCausalLM
from retlm.data import IGNORE_INDEX, RetroCollator

C, VOCAB, PAD, EOS = 4, 50, 0, 3


def naive_loss(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean over targets != -100 of -log softmax(logits)[target], in float64, one position at a time."""
    total, count = 0.0, 0
    for b in range(targets.shape[0]):
        for t in range(targets.shape[1]):
            target = int(targets[b, t])
            if target == IGNORE_INDEX:
                continue
            row = logits[b, t].detach().double()
            total += float(torch.logsumexp(row, 0) - row[target])
            count += 1
    return total / count


def items(eos_id: int, pad_id: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    seqs = torch.randint(4, VOCAB, (3, 2 * C + 1), generator=g)
    seqs[0, 5], seqs[0, 6:] = eos_id, pad_id  # a document that ends early: padding after its eos
    retrieved = torch.randint(4, VOCAB, (3, 2, 2, 2 * C), generator=g)
    return [(s, r) for s, r in zip(seqs, retrieved, strict=True)]


def retro() -> RETRO:
    torch.manual_seed(0)
    return (
        RETRO(
            num_tokens=VOCAB,
            max_seq_len=2 * C,
            chunk_size=C,
            enc_dim=16,
            enc_depth=1,
            dec_dim=16,
            dec_depth=2,
            dec_cross_attn_layers=(2,),
            heads=2,
            dim_head=8,
            pad_id=PAD,
        )
        .double()
        .eval()
    )


@pytest.mark.parametrize("eos_id", [EOS, PAD], ids=["bert-like", "gpt2-like (pad = eos)"])
def test_retro_model_loss_on_the_collators_labels(eos_id):
    batch = RetroCollator(PAD, eos_id=eos_id)(items(eos_id, PAD))
    assert torch.equal(batch["labels"][:, 1:], batch["shift_labels"][:, :-1])  # the same targets, shifted
    model = retro()
    out = model(**batch)
    reference = naive_loss(out.logits, batch["shift_labels"])
    assert abs(out.loss.item() - reference) < 1e-10
    # HF labels alone: the model shifts them, and the last position has no target
    hf_only = model(input_ids=batch["input_ids"], retrieved=batch["retrieved"], labels=batch["labels"]).loss
    assert abs(hf_only.item() - naive_loss(out.logits[:, :-1], batch["labels"][:, 1:])) < 1e-10


def test_the_seeds_return_loss_is_the_models_loss():
    model = retro()
    data = items(EOS, PAD)
    seq, retrieved = torch.stack([s for s, _ in data]), torch.stack([r for _, r in data])
    loss = model(seq, retrieved, return_loss=True)
    logits = model(seq[:, :-1], retrieved)
    targets = seq[:, 1:].masked_fill(seq[:, 1:] == PAD, IGNORE_INDEX)  # the seed ignores pad_id targets
    assert abs(loss.item() - naive_loss(logits, targets)) < 1e-10
    batch = RetroCollator(PAD, eos_id=EOS)(data)
    assert abs(loss.item() - model(**batch).loss.item()) < 1e-10  # = what the trainer trains on


def test_retnet_model_loss_on_the_collators_labels():
    torch.manual_seed(0)
    model = (
        RetNetForCausalLM(
            RetNetConfig(
                vocab_size=VOCAB, hidden_size=16, num_layers=1, num_heads=2, v_dim=16, ffn_proj_size=32
            )
        )
        .double()
        .eval()
    )
    batch = RetroCollator(PAD, retrieval=False, eos_id=EOS)(items(EOS, PAD))
    out = model(**batch)
    # HF's loss function (which RetNet uses) computes in float32 whatever the logits' dtype
    assert abs(out.loss.item() - naive_loss(out.logits, batch["shift_labels"])) < 1e-6
