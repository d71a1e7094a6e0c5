"""RetNet model: the three modes agree end-to-end, caches hand over between modes, padding is per row,
the seed README runs, save/load and Auto classes work, and bad input is refused clearly."""

from __future__ import annotations

import copy
import json
import os
from itertools import product

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from retlm import RetNetConfig, RetNetForCausalLM, RetNetModel, RetNetModelWithLMHead, load_config_from_yaml
from retlm.models.retnet import RetNetCache
from retlm.models.retnet.configuration_retnet import CONFIGS_DIR

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODES = ("parallel", "chunkwise", "recurrent")
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}


def tiny_config(**overrides) -> RetNetConfig:
    fields = dict(
        vocab_size=61,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        qk_dim=32,
        v_dim=48,
        ffn_proj_size=64,
        use_default_gamma=False,
        pad_token_id=0,
    )
    fields.update(overrides)
    return RetNetConfig(**fields)


def tiny_model(dtype: torch.dtype = torch.float32, seed: int = 0, cls=RetNetForCausalLM, **overrides):
    torch.manual_seed(seed)
    return cls(tiny_config(**overrides)).to(dtype).eval()


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """Frobenius-norm relative error ||ours - reference|| / ||reference||."""
    return ((ours - reference).norm() / reference.norm().clamp(min=1e-300)).item()


def assert_close(ours, reference, dtype, what: str) -> None:
    err = relative_error(ours, reference)
    assert err <= TOLERANCE[dtype], f"{what}: relative error {err:.2e} > {TOLERANCE[dtype]:.0e}"


def assert_caches_close(cache: RetNetCache, reference: RetNetCache, dtype, what: str) -> None:
    assert cache.seen_tokens == reference.seen_tokens
    assert torch.equal(cache.position_offset, reference.position_offset)
    for idx in range(len(reference.layers)):
        for name, ours, ref in zip(("kv", "z"), cache.get_state(idx), reference.get_state(idx), strict=True):
            assert_close(ours, ref, dtype, f"{what} layer {idx} {name}")


def random_ids(batch: int, length: int, vocab: int = 61, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------
# modes agree


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "length, chunk_size, norm_eps, offset",
    [
        (1, 4, 1e-6, 0),
        (23, 5, 1e-6, 0),
        (64, 16, 1e-2, 0),
        (37, 8, 0.5, 1000),
        (130, 64, 1e-6, 7),
        (700, 96, 1e-5, 0),
    ],
)
def test_modes_agree(dtype, length, chunk_size, norm_eps, offset) -> None:
    model = tiny_model(dtype, norm_eps=norm_eps)
    ids = random_ids(2, length, seed=length)
    with torch.no_grad():
        outs = {
            mode: model(
                ids,
                retention_mode=mode,
                retention_block_size=chunk_size,
                sequence_offset=offset,
                use_cache=True,
            )
            for mode in MODES
        }
    for mode in ("chunkwise", "recurrent"):
        assert_close(outs[mode].logits, outs["parallel"].logits, dtype, f"{mode} logits")
        assert_caches_close(outs[mode].past_key_values, outs["parallel"].past_key_values, dtype, mode)


def test_seed_defaults_agree_across_architectures() -> None:
    """LayerNorm + plain FFN with biases + xpos (the seed's configs) and layernorm_embedding, scaled."""
    model = tiny_model(
        norm_type="layernorm",
        use_glu=False,
        use_bias_in_mlp=True,
        use_bias_in_msr=True,
        use_bias_in_msr_out=True,
        position_encoding="xpos",
        layernorm_embedding=True,
        scale_embedding=True,
        activation="swish",
    )
    ids = random_ids(2, 41)
    with torch.no_grad():
        ref = model(ids, retention_mode="parallel").logits
        for mode in ("chunkwise", "recurrent"):
            assert_close(
                model(ids, retention_mode=mode, retention_block_size=6).logits, ref, torch.float32, mode
            )


