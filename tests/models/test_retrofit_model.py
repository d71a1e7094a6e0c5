"""RETRO-fitting HF causal LMs (GPT-2, Llama, retlm's RetNet and a RETRO control), tiny random bases.

At initialisation the retrofitted model computes exactly its base; once its CCA layers are non-zero
(drawn at random here, as if trained), no logit moves when a later token or a later chunk's neighbors
change; generation that retrieves at chunk boundaries equals a full forward pass over the final
sequence with the neighbors it read, and decodes one token per call from the base's own cache; the
adapter saves alone and loads back, with its base, to equal logits.
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import CallLog, FakeDatabase, assert_incremental, tiny_causal_lm, tiny_retro
from transformers import AutoModelForCausalLM, GPT2LMHeadModel

from retlm.compat import output_cache
from retlm.models.retrieval_generation import generate_with_retrieval
from retlm.models.retrofit import RetroFitForCausalLM, RetroFitLayer, decoder_layers, default_cca_layers

VOCAB = 61
C = 4  # chunk size
K = 2  # neighbors per chunk
FAMILIES = ["gpt2", "llama", "retnet", "retro-control"]


# each family's own touch: GPT-2 and Llama with BOS = EOS = 1, Llama with grouped KV heads, RetNet peaked
BASE_OVERRIDES = {
    "gpt2": dict(bos_token_id=1, eos_token_id=1),
    "llama": dict(num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=1),
    "retnet": dict(initializer_range=0.3),
}


def make_base(family: str, layers: int = 3) -> torch.nn.Module:
    if family == "retro-control":  # the demo's control: a RETRO (RetNet decoder) trained without retrieval
        return tiny_retro(
            "retnet",
            num_tokens=VOCAB,
            max_seq_len=64,
            dec_depth=layers,
            dec_cross_attn_layers=(2,),
            chunk_size=C,
        )
    return tiny_causal_lm(family, VOCAB, positions=64, layers=layers, **BASE_OVERRIDES[family]).eval()


def make(family: str, *, trained: bool = True, dtype: torch.dtype = torch.float64, **kwargs):
    """(base, retrofitted) with CCA after layers 1 and 3; ``trained``: random non-zero CCA projections."""
    base = make_base(family).to(dtype)
    model = (
        RetroFitForCausalLM.from_base(base, chunk_size=C, pad_id=0, cca_layers=[1, 3], enc_depth=1, **kwargs)
        .to(dtype)
        .eval()
    )
    if trained:
        with torch.no_grad():
            for block in model.retrofit.blocks.values():
                torch.nn.init.normal_(block.cca.attn.to_out.weight, std=0.2)
                torch.nn.init.normal_(block.cca.attn.to_out.bias, std=0.2)
    return base, model


def data(seq_len: int, batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(1, VOCAB, (batch, seq_len), generator=g)
    retrieved = torch.randint(1, VOCAB, (batch, seq_len // C, K, 2 * C), generator=g)
    retrieved[:, :, 0, -2:] = 0  # a padded continuation
    retrieved[0, 1, 1] = -1  # a missing neighbor
    return seq, retrieved


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() if a.numel() else 0.0


@pytest.mark.parametrize("family", FAMILIES)
def test_at_initialisation_logits_equal_the_base_exactly(family):
    base, model = make(family, trained=False, dtype=torch.float32)
    seq, retrieved = data(18)
    with torch.no_grad():
        expected = base(input_ids=seq).logits
        assert torch.equal(model(input_ids=seq, retrieved=retrieved).logits, expected)
        assert torch.equal(model(input_ids=seq).logits, expected)
    # the equality comes from the zeroed projections: any other value is seen by the logits
    _, drawn = make(family, trained=True, dtype=torch.float32)
    with torch.no_grad():
        assert maxdiff(drawn(input_ids=seq, retrieved=retrieved).logits, expected) > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_the_base_is_wrapped_not_copied_and_frozen(family):
    base, model = make(family, trained=False)
    layers = decoder_layers(model.base)
    assert model.base is base
    assert [type(layer) is RetroFitLayer for layer in layers] == [True, False, True]
    assert not any(p.requires_grad for p in base.parameters())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("retrofit.") for n in trainable)
    assert set(model.retrofit.blocks) == {"1", "3"}
    model.train()
    assert not base.training and model.retrofit.training  # no dropout in the frozen base
    clone = copy.deepcopy(model.eval())  # the trainer times steps on a copy: its wrappers call the copy
    assert decoder_layers(clone.base)[0]._owner is clone


def test_default_cca_layers_are_the_papers():
    assert default_cca_layers(12) == [6, 9, 12]
    assert default_cca_layers(24) == [6, 9, 12, 15, 18, 21, 24]
    assert default_cca_layers(4) == [2, 4] and default_cca_layers(1) == [1]
    model = RetroFitForCausalLM.from_base(make_base("gpt2", layers=12), chunk_size=C)
    assert model.config.cca_layers == [6, 9, 12]
    with pytest.raises(ValueError, match=r"1\.\.3"):
        RetroFitForCausalLM.from_base(make_base("gpt2"), chunk_size=C, cca_layers=[4])


@pytest.mark.parametrize("family", FAMILIES)
def test_perturbing_token_t_changes_no_earlier_logit(family):
    _, model = make(family)
    seq, retrieved = data(14)
    with torch.no_grad():
        reference = model(input_ids=seq, retrieved=retrieved).logits
        for t in (0, 1, C - 2, C - 1, C, 2 * C - 1, 2 * C, 13):  # around the chunk boundaries, and the end
            changed = seq.clone()
            changed[:, t] = changed[:, t] % (VOCAB - 1) + 1
            logits = model(input_ids=changed, retrieved=retrieved).logits
            assert maxdiff(logits[:, :t], reference[:, :t]) <= 1e-12, t
            assert maxdiff(logits[:, t:], reference[:, t:]) > 1e-6, t


@pytest.mark.parametrize("family", FAMILIES)
def test_neighbors_of_chunk_u_reach_only_tokens_from_its_last_token_on(family):
    _, model = make(family)
    seq, retrieved = data(18)
    with torch.no_grad():
        reference = model(input_ids=seq, retrieved=retrieved).logits
        for u in range(retrieved.shape[1]):
            changed = retrieved.clone()
            changed[:, u] = changed[:, u].clamp(min=0) % (VOCAB - 1) + 1
            logits = model(input_ids=seq, retrieved=changed).logits
            first_reader = u * C + C - 1  # the last token of chunk u (RETRO's c - 1 shift)
            assert maxdiff(logits[:, :first_reader], reference[:, :first_reader]) <= 1e-12, u
            assert maxdiff(logits[:, first_reader:], reference[:, first_reader:]) > 1e-6, u


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("prompt_len", [3, 9])
def test_retrieval_generation_equals_a_full_forward_with_the_neighbors_it_read(family, prompt_len):
    _, model = make(family)
    prompt = torch.randint(1, VOCAB, (2, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    new = 15
    out = generate_with_retrieval(model, FakeDatabase(C, VOCAB, K), prompt, max_new_tokens=new)
    seq = out.sequences
    fed = seq.shape[1] - 1
    assert [r.chunk_index for r in out.retrievals[0]] == list(range(fed // C))
    retrieved = torch.stack(
        [torch.stack([torch.as_tensor(r.tokens) for r in rows]) for rows in out.retrievals]
    )
    with torch.no_grad():
        logits = model(input_ids=seq[:, :fed], retrieved=retrieved).logits
    assert torch.equal(logits[:, prompt_len - 1 :].argmax(-1), seq[:, prompt_len:])
    # the neighbors mattered: without retrieval the same model continues differently
    plain = generate_with_retrieval(model, None, prompt, max_new_tokens=new).sequences
    assert not torch.equal(plain, seq)


@pytest.mark.parametrize("family", FAMILIES)
def test_incremental_logits_equal_the_full_forward(family):
    """Token by token through the base's cache, neighbors fed as each chunk completes."""
    _, model = make(family)
    seq, retrieved = data(13)
    with torch.no_grad():
        full = model(input_ids=seq, retrieved=retrieved).logits
        out = model(input_ids=seq[:, :5], retrieved=retrieved[:, :1], use_cache=True)
        steps = [out.logits]
        cache = output_cache(out)
        for t in range(5, 13):
            chunk_done = (t + 1) % C == 0
            out = model(
                input_ids=seq[:, t : t + 1],
                retrieved=retrieved[:, t // C] if chunk_done else None,
                use_cache=True,
                cache=cache,
            )
            assert output_cache(out) is cache  # the base's own cache object, continued in place
            steps.append(out.logits)
    assert maxdiff(torch.cat(steps, dim=1), full) < 1e-10


@pytest.mark.parametrize("family", FAMILIES)
def test_retrieval_generation_decodes_one_token_per_step_from_the_bases_cache(family):
    _, model = make(family, dtype=torch.float32)
    prompt, new = torch.randint(1, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1)), 16
    outer, inner = CallLog(model), CallLog(model.base)
    out = model.generate(
        prompt,
        retrieval_database=FakeDatabase(C, VOCAB, K),
        max_new_tokens=new,
        do_sample=True,
        generator=torch.Generator().manual_seed(0),
    )
    assert out.sequences.shape == (2, 11 + new)
    for log in (outer, inner):  # the prompt once, then one token per call on a growing cache
        assert_incremental(log.calls, 11, new)
    if family == "retnet":  # and a RetNet base takes each token in its recurrent form (constant state)
        assert inner.modes == [None] + ["recurrent"] * (new - 1), inner.modes


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_without_a_database_is_the_bases_generate(family):
    base, model = make(family, dtype=torch.float32)
    prompt = torch.randint(1, VOCAB, (1, 6), generator=torch.Generator().manual_seed(2))
    expected = base.generate(prompt, max_new_tokens=8, do_sample=False)
    log = CallLog(base)
    assert torch.equal(model.generate(prompt, max_new_tokens=8, do_sample=False), expected)
    assert_incremental(log.calls, 6, expected.shape[1] - 6)  # the base's own cached decoding


