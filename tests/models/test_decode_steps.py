"""Decoding is incremental: after the prompt, every forward call of generation processes exactly one
new token per row and continues the cache that holds everything before it.

Equal tokens cannot catch a generation loop that recomputes the whole sequence at each step (the
tokens stay right; only the cost and the constant-memory claim break, as happened when transformers
5.24 renamed the cache keyword). These tests count, in a forward pre-hook, the tokens each call is
given and how many tokens its cache has already seen.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import CallLog, FakeDatabase, assert_incremental, tiny_retnet, tiny_retro

from retlm import RETRO, RetNetForCausalLM
from retlm.compat import CACHE_NAME, cache_kwargs, output_cache

VOCAB = 53
C = 4  # RETRO chunk size
PROMPT = 11
NEW = 16


def retnet_model() -> RetNetForCausalLM:
    return tiny_retnet(vocab_size=VOCAB)


def retro_model(decoder: str) -> RETRO:
    return tiny_retro(decoder, num_tokens=VOCAB, max_seq_len=64, pad_id=0)


def prompt(batch: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, PROMPT), generator=torch.Generator().manual_seed(1))


GENERATE_MODES = {
    "greedy": dict(do_sample=False),
    "sampling": dict(do_sample=True, top_k=20, top_p=0.9),
    "beam": dict(num_beams=3, do_sample=False),
}


@pytest.mark.parametrize("mode", sorted(GENERATE_MODES))
@pytest.mark.parametrize("family", ["retnet", "retro-transformer", "retro-retnet"])
def test_hf_generate_decodes_one_token_per_step(family: str, mode: str) -> None:
    model = retnet_model() if family == "retnet" else retro_model(family.split("-")[1])
    with CallLog(model) as log:
        out = model.generate(prompt(2), max_new_tokens=NEW, min_new_tokens=NEW, **GENERATE_MODES[mode])
    assert out.shape == (2, PROMPT + NEW)
    # the last token is sampled from the logits of call NEW and never fed back
    assert_incremental(log.calls, PROMPT, NEW)


def test_retnet_inputs_embeds_prompt_then_one_token_per_step() -> None:
    model = retnet_model()
    embeds = model.get_input_embeddings()(prompt()).detach()
    with CallLog(model) as log:
        model.generate(inputs_embeds=embeds, do_sample=False, max_new_tokens=NEW)
    assert_incremental(log.calls, PROMPT, NEW)


@pytest.mark.parametrize("name", ["past_key_values", "cache"])
@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")  # 5.24+, user's choice
def test_retnet_continuation_from_a_returned_cache_feeds_only_new_tokens(name: str) -> None:
    """A second generate() on a returned cache feeds only the unseen last token, under either name."""
    model = retnet_model()
    first = model.generate(prompt(), do_sample=False, max_new_tokens=4, return_dict_in_generate=True)
    cache = output_cache(first)
    assert cache.get_seq_length() == PROMPT + 3  # the last generated token was never fed back
    with CallLog(model) as log:
        resumed = model.generate(first.sequences, do_sample=False, max_new_tokens=5, **{name: cache})
    assert_incremental(log.calls, 1, 5, seen=PROMPT + 3)
    assert torch.equal(resumed, model.generate(prompt(), do_sample=False, max_new_tokens=9))


@pytest.mark.parametrize("do_sample", [False, True])
@pytest.mark.parametrize("decoder", ["transformer", "retnet"])
def test_retrieval_generation_decodes_one_token_per_step(decoder: str, do_sample: bool) -> None:
    model = retro_model(decoder)
    with CallLog(model) as log:
        out = model.generate(
            prompt(2),
            retrieval_database=FakeDatabase(C, VOCAB),
            max_new_tokens=NEW,
            do_sample=do_sample,
            generator=torch.Generator().manual_seed(0),
        )
    assert out.sequences.shape == (2, PROMPT + NEW)
    assert_incremental(log.calls, PROMPT, NEW)
    assert [r.chunk_index for r in out.retrievals[0]] == list(range((PROMPT + NEW - 1) // C))


@pytest.mark.parametrize("family", ["retnet", "retro-transformer", "retro-retnet"])
def test_outputs_answer_to_both_cache_names(family: str) -> None:
    """retlm's outputs hold the cache under the installed name and also answer to the other one."""
    model = retnet_model() if family == "retnet" else retro_model(family.split("-")[1])
    out = model(input_ids=prompt(), use_cache=True)
    cache = getattr(out, CACHE_NAME)
    assert cache is not None and cache.get_seq_length() == PROMPT
    assert out.past_key_values is cache and out.cache is cache and output_cache(out) is cache
    nxt = model(input_ids=prompt()[:, :1], use_cache=True, **cache_kwargs(cache))
    assert output_cache(nxt).get_seq_length() == PROMPT + 1
    with pytest.raises(ValueError, match="either `cache` or `past_key_values`"):
        model(
            input_ids=prompt()[:, :1],
            cache=cache,
            past_key_values=type(cache)(*([model.config.num_layers] if family == "retnet" else [])),
        )


def test_retlm_calls_log_no_cache_deprecation(recwarn: pytest.WarningsRecorder) -> None:
    """Generation, continuation, retrieval generation and reading the cache off an output, on the
    installed transformers: no "deprecated" line in transformers' log, no FutureWarning."""
    import logging

    from transformers.utils import logging as hf_logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = hf_logging.get_logger("transformers")
    hf_logging.warning_once.cache_clear()  # a warning logged by an earlier test would be swallowed
    logger.addHandler(handler)
    try:
        retnet = retnet_model()
        first = retnet.generate(prompt(), max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        resume = cache_kwargs(output_cache(first))
        retnet.generate(first.sequences, max_new_tokens=2, do_sample=False, **resume)
        retnet.generate(prompt(), max_new_tokens=3, num_beams=2)
        for decoder in ("transformer", "retnet"):
            retro = retro_model(decoder)
            retro.generate(prompt(), max_new_tokens=3, do_sample=False)
            retro.generate(prompt(), retrieval_database=FakeDatabase(C, VOCAB), max_new_tokens=6)
            out = retro(input_ids=prompt(), use_cache=True)
            assert out.past_key_values is out.cache
    finally:
        logger.removeHandler(handler)
    assert not [r.getMessage() for r in records if "deprecat" in r.getMessage()]
    assert not [str(w.message) for w in recwarn if "deprecat" in str(w.message)]
