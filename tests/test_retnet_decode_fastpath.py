"""The one-token decoding fast path (ops.recurrent_step, MultiScaleRetention's decode step) computes
exactly what the general recurrent path computes, and does not break training or half precision."""

import torch

from retlm import RetNetConfig, RetNetForCausalLM
from retlm.ops.retention import decay_gammas, recurrent_retention, recurrent_step, step_decay


def test_recurrent_step_equals_recurrent_retention_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    b, h, dk, dv = 2, 3, 8, 6
    log_gamma = decay_gammas(h).log()
    state = (torch.randn(b, h, dk, dv, generator=g), torch.randn(b, h, dk, generator=g))
    offset = torch.tensor([5, 17])
    for _ in range(6):
        q, k = torch.randn(b, h, 1, dk, generator=g), torch.randn(b, h, 1, dk, generator=g)
        v = torch.randn(b, h, 1, dv, generator=g)
        slow, slow_state = recurrent_retention(
            q, k, v, log_gamma, position_offset=offset, state=state, return_state=True
        )
        fast, fast_state = recurrent_step(
            q, k, v, step_decay(log_gamma, torch.float32), position_offset=offset, state=state
        )
        assert torch.equal(slow, fast)
        assert all(torch.equal(a, c) for a, c in zip(slow_state, fast_state, strict=True))
        state, offset = fast_state, offset + 1


def tiny(**overrides):
    torch.manual_seed(0)
    config = RetNetConfig(
        num_layers=2,
        hidden_size=32,
        num_heads=2,
        qk_dim=32,
        v_dim=64,
        ffn_proj_size=64,
        vocab_size=50,
        **overrides,
    )
    return RetNetForCausalLM(config)


def test_decoding_in_inference_mode_then_training_recurrently():
    model = tiny().eval()
    ids = torch.randint(0, 50, (1, 6))
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=3, do_sample=False)
    model.train()
    out = model(ids, forward_impl="recurrent", labels=ids)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_bf16_left_padded_batch_runs_and_matches_float32_loosely():
    model = tiny().eval()
    ids = torch.randint(1, 50, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    ref = model(ids, attention_mask=mask).logits
    half = model.to(torch.bfloat16)(ids, attention_mask=mask).logits.float()
    assert torch.isfinite(half).all()
    real = mask.bool()
    assert (half[real] - ref[real]).norm() / ref[real].norm() < 5e-2