@pytest.mark.parametrize("family", FAMILIES)
def test_save_writes_only_the_adapter_and_both_loaders_give_equal_logits(family, tmp_path):
    base = make_base(family)
    base.save_pretrained(tmp_path / "base")
    model = RetroFitForCausalLM.from_base(
        str(tmp_path / "base"), chunk_size=C, cca_layers=[2, 3], enc_depth=1
    ).eval()
    with torch.no_grad():
        for block in model.retrofit.blocks.values():
            torch.nn.init.normal_(block.cca.attn.to_out.weight, std=0.2)
    model.save_pretrained(tmp_path / "run")
    saved = load_file(tmp_path / "run" / "model.safetensors")
    assert set(saved) == set(model.adapter_state_dict())
    assert all(key.startswith("retrofit.") for key in saved)
    config = (tmp_path / "run" / "config.json").read_text()
    assert str((tmp_path / "base").resolve()) in config and '"retrofit"' in config
    seq, retrieved = data(14)
    with torch.no_grad():
        expected = model(input_ids=seq, retrieved=retrieved).logits
        for loader in (RetroFitForCausalLM, AutoModelForCausalLM):
            loaded = loader.from_pretrained(tmp_path / "run")
            assert type(loaded) is RetroFitForCausalLM
            assert torch.equal(loaded(input_ids=seq, retrieved=retrieved).logits, expected)