@pytest.mark.parametrize("first, second", list(product(MODES, MODES)))
def test_cache_handoff_between_modes(first: str, second: str) -> None:
    """A prefix in one mode, the rest in another (the cache carries over) = the whole in parallel."""
    model = tiny_model(torch.float64)
    ids = random_ids(2, 29, seed=5)
    with torch.no_grad():
        whole = model(ids, retention_mode="parallel", use_cache=True)
        head = model(ids[:, :11], retention_mode=first, retention_block_size=4, use_cache=True)
        cache = head.past_key_values
        tail = model(
            ids[:, 11:], retention_mode=second, retention_block_size=3, past_key_values=cache, use_cache=True
        )
    logits = torch.cat([head.logits, tail.logits], dim=1)
    assert_close(logits, whole.logits, torch.float64, f"{first}->{second}")
    assert_caches_close(tail.past_key_values, whole.past_key_values, torch.float64, f"{first}->{second}")


def test_backward_agrees_between_modes() -> None:
    model = tiny_model(torch.float64).train()
    ids = random_ids(2, 19)
    grads = {}
    for mode in MODES:
        model.zero_grad()
        model(ids, labels=ids, retention_mode=mode, retention_block_size=4, use_cache=False).loss.backward()
        grads[mode] = torch.cat([p.grad.flatten() for p in model.parameters()])
    for mode in ("chunkwise", "recurrent"):
        assert_close(grads[mode], grads["parallel"], torch.float64, f"{mode} gradients")


@pytest.mark.parametrize("position_encoding", ["rotary", "xpos"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_long_sequence_is_finite(dtype, position_encoding: str) -> None:
    model = tiny_model(dtype, position_encoding=position_encoding)
    ids = random_ids(1, 4096)
    with torch.no_grad():
        out = model(ids, retention_mode="chunkwise", retention_block_size=256, use_cache=True)
    assert torch.isfinite(out.logits).all()
    kv, z = out.past_key_values.get_state(0)
    assert kv.dtype == torch.float32 and torch.isfinite(kv).all() and torch.isfinite(z).all()


# ---------------------------------------------------------------------------------------------------
# padding


@pytest.mark.parametrize("mode", MODES)
def test_left_padding_matches_rows_alone(mode: str) -> None:
    model = tiny_model()
    lengths = [13, 5, 9]
    width = max(lengths)
    rows = [random_ids(1, n, seed=n)[0] for n in lengths]
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    with torch.no_grad():
        batch = model(ids, attention_mask=mask, retention_mode=mode, retention_block_size=4, use_cache=True)
        # one more token for every row, recurrently, with the growing mask generate() would pass
        step_ids = random_ids(len(rows), 1, seed=99)
        step_mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=torch.long)], dim=1)
        cache = batch.past_key_values
        step = model(step_ids, attention_mask=step_mask, past_key_values=cache, use_cache=True)
        for i, row in enumerate(rows):
            alone = model(row[None], retention_mode="parallel", use_cache=True)
            n = len(row)
            assert_close(batch.logits[i, width - n :], alone.logits[0], torch.float32, f"row {i}")
            alone_step = model(step_ids[i : i + 1], past_key_values=alone.past_key_values, use_cache=True)
            assert_close(step.logits[i], alone_step.logits[0], torch.float32, f"row {i} next step")
            assert int(step.past_key_values.position_offset[i]) == n + 1


def test_right_padding_leaves_real_tokens_untouched() -> None:
    model = tiny_model()
    ids = random_ids(1, 10)
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 10), torch.zeros(1, 4)], dim=1).long()
    with torch.no_grad():
        alone = model(ids).logits
        batch = model(padded, attention_mask=mask, retention_mode="chunkwise", retention_block_size=3).logits
    assert_close(batch[:, :10], alone, torch.float32, "right padding")


# ---------------------------------------------------------------------------------------------------
# the seed README


# float32 rounding of the seed example: each block's output goes through matrix products whose inner
# dimension is at most n = 1024 (v_dim, ffn_proj_size). The probabilistic rounding bound for an inner
# product of length n is lambda * sqrt(n) * u relative (Higham & Mary 2019), with u = 2**-24 the unit
# roundoff of float32, and the errors of the 8 blocks add at worst linearly through the residual stream.
# With lambda = 4: 8 * 4 * sqrt(1024) * 2**-24 = 6.1e-5. Measured over 6 seeds: 3.8e-6 .. 1.06e-5. A wrong
# formula (a decay, a normaliser, a position off by one) moves the result by 1e-2 or more.
SEED_EXAMPLE_FLOAT32_TOLERANCE = 8 * 4 * 1024**0.5 * 2.0**-24


