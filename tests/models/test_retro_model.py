"""Native RETRO: causality of self- and chunked cross-attention, incremental decoding == full forward,
bad input, save/load, and the seed README's first example (small dims)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from tiny_models import tiny_retro, tiny_retro_config
from transformers import AutoConfig, AutoModelForCausalLM

from retlm import RETRO, RetroConfig, RetroForCausalLM
from retlm.models.retro import RetroCache

C = 4  # chunk size
SMALL = tiny_retro_config(enc_depth=2, dec_depth=4, dec_cross_attn_layers=(2, 4))  # C = 4
HAS_RETENTION = importlib.util.find_spec("retlm.ops.retention") is not None
DECODERS = [
    "transformer",
    pytest.param("retnet", marks=pytest.mark.skipif(not HAS_RETENTION, reason="retlm.ops.retention absent")),
]


def maxdiff(a, b):
    return (a - b).abs().max().item() if a.numel() else 0.0


def make(decoder="transformer", dtype=torch.float64, seed=0, **overrides):
    return tiny_retro(decoder, seed, **{**SMALL, **overrides}).to(dtype)


def data(seq_len, k=2, seed=1, batch=2):
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(1, SMALL["num_tokens"], (batch, seq_len), generator=g)
    retrieved = torch.randint(1, SMALL["num_tokens"], (batch, seq_len // C, k, 2 * C), generator=g)
    retrieved[:, :, 0, -2:] = 0  # padded continuation
    if seq_len // C > 1 and k > 1:
        retrieved[0, 1, 1] = -1  # a missing neighbor
    return seq, retrieved


@pytest.mark.parametrize("decoder", DECODERS)
def test_perturbing_token_t_changes_no_earlier_logit(decoder):
    model = make(decoder)
    seq, retrieved = data(18)
    with torch.no_grad():
        base = model(seq, retrieved)
        for t in range(seq.shape[1]):
            changed = seq.clone()
            changed[:, t] = (changed[:, t] + 7) % SMALL["num_tokens"]
            logits = model(changed, retrieved)
            assert maxdiff(logits[:, :t], base[:, :t]) <= 1e-12, t
            assert (logits[:, t:] - base[:, t:]).abs().max() > 1e-6, t  # the change is visible from t on


@pytest.mark.parametrize("decoder", DECODERS)
def test_neighbors_of_chunk_u_reach_only_tokens_from_its_last_token_on(decoder):
    model = make(decoder)
    seq, retrieved = data(18)
    with torch.no_grad():
        base = model(seq, retrieved)
        for u in range(retrieved.shape[1]):
            changed = retrieved.clone()
            changed[:, u] = (changed[:, u] + 5) % (SMALL["num_tokens"] - 1) + 1
            logits = model(seq, changed)
            first_reader = u * C + C - 1  # the c-1 shift
            assert maxdiff(logits[:, :first_reader], base[:, :first_reader]) <= 1e-12
            assert (logits[:, first_reader] - base[:, first_reader]).abs().max() > 1e-6


def test_retrieval_changes_logits_and_missing_neighbors_are_masked():
    model = make()
    seq, retrieved = data(16)
    with torch.no_grad():
        with_retrieval, without = model(seq, retrieved), model(seq)
        # -1 (missing) and pad_id are the same thing; a fully missing neighbor's tokens do not matter
        as_pad = retrieved.clone()
        as_pad[as_pad == -1] = 0
        assert torch.equal(model(seq, as_pad), with_retrieval)
        other = retrieved.clone()
        other[0, 1, 1] = 0
        assert torch.equal(model(seq, other), with_retrieval)
    assert (with_retrieval - without).abs().max() > 1e-3


@pytest.mark.parametrize("decoder", DECODERS)
def test_zero_init_cca_starts_as_the_decoder_alone_and_then_learns_to_use_neighbors(decoder):
    torch.manual_seed(0)
    model = RetroForCausalLM(RetroConfig(**SMALL, decoder=decoder, zero_init_cca=True)).double()
    seq, retrieved = data(17)
    with torch.no_grad():
        assert maxdiff(model(seq[:, :16], retrieved=retrieved).logits, model(seq[:, :16]).logits) == 0.0
    outs = [layer.cca.attn.to_out for layer in model.model.layers if layer.cca is not None]
    assert len(outs) == 2 and all(not o.weight.any() and not o.bias.any() for o in outs)
    # the zero projection still receives a gradient, so one optimizer step makes retrieval matter
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(seq[:, :16], retrieved=retrieved, labels=seq[:, :16]).loss.backward()
    assert all(o.weight.grad.abs().max() > 1e-6 for o in outs)
    optimizer.step()
    with torch.no_grad():
        assert maxdiff(model(seq[:, :16], retrieved=retrieved).logits, model(seq[:, :16]).logits) > 1e-4
    # the default keeps retro-pytorch's initialisation: neighbors change the logits from the start
    assert not RetroConfig(**SMALL).zero_init_cca
    # and the option changes nothing but the zeroed projections: the same seed gives every other weight
    torch.manual_seed(0)
    default = dict(RetroForCausalLM(RetroConfig(**SMALL, decoder=decoder)).double().named_parameters())
    torch.manual_seed(0)
    zeroed = RetroForCausalLM(RetroConfig(**SMALL, decoder=decoder, zero_init_cca=True))
    zeroed = dict(zeroed.named_parameters())
    differ = sorted(name for name in default if not torch.equal(default[name].float(), zeroed[name]))
    assert differ == ["model.layers.1.cca.attn.to_out.weight", "model.layers.3.cca.attn.to_out.weight"]


def test_three_dim_retrieved_is_one_neighbor_and_loss_works_in_eval_mode():
    model = make()
    seq, retrieved = data(17, k=1)
    with torch.no_grad():
        four = model(seq[:, :-1], retrieved)
        three = model(seq[:, :-1], retrieved[:, :, 0])
    assert torch.equal(four, three)
    loss = model(seq, retrieved, return_loss=True)  # eval mode: no assertion (the seed requires train)
    loss_without = model(seq, return_loss=True)  # the seed returns logits here
    assert loss.dim() == 0 and loss_without.dim() == 0
    padded = seq.clone()
    padded[:, 10:] = 0
    logits = model(padded[:, :-1], retrieved)
    expected = torch.nn.functional.cross_entropy(logits[:, :9].reshape(-1, 64), padded[:, 1:10].reshape(-1))
    assert torch.allclose(model(padded, retrieved, return_loss=True), expected)


def test_heads_is_honoured():
    model = make(heads=3)
    attn = model.model.layers[0].self_attn
    assert attn.heads == 3 and attn.to_q.weight.shape == (3 * 16, 32)


def feed_incrementally(model, seq, retrieved, pieces):
    """Feed ``seq`` in pieces of the given lengths, passing the neighbors of each chunk completed."""
    cache, logits, start = None, [], 0
    for length in pieces:
        end = start + length
        first, last = start // C, end // C  # chunks completed: first .. last-1
        r = None if retrieved is None else retrieved[:, first:last]
        if r is not None and length == 1 and last > first and cache is not None:
            r = r[:, 0]  # (batch, k, 2c) form for a single chunk
        out = model(input_ids=seq[:, start:end], retrieved=r, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits.append(out.logits)
        start = end
    assert isinstance(cache, RetroCache) and cache.position == seq.shape[1]
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("pieces", [[1] * 18, [6] + [1] * 7 + [5], [3, 9, 2, 4]])
def test_incremental_logits_equal_full_forward(decoder, pieces):
    model = make(decoder, dtype=torch.float32)
    seq, retrieved = data(18)
    with torch.no_grad():
        full = model(seq, retrieved)
        step = feed_incrementally(model, seq, retrieved, pieces)
        full_off = model(seq)
        step_off = feed_incrementally(model, seq, None, pieces)
    assert (step - full).abs().max() <= 1e-5
    assert (step_off - full_off).abs().max() <= 1e-5


def test_retnet_decoder_cache_does_not_grow():
    if not HAS_RETENTION:
        pytest.skip("retlm.ops.retention absent")
    model = make("retnet", dtype=torch.float32)
    seq, retrieved = data(16)
    with torch.no_grad():
        out = model(input_ids=seq[:, :8], retrieved=retrieved[:, :2], use_cache=True)
        sizes = [sum(t.numel() for t in layer.state) for layer in out.past_key_values.layers]
        out = model(input_ids=seq[:, 8:9], past_key_values=out.past_key_values)
    assert [sum(t.numel() for t in layer.state) for layer in out.past_key_values.layers] == sizes


@pytest.mark.skipif(not HAS_RETENTION, reason="retlm.ops.retention absent")
def test_retnet_decoder_modes_give_the_same_logits():
    model = make("retnet", dtype=torch.float32)
    seq, retrieved = data(18)
    with torch.no_grad():
        logits = {
            mode: model(input_ids=seq, retrieved=retrieved, retention_mode=mode).logits
            for mode in ("parallel", "chunkwise", "recurrent")
        }
    for mode in ("chunkwise", "recurrent"):
        assert (logits[mode] - logits["parallel"]).abs().max() <= 1e-5


def test_bad_input_is_refused_with_the_expected_shape():
    model = make()
    seq, retrieved = data(16)
    with pytest.raises(ValueError, match=r"\(batch=2, num_chunks=4, num_neighbors, 8\)"):
        model(seq, retrieved[:, :3])
    with pytest.raises(ValueError, match=r"num_chunks=3"):
        model(seq[:, :-1], retrieved)  # 15 tokens complete only 3 chunks
    with pytest.raises(ValueError, match="chunk_size=4"):
        model(seq, retrieved[..., :3])
    with pytest.raises(ValueError, match="max_seq_len=48"):
        model(torch.ones(1, 49, dtype=torch.long))
    out = model(input_ids=seq[:, :2], use_cache=True)
    with pytest.raises(ValueError, match="num_chunks=0"):  # no chunk completes at positions 2..2
        model(input_ids=seq[:, 2:3], retrieved=retrieved[:, 0], past_key_values=out.past_key_values)
    for layers in [(0, 2), (5,)]:
        with pytest.raises(ValueError, match=r"1\.\.4"):
            RetroConfig(**{**SMALL, "dec_cross_attn_layers": layers})
    with pytest.raises(ValueError, match="decoder"):
        RetroConfig(**SMALL, decoder="lstm")
    with pytest.raises(ValueError, match="hole"):
        model(input_ids=seq[:, :4], attention_mask=torch.tensor([[0, 1, 0, 1], [1, 1, 1, 1]]))


def test_save_and_load_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = make(dtype=torch.float32)
    seq, retrieved = data(18)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "retro"
    assert isinstance(AutoConfig.from_pretrained(tmp_path), RetroConfig)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, RetroForCausalLM)
    with torch.no_grad():
        expected = model(seq, retrieved)
        assert torch.equal(loaded(input_ids=seq, retrieved=retrieved).logits, expected)
        assert torch.equal(RETRO.from_pretrained(tmp_path).eval()(seq, retrieved), expected)
    for change in [{"dec_dim": 48}, {"dec_cross_attn_layers": (1, 2, 4)}]:
        with pytest.raises(ValueError, match="config"):
            RetroForCausalLM.from_pretrained(tmp_path, config=RetroConfig(**{**SMALL, **change}))


def test_seed_readme_usage_example_small_dims():
    retro = RETRO(
        chunk_size=8,  # README: 64
        max_seq_len=64,  # 2048
        enc_dim=32,  # 896
        enc_depth=2,
        dec_dim=24,  # 796
        dec_depth=4,  # 12
        dec_cross_attn_layers=(1, 2, 4),
        heads=2,
        dim_head=16,
        dec_attn_dropout=0.25,
        dec_ff_dropout=0.25,
    )
    seq = torch.randint(0, 20000, (2, 64 + 1))
    retrieved = torch.randint(0, 20000, (2, 8, 2, 16))
    loss = retro(seq, retrieved, return_loss=True)
    loss.backward()
    assert torch.isfinite(loss)
    assert retro.to_logits.weight.grad is not None
    assert retro.model.encoder.layers[0].self_attn.to_q.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("cca_layers", [(2, 4), ()])
def test_a_cache_continued_on_another_batch_size_is_refused(decoder, cca_layers):
    # A RetNet decoder's retention state (batch 1) would broadcast over a batch of 2 without the check.
    model = make(decoder, dtype=torch.float32, dec_cross_attn_layers=cca_layers)
    seq, retrieved = data(9, batch=2)
    with torch.no_grad():
        cache = model(input_ids=seq[:1, :8], retrieved=retrieved[:1, :2], use_cache=True).past_key_values
        with pytest.raises(ValueError, match=r"past_key_values holds 1 rows but input_ids has batch 2"):
            model(input_ids=seq[:, 8:9], past_key_values=cache)
        with pytest.raises(ValueError, match="must be a RetroCache"):
            model(input_ids=seq[:1, 8:9], past_key_values=(torch.zeros(1),))
        row = model(input_ids=seq[:1, 8:9], past_key_values=cache).logits  # its own batch still works
    assert row.shape == (1, 1, SMALL["num_tokens"])