def test_loading_refuses_another_base_and_a_foreign_weights_file(tmp_path):
    base = make_base("gpt2")
    base.save_pretrained(tmp_path / "base")
    RetroFitForCausalLM.from_base(str(tmp_path / "base"), chunk_size=C, cca_layers=[2]).save_pretrained(
        tmp_path / "run"
    )
    with pytest.raises(ValueError, match="not the model this adapter was built for"):
        RetroFitForCausalLM.from_pretrained(tmp_path / "run", base=make_base("gpt2", layers=4))
    other = RetroFitForCausalLM.from_base(make_base("gpt2"), chunk_size=C, cca_layers=[1, 2])
    other.save_pretrained(tmp_path / "other")
    (tmp_path / "run" / "model.safetensors").write_bytes(
        (tmp_path / "other" / "model.safetensors").read_bytes()
    )
    with pytest.raises(ValueError, match="does not fit"):
        RetroFitForCausalLM.from_pretrained(tmp_path / "run")


def test_bad_input_is_refused():
    _, model = make("gpt2")
    seq, retrieved = data(12)
    with pytest.raises(ValueError, match="retrieved must have shape"):
        model(input_ids=seq, retrieved=retrieved[:, :2])
    with pytest.raises(ValueError, match="exceeds the base's 64 positions"):
        model(input_ids=torch.ones(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="right padding"):
        model(input_ids=seq, retrieved=retrieved, attention_mask=torch.tensor([[0] + [1] * 11] * 2))


def test_the_wrapped_base_keeps_its_state_dict_names_and_loads_its_own_checkpoint(tmp_path):
    base = make_base("gpt2")
    names = list(base.state_dict())
    _, model = make("gpt2", dtype=torch.float32)
    assert list(model.base.state_dict()) == names
    base.save_pretrained(tmp_path / "base")
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path / "base")
    model.base.load_state_dict(reloaded.state_dict())  # strict: every name matches
    model.base.save_pretrained(tmp_path / "again")
    again = GPT2LMHeadModel.from_pretrained(tmp_path / "again")
    assert all(torch.equal(again.state_dict()[k], v) for k, v in base.state_dict().items())


def test_the_adapter_takes_the_bases_precision():
    base = make_base("llama").to(torch.bfloat16)
    model = RetroFitForCausalLM.from_base(base, chunk_size=C, cca_layers=[2])
    assert {p.dtype for p in model.retrofit.parameters()} == {torch.bfloat16}
    seq, retrieved = data(12)
    with torch.no_grad():
        assert model(input_ids=seq, retrieved=retrieved).logits.dtype == torch.bfloat16