def seed_example_outputs(model: RetNetModel, input_ids: torch.Tensor) -> dict:
    """The seed README's three computations: ``{mode: (last_hidden_state, cache)}``."""
    parallel_outputs = model(input_ids, retention_mode="parallel", use_cache=True)
    past_kv = None
    rnn_state = []
    for i in range(input_ids.shape[1]):
        rnn_out = model(
            input_ids[:, i : i + 1],
            retention_mode="recurrent",
            past_key_values=past_kv,
            use_cache=True,
            sequence_offset=i,
        )  # noqa: E501
        rnn_state.append(rnn_out.last_hidden_state)
        past_kv = rnn_out.past_key_values
    chunk_outputs = model(input_ids, retention_mode="chunkwise", use_cache=True, retention_block_size=4)
    return {
        "parallel": (parallel_outputs.last_hidden_state, parallel_outputs.past_key_values),
        "recurrent": (torch.cat(rnn_state, dim=1), rnn_out.past_key_values),
        "chunkwise": (chunk_outputs.last_hidden_state, chunk_outputs.past_key_values),
    }


@pytest.mark.heavy
def test_seed_readme_quick_example() -> None:
    """The seed README's first example (import path changed): the three modes in float64 agree to
    1e-10 (the formula), and each float32 mode is within float32 rounding of the float64 reference."""
    from retlm import RetNetConfig, RetNetModel

    torch.manual_seed(0)
    config = RetNetConfig(
        num_layers=8,
        hidden_size=512,
        num_heads=4,
        qk_dim=512,
        v_dim=1024,
        ffn_proj_size=1024,
        use_default_gamma=False,
    )
    model = RetNetModel(config).eval()
    input_ids = torch.LongTensor([[1, 2, 3, 4, 5, 6, 7, 8]])

    with torch.no_grad():
        reference = seed_example_outputs(copy.deepcopy(model).double(), input_ids)
        ours = seed_example_outputs(model, input_ids)
    ref_state, ref_cache = reference["parallel"]
    for mode in ("recurrent", "chunkwise"):
        assert_close(reference[mode][0], ref_state, torch.float64, f"float64 {mode} vs parallel")
        assert_caches_close(reference[mode][1], ref_cache, torch.float64, f"float64 {mode} cache")
    for mode, (state, cache) in ours.items():
        err = relative_error(state.double(), ref_state)
        assert err <= SEED_EXAMPLE_FLOAT32_TOLERANCE, f"float32 {mode}: relative error {err:.2e}"
        for idx in range(config.num_layers):
            pairs = zip(("kv", "z"), cache.get_state(idx), ref_cache.get_state(idx), strict=True)
            for name, got, want in pairs:
                err = relative_error(got.double(), want)
                assert err <= SEED_EXAMPLE_FLOAT32_TOLERANCE, f"float32 {mode} cache {idx} {name}: {err:.2e}"


def gpt2_tokenizer():
    """The seed README's GPT-2 tokenizer, offline: ``retlm.load_tokenizer("gpt2")`` in place of
    ``AutoTokenizer.from_pretrained("gpt2")`` (no model hub here)."""
    import retlm

    return retlm.load_tokenizer("gpt2")


@pytest.mark.slow
def test_seed_readme_generation_example() -> None:
    """The README's generation example with the 1.3b config (5 GB of float32 weights)."""
    from retlm import RetNetModelWithLMHead, load_config_from_yaml

    config = load_config_from_yaml("configs/retnet-1.3b.yml")
    model = RetNetModelWithLMHead(config)

    tokenizer = gpt2_tokenizer()
    tokenizer.model_max_length = 8192
    tokenizer.pad_token = tokenizer.eos_token

    inputs = tokenizer("Retention refers to", return_tensors="pt")

    # parallel forward
    generated = model.generate(**inputs, parallel_compute_prompt=True, max_new_tokens=20)
    tokenizer.batch_decode(generated)
    assert generated.shape == (1, inputs["input_ids"].shape[1] + 20)


