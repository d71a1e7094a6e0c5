"""RETRO with gradient checkpointing (``model.gradient_checkpointing_enable()``): the same loss and the
same gradients as without it, for both decoders, with dropout on (checkpointing replays the RNG), and a
real saving of the activations kept for backward."""

import pytest
import torch
from training_helpers import tiny_model_config

from retlm.compat import cache_kwargs, output_cache
from retlm.models.retro import RetroConfig, RetroForCausalLM


def loss_and_grads(model: RetroForCausalLM, seq: torch.Tensor, retrieved: torch.Tensor):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)  # the same dropout masks for both runs
    loss = model(seq[:, :-1], retrieved=retrieved, labels=seq[:, :-1]).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("decoder", ["transformer", "retnet"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointed_gradients_equal_plain_gradients(decoder, reentrant):
    torch.manual_seed(0)
    config = RetroConfig(
        **tiny_model_config(vocab_size=64, chunk_size=8, seq_len=32, decoder=decoder, dropout=0.1)
    )
    model = RetroForCausalLM(config).train()
    seq = torch.randint(1, 64, (3, 33))
    retrieved = torch.randint(0, 64, (3, 4, 2, 16))
    retrieved[0, 1] = 0  # a chunk whose neighbors are all padding
    plain_loss, plain = loss_and_grads(model, seq, retrieved)

    if hasattr(model, "activation_checkpointing_enable"):  # newer transformers renamed it; the old name warns
        with pytest.warns(FutureWarning, match="activation_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    else:  # transformers 5.4 (the floor) has only the old name
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    assert model.model.gradient_checkpointing
    ckpt_loss, ckpt = loss_and_grads(model, seq, retrieved)

    torch.testing.assert_close(ckpt_loss, plain_loss, rtol=0, atol=1e-6)
    assert ckpt.keys() == plain.keys()
    assert any("encoder" in n for n in ckpt) and any("cca" in n for n in ckpt)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_checkpointing_keeps_fewer_activations_and_leaves_inference_alone():
    torch.manual_seed(0)
    config = RetroConfig(**{**tiny_model_config(vocab_size=64, chunk_size=8, seq_len=32), "dec_depth": 4})
    model = RetroForCausalLM(config).train()
    seq = torch.randint(1, 64, (2, 33))
    retrieved = torch.randint(0, 64, (2, 4, 2, 16))

    def saved_bytes() -> int:
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(seq[:, :-1], retrieved=retrieved, labels=seq[:, :-1]).loss.backward()
        return total

    plain = saved_bytes()
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = saved_bytes()
    assert checkpointed < 0.5 * plain, (checkpointed, plain)

    # decoding with a cache never checkpoints (the cache must be written): same logits as without it
    model.eval()
    with torch.no_grad():
        full = model(seq[:, :16], retrieved=retrieved[:, :2]).logits
        first = model(seq[:, :8], retrieved=retrieved[:, :1], use_cache=True)
        second = model(seq[:, 8:16], retrieved=retrieved[:, 1], **cache_kwargs(output_cache(first)))
    torch.testing.assert_close(second.logits, full[:, 8:16], rtol=1e-5, atol=1e-5)
