"""The one-token decoding fast path (ops.recurrent_step, MultiScaleRetention's decode step) computes
exactly what the general recurrent path computes, and does not break training or half precision."""

import pytest
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
    fields = dict(
        num_layers=2, hidden_size=32, num_heads=2, qk_dim=32, v_dim=64, ffn_proj_size=64, vocab_size=50
    )
    config = RetNetConfig(**{**fields, **overrides})
    return RetNetForCausalLM(config)


def test_decoding_in_inference_mode_then_training_recurrently():
    model = tiny().eval()
    ids = torch.randint(0, 50, (1, 6))
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=3, do_sample=False)
    model.train()
    out = model(ids, retention_mode="recurrent", labels=ids)
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


# ---------------------------------------------------------------------------------------------------
# The decoding step without autograd calls the blocks' step functions directly. It must give the bits
# of the general path, which runs when autograd is on (every module called on its own).


def decode_tokens(model, ids, steps: int, *, grad: bool):
    """Prompt ``ids[:, :-steps]`` in parallel, then ``steps`` recurrent tokens: (logits, last cache)."""
    prompt, tail = ids[:, :-steps], ids[:, -steps:]
    with torch.set_grad_enabled(grad):
        out = model(prompt, use_cache=True)
        cache, logits = out.past_key_values, [out.logits]
        for t in range(steps):
            out = model(tail[:, t : t + 1], past_key_values=cache, use_cache=True, retention_mode="recurrent")
            cache = out.past_key_values
            logits.append(out.logits)
    return torch.cat(logits, dim=1).detach(), cache


def assert_same_bits(fast, slow) -> None:
    (fast_logits, fast_cache), (slow_logits, slow_cache) = fast, slow
    assert torch.equal(fast_logits, slow_logits), (fast_logits - slow_logits).abs().max()
    for idx in range(len(fast_cache.layers)):
        for a, b in zip(fast_cache.get_state(idx), slow_cache.get_state(idx), strict=True):
            assert torch.equal(a, b.detach())


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"position_encoding": "xpos"},
        {"use_bias_in_msr": True, "use_bias_in_mlp": True, "use_bias_in_msr_out": True},
        {"qk_dim": 48, "num_heads": 4, "v_dim": 64},  # key_dim 12: k's scale 12^-1/2 is not a power of 2
        {"use_glu": False, "norm_type": "layernorm", "activation": "swish"},
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.heavy
def test_decoding_without_autograd_gives_the_bits_of_the_general_path(overrides, dtype) -> None:
    model = tiny(**overrides).eval().to(dtype)
    ids = torch.randint(0, 50, (3, 14), generator=torch.Generator().manual_seed(1))
    fast = decode_tokens(model, ids, 5, grad=False)
    slow = decode_tokens(model, ids, 5, grad=True)
    assert_same_bits(fast, slow)


def test_a_wrapped_or_hooked_block_is_called_in_every_decoding_step() -> None:
    # The one-token path calls each block's step directly; a block that is wrapped (RETRO-fitting's CCA)
    # or hooked must still run as a module, or its wrapper is silently skipped while decoding.
    model = tiny(num_layers=3).eval()
    ids = torch.randint(0, 50, (1, 10), generator=torch.Generator().manual_seed(3))
    plain = decode_tokens(model, ids, 4, grad=False)

    class Shifted(torch.nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.layer = layer

        def forward(self, *args, **kwargs):
            hidden, state = self.layer(*args, **kwargs)
            return hidden + 0.5, state

        def step(self, *args, **kwargs):  # what a wrapper reading through to its layer exposes
            return self.layer.step(*args, **kwargs)

    layers = model.model.layers
    layers[1] = Shifted(layers[1])
    calls = []
    layers[2].register_forward_pre_hook(lambda module, args: calls.append(1))
    fast = decode_tokens(model, ids, 4, grad=False)
    assert_same_bits(fast, decode_tokens(model, ids, 4, grad=True))
    assert not torch.equal(fast[0], plain[0])
    assert len(calls) == 2 * 5  # prompt + 4 one-token steps, in each of the two decodings


@pytest.mark.slow
def test_compiled_decoding_matches_eager_within_float32_rounding() -> None:
    """``compile_decoding()`` (torch.compile, inductor on CPU) against the eager step, float32. The
    compiler fuses and reorders elementwise arithmetic, so the logits agree to rounding, not bits:
    per step each value passes about 10 rounded operations per block, 2 blocks, relative unit
    roundoff 2^-24 = 6e-8; 1e-5 relative leaves a margin of ~10x for error growth over the steps,
    and a real difference (a decay, a position, a missing gate) moves them by 1e-2 or more."""
    model = tiny().eval()
    ids = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(3))
    eager_logits, eager_cache = decode_tokens(model, ids, 6, grad=False)
    model.model.compile_decoding()
    compiled = model.model._compiled_layer_steps
    used = []

    def counted(*args):
        used.append(1)
        return compiled(*args)

    model.model._compiled_layer_steps = counted
    logits, cache = decode_tokens(model, ids, 6, grad=False)
    assert len(used) == 6  # every recurrent step ran compiled (the prompt ran in parallel mode)
    rel = (logits - eager_logits).norm() / eager_logits.norm()
    assert rel < 1e-5, rel
    kv, eager_kv = cache.get_state(1)[0], eager_cache.get_state(1)[0]
    assert (kv - eager_kv).norm() / eager_kv.norm() < 1e-5
    model.model.compile_decoding(False)
    assert torch.equal(decode_tokens(model, ids, 6, grad=False)[0], eager_logits)