def test_seed_readme_generation_example_small() -> None:
    """The same code path as the README's generation example, on a bundled config shrunk to test size."""
    config = load_config_from_yaml("configs/retnet-1.3b.yml")
    assert (config.hidden_size, config.num_layers, config.num_heads) == (2048, 24, 8)
    small = dict(hidden_size=64, qk_dim=64, v_dim=128, ffn_proj_size=128, num_layers=2)
    config.update(small)
    torch.manual_seed(0)
    model = RetNetModelWithLMHead(config).eval()
    tokenizer = gpt2_tokenizer()
    assert config.vocab_size == len(tokenizer) == 50257
    inputs = tokenizer("Retention refers to", return_tensors="pt")
    assert inputs["input_ids"].tolist() == [[9781, 1463, 10229, 284]]
    parallel = model.generate(**inputs, parallel_compute_prompt=True, max_new_tokens=20, do_sample=False)
    recurrent = model.generate(**inputs, parallel_compute_prompt=False, max_new_tokens=20, do_sample=False)
    assert parallel.shape == (1, inputs["input_ids"].shape[1] + 20)
    assert torch.equal(parallel, recurrent)
    assert isinstance(tokenizer.batch_decode(parallel)[0], str)


# ---------------------------------------------------------------------------------------------------
# configs, save/load, Auto classes

SEED_SIZES = {"300m": (1280, 12, 8), "1.3b": (2048, 24, 8), "2.7b": (2560, 32, 10), "6.7b": (4096, 32, 16)}


@pytest.mark.parametrize("size", list(SEED_SIZES))
def test_bundled_configs(size: str) -> None:
    for name in (f"retnet-{size}", f"retnet-paper-{size}"):
        if not (CONFIGS_DIR / f"{name}.yml").exists():
            continue
        config = load_config_from_yaml(CONFIGS_DIR / f"{name}.yml")
        assert (config.hidden_size, config.num_layers, config.num_heads) == SEED_SIZES[size]
        assert config.v_dim == config.ffn_proj_size == 2 * config.hidden_size
        with torch.device("meta"):
            n_params = sum(p.numel() for p in RetNetForCausalLM(config).parameters())
        nominal = {"300m": 0.3e9, "1.3b": 1.3e9, "2.7b": 2.7e9, "6.7b": 6.7e9}[size]
        assert 0.6 * nominal < n_params < 1.4 * nominal, f"{name}: {n_params / 1e9:.2f}B parameters"


def test_missing_config_lists_bundled_ones() -> None:
    with pytest.raises(FileNotFoundError, match="retnet-1.3b"):
        load_config_from_yaml("configs/retnet-13b.yml")


@pytest.mark.parametrize("tied", [False, True])
def test_save_load_round_trip(tmp_path, tied: bool) -> None:
    model = tiny_model(tie_word_embeddings=tied)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.bin"))
    loaded = RetNetForCausalLM.from_pretrained(tmp_path).eval()
    saved, original = loaded.config.to_diff_dict(), model.config.to_diff_dict()
    saved.pop("_name_or_path", None)
    assert saved == original
    ids = random_ids(2, 17)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    shared = loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert shared == tied


def test_auto_classes(tmp_path) -> None:
    fields = {k: v for k, v in tiny_config().to_diff_dict().items() if k != "model_type"}
    config = AutoConfig.for_model("retnet", **fields)
    assert isinstance(config, RetNetConfig)
    assert isinstance(AutoModel.from_config(config), RetNetModel)
    model = AutoModelForCausalLM.from_config(config)
    assert isinstance(model, RetNetForCausalLM) and RetNetModelWithLMHead is RetNetForCausalLM
    model.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), RetNetConfig)
    assert isinstance(AutoModelForCausalLM.from_pretrained(tmp_path), RetNetForCausalLM)
    base = AutoModel.from_pretrained(tmp_path)
    assert isinstance(base, RetNetModel)
    assert torch.equal(base.embed_tokens.weight, model.model.embed_tokens.weight)


def test_hidden_states_and_tuple_output() -> None:
    model = tiny_model()
    ids = random_ids(1, 6)
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        as_tuple = model(ids, return_dict=False, use_cache=False)
    assert len(out.hidden_states) == model.config.num_layers + 1
    assert torch.equal(as_tuple[0], out.logits)


def test_inputs_embeds_equal_input_ids() -> None:
    model = tiny_model()
    ids = random_ids(2, 9)
    with torch.no_grad():
        from_ids = model(ids).logits
        from_embeds = model(inputs_embeds=model.get_input_embeddings()(ids)).logits
    assert torch.equal(from_ids, from_embeds)


# ---------------------------------------------------------------------------------------------------
# bad input


