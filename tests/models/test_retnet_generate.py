"""HF generate() on RetNetForCausalLM: greedy equals step-by-step argmax, sampling and beam search run
and are reproducible, beam search with the cache equals beam search without it, and left-padded
batches give every row the tokens it gets alone."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_retnet
from training_helpers import left_pad

from retlm import RetNetForCausalLM
from retlm.compat import cache_kwargs, output_cache

VOCAB = 53
PAD = 0


def tiny_model(seed: int = 0, **overrides) -> RetNetForCausalLM:
    return tiny_retnet(seed, vocab_size=VOCAB, pad_token_id=PAD, **overrides)


def prompt(length: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def argmax_decode(model: RetNetForCausalLM, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Reference greedy decoding: recompute the whole sequence in parallel mode at every step."""
    for _ in range(steps):
        with torch.no_grad():
            logits = model(ids, retention_mode="parallel", use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(parallel_compute_prompt=False),
        dict(retention_mode="chunkwise", retention_block_size=3),
        dict(use_cache=False),
    ],
    ids=["parallel-prompt", "recurrent-prompt", "chunkwise-prompt", "no-cache"],
)
@pytest.mark.heavy
def test_greedy_equals_stepwise_argmax(options: dict) -> None:
    model = tiny_model()
    ids = prompt(7, batch=2)
    generated = model.generate(ids, max_new_tokens=12, do_sample=False, **options)
    assert torch.equal(generated, argmax_decode(model, ids, 12))


def test_chunkwise_config_prompts_chunkwise() -> None:
    model = tiny_model(retention_mode="chunkwise", retention_block_size=4)
    ids = prompt(10)
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), argmax_decode(model, ids, 6))


@pytest.mark.heavy
def test_sampling_is_reproducible_with_a_seed() -> None:
    model = tiny_model()
    ids = prompt(5, batch=2)
    options = dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, max_new_tokens=15)
    torch.manual_seed(123)
    first = model.generate(ids, **options)
    torch.manual_seed(123)
    second = model.generate(ids, **options)
    torch.manual_seed(7)
    other = model.generate(ids, **options, num_return_sequences=3)
    assert torch.equal(first, second)
    assert first.shape == (2, 20) and other.shape == (6, 20)
    assert int(first.min()) >= 0 and int(first.max()) < VOCAB
    greedy = model.generate(ids, do_sample=False, max_new_tokens=15)
    assert not torch.equal(first, greedy)  # sampling actually sampled


def test_sampling_with_cache_equals_sampling_without() -> None:
    """Same seed, same draws: the recurrent cache produces the distributions full recomputation does."""
    model = tiny_model()
    ids = prompt(6, batch=2)
    options = dict(do_sample=True, temperature=1.3, top_k=0, top_p=0.95, max_new_tokens=10)
    torch.manual_seed(5)
    cached = model.generate(ids, **options)
    torch.manual_seed(5)
    uncached = model.generate(ids, use_cache=False, **options)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("num_beams", [2, 4])
def test_beam_search_with_cache_equals_without(num_beams: int) -> None:
    """Beam search reorders the cache every step; full recomputation (use_cache=False) needs no reordering."""
    model = tiny_model()
    ids = prompt(6, batch=2)
    options = dict(num_beams=num_beams, do_sample=False, max_new_tokens=10, num_return_sequences=2)
    cached = model.generate(ids, **options)
    assert cached.shape == (4, 16)
    assert torch.equal(cached, model.generate(ids, use_cache=False, **options))
    assert torch.equal(cached, model.generate(ids, **options))  # deterministic


def test_beam_sampling_is_reproducible() -> None:
    model = tiny_model()
    ids = prompt(4)
    options = dict(num_beams=3, do_sample=True, top_k=10, max_new_tokens=8)
    torch.manual_seed(1)
    first = model.generate(ids, **options)
    torch.manual_seed(1)
    assert torch.equal(first, model.generate(ids, **options))


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(parallel_compute_prompt=False),
        dict(retention_mode="chunkwise", retention_block_size=4),
        dict(num_beams=3),
    ],
    ids=["greedy", "recurrent-prompt", "chunkwise-prompt", "beam"],
)
def test_left_padded_batch_equals_rows_alone(options: dict) -> None:
    model = tiny_model()
    rows = [prompt(n, seed=n)[0] for n in (9, 3, 6)]
    ids, mask = left_pad(rows)
    batch = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=8, **options)
    for i, row in enumerate(rows):
        alone = model.generate(row[None], do_sample=False, max_new_tokens=8, **options)
        assert torch.equal(batch[i, -8:], alone[0, -8:]), f"row {i}"


def test_inputs_embeds_prompt() -> None:
    model = tiny_model()
    ids = prompt(5)
    embeds = model.get_input_embeddings()(ids).detach()
    from_embeds = model.generate(inputs_embeds=embeds, do_sample=False, max_new_tokens=6)
    from_ids = model.generate(ids, do_sample=False, max_new_tokens=6)
    assert torch.equal(from_embeds, from_ids[:, -6:])


def test_return_dict_in_generate_returns_the_cache() -> None:
    model = tiny_model()
    out = model.generate(prompt(5), do_sample=False, max_new_tokens=4, return_dict_in_generate=True)
    cache = output_cache(out)
    # the last generated token was never fed back, so the cache has seen prompt + 3 tokens
    assert cache.get_seq_length() == 5 + 3
    assert int(cache.position_offset[0]) == 8


def test_generation_continues_from_a_returned_cache() -> None:
    """generate(..., cache=cache) (past_key_values= before transformers 5.24) continues a generate."""
    model = tiny_model()
    ids = prompt(5, batch=2)
    first = model.generate(ids, do_sample=False, max_new_tokens=4, return_dict_in_generate=True)
    resumed = model.generate(
        first.sequences, **cache_kwargs(output_cache(first)), do_sample=False, max_new_tokens=5
    )
    assert torch.equal(resumed, model.generate(ids, do_sample=False, max_new_tokens=9))