def scale_weights_in_place(model, factor: float) -> None:
    """What an optimizer step or ``load_state_dict`` does: new values, same tensors."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.retention.v_proj.weight.mul_(factor)
            layer.ffn.fc2.weight.mul_(factor)


@pytest.mark.slow
def test_compiled_decoding_follows_weights_changed_in_place() -> None:
    """The compiled step freezes the weights into its code (inductor ``freezing``, packed GEMM
    weights). After an in-place change it must decode with the new values, not the frozen copies:
    compared with the eager step of the changed model (1e-5 relative, the float32 bound of the test
    above), while the change itself moves the logits by far more than that."""
    model = tiny().eval()
    ids = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(4))
    model.model.compile_decoding()
    before, _ = decode_tokens(model, ids, 4, grad=False)  # compiled with the weights as they are
    compilations = model.model._frozen_step.compilations  # 2 where the GEMM template falls back
    scale_weights_in_place(model, 1.7)
    after, _ = decode_tokens(model, ids, 4, grad=False)
    model.model.compile_decoding(False)
    eager_after, _ = decode_tokens(model, ids, 4, grad=False)
    assert (before - eager_after).norm() / eager_after.norm() > 1e-2  # the change matters
    assert (after - eager_after).norm() / eager_after.norm() < 1e-5
    assert model.model._frozen_step.compilations == compilations + 1


def test_frozen_step_compiles_again_only_when_a_weight_changes() -> None:
    """The bookkeeping of the frozen step, with torch's "eager" backend (no inductor, so fast): one
    compilation for any number of steps, one more after an in-place weight change, and
    ``compile_decoding(False)`` then ``compile_decoding()`` reuses the step."""
    model = tiny().eval()
    ids = torch.randint(0, 50, (1, 12), generator=torch.Generator().manual_seed(5))
    model.model.compile_decoding(backend="eager")
    step = model.model._frozen_step
    expected, _ = decode_tokens(model, ids, 4, grad=False)
    assert step.compilations == 1
    model.model.compile_decoding(False)
    model.model.compile_decoding(backend="eager")
    assert model.model._frozen_step is step
    assert torch.equal(decode_tokens(model, ids, 4, grad=False)[0], expected)
    assert step.compilations == 1
    scale_weights_in_place(model, 0.5)
    decode_tokens(model, ids, 4, grad=False)
    assert step.compilations == 2


def test_frozen_step_falls_back_when_the_gemm_template_fails(monkeypatch, caplog) -> None:
    """torch 2.6's CPU GEMM template emits C++ that does not compile on some machines: the step then
    compiles again without the template (frozen weights, ATen's products) and still decodes right."""
    from retlm.models.retnet import decoding

    real_compile, seen = torch.compile, []

    def compile_failing_with_template(fn, **kwargs):
        seen.append(dict(kwargs["options"]))
        if "max_autotune" not in kwargs["options"]:
            return real_compile(fn, backend="eager")

        def fail(*args):
            error = torch._dynamo.exc.BackendCompilerFailed.__new__(torch._dynamo.exc.BackendCompilerFailed)
            Exception.__init__(error, "C++ compile error")
            raise error

        return fail

    monkeypatch.setattr(decoding.torch, "compile", compile_failing_with_template)
    model = tiny().eval()
    ids = torch.randint(0, 50, (1, 12), generator=torch.Generator().manual_seed(6))
    expected, _ = decode_tokens(model, ids, 3, grad=False)
    model.model.compile_decoding()
    with caplog.at_level("WARNING", logger=decoding.__name__):
        logits, _ = decode_tokens(model, ids, 3, grad=False)
    assert torch.equal(logits, expected)  # the "eager" backend computes what eager does
    assert [("max_autotune" in options) for options in seen] == [True, False]
    assert "GEMM template failed" in caplog.text