def test_unknown_retention_mode() -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match=r"retention_mode 'fast'.*parallel.*chunkwise.*recurrent"):
        model(random_ids(1, 4), retention_mode="fast")
    with pytest.raises(ValueError, match="retention_mode"):
        tiny_config(retention_mode="fast")


@pytest.mark.parametrize("block_size", [0, -3])
def test_non_positive_retention_block_size(block_size: int) -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match=r"retention_block_size must be a positive integer"):
        model(random_ids(1, 4), retention_mode="chunkwise", retention_block_size=block_size)
    with pytest.raises(ValueError, match="retention_block_size"):
        tiny_config(retention_block_size=block_size)


def test_old_names_of_the_retention_mode_and_block_still_work_with_a_warning(tmp_path) -> None:
    """``forward_impl`` / ``chunk_size`` (config keys, config attributes, forward and generate keywords)
    are the deprecated names of ``retention_mode`` / ``retention_block_size``: same results, and a
    DeprecationWarning, for one release. A config.json written before the rename loads."""
    model = tiny_model().eval()
    ids = random_ids(2, 9)
    expected = model(ids, retention_mode="chunkwise", retention_block_size=4).logits
    with pytest.warns(DeprecationWarning, match="forward_impl= is deprecated; use retention_mode="):
        old = model(ids, forward_impl="chunkwise", retention_block_size=4).logits
    assert torch.equal(old, expected)
    with pytest.warns(DeprecationWarning, match="chunk_size= is deprecated; use retention_block_size="):
        old = model.model(ids, retention_mode="chunkwise", chunk_size=4).last_hidden_state
    assert torch.equal(model.lm_head(old), expected)
    with pytest.warns(DeprecationWarning, match="forward_impl"):
        out = model.generate(
            ids[:1], max_new_tokens=3, do_sample=False, forward_impl="chunkwise", chunk_size=4
        )
    assert torch.equal(out, model.generate(ids[:1], max_new_tokens=3, do_sample=False))

    old_json = {**tiny_config().to_dict(), "forward_impl": "chunkwise", "chunk_size": 3}
    for key in ("retention_mode", "retention_block_size"):
        old_json.pop(key)
    (tmp_path / "config.json").write_text(json.dumps(old_json))
    with pytest.warns(DeprecationWarning, match="RetNetConfig.forward_impl is deprecated"):
        config = RetNetConfig.from_pretrained(tmp_path)
    assert (config.retention_mode, config.retention_block_size) == ("chunkwise", 3)
    with pytest.warns(DeprecationWarning, match="RetNetConfig.chunk_size is deprecated"):
        assert config.chunk_size == 3
    assert "chunk_size" not in config.to_dict() and "forward_impl" not in config.to_dict()


@pytest.mark.parametrize("other", [dict(num_layers=3), dict(num_heads=2), dict(v_dim=64)])
def test_cache_from_another_config(other: dict) -> None:
    model = tiny_model()
    foreign = tiny_model(**other)
    with torch.no_grad():
        cache = foreign(random_ids(1, 5), use_cache=True).past_key_values
        with pytest.raises(ValueError, match="another config"):
            model(random_ids(1, 1), past_key_values=cache)


def test_cache_of_wrong_type() -> None:
    from transformers import DynamicCache

    with pytest.raises(ValueError, match="RetNetCache"):
        tiny_model()(random_ids(1, 3), past_key_values=DynamicCache())


@pytest.mark.parametrize("bad_id", [-1, 61, 1000])
def test_token_ids_outside_vocab(bad_id: int) -> None:
    ids = random_ids(1, 5)
    ids[0, 2] = bad_id
    with pytest.raises(ValueError, match=r"outside the vocabulary.*\[0, 60\]"):
        tiny_model()(ids)


def test_sequence_offset_must_match_cache() -> None:
    model = tiny_model()
    with torch.no_grad():
        cache = model(random_ids(1, 5), use_cache=True).past_key_values
        with pytest.raises(ValueError, match="sequence_offset=3"):
            model(random_ids(1, 1), past_key_values=copy.deepcopy(cache), sequence_offset=3)
        model(random_ids(1, 1), past_key_values=cache, sequence_offset=5)  # the seed's usage: accepted


def test_cache_cannot_be_cropped() -> None:
    cache = tiny_model()(random_ids(1, 4), use_cache=True).past_key_values
    with pytest.raises(ValueError, match="cannot be cropped"):
        cache.crop(-1)
