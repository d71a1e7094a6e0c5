"""Generation that retrieves at chunk boundaries: the loop must feed each chunk's neighbors exactly
when training would (from the chunk's last token on), so greedy decoding equals the argmax of one full
forward pass over the final sequence with the neighbors the loop logged."""

import numpy as np
import pytest
import torch
from tiny_models import FakeDatabase, tiny_retro

from retlm import RETRO
from retlm.models.retrieval_generation import generate_with_retrieval

C = 4
VOCAB = 64


def model_for(decoder):
    return tiny_retro(decoder, max_seq_len=40).double()


@pytest.mark.parametrize("decoder", ["transformer", "retnet"])
@pytest.mark.parametrize("prompt_len", [1, 3, 4, 9])
def test_greedy_matches_full_forward_with_logged_neighbors(decoder, prompt_len):
    model, db = model_for(decoder), FakeDatabase(C, VOCAB)
    prompt = torch.randint(1, VOCAB, (2, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    out = generate_with_retrieval(model, db, prompt, max_new_tokens=14)
    seq = out.sequences
    assert seq.shape == (2, prompt_len + 14)
    assert torch.equal(seq[:, :prompt_len], prompt)
    # every chunk whose last token was fed got exactly one retrieval, in order
    fed = seq.shape[1] - 1
    n_chunks = fed // C
    for row in range(2):
        assert [r.chunk_index for r in out.retrievals[row]] == list(range(n_chunks))
        for r in out.retrievals[row]:
            np.testing.assert_array_equal(r.query, seq[row, r.chunk_index * C : (r.chunk_index + 1) * C])
    retrieved = torch.stack(
        [torch.stack([torch.as_tensor(r.tokens) for r in rows]) for rows in out.retrievals]
    )
    # full forward over all fed tokens, padded to whole chunks' worth of neighbors
    logits = model(input_ids=seq[:, :fed], retrieved=retrieved[:, : fed // C]).logits
    assert torch.equal(logits[:, prompt_len - 1 :].argmax(-1), seq[:, prompt_len:])


@pytest.mark.heavy
def test_sampling_is_reproducible_and_respects_top_k():
    model, db = model_for("retnet"), FakeDatabase(C, VOCAB)
    prompt = torch.randint(1, VOCAB, (1, 5), generator=torch.Generator().manual_seed(0))
    runs = [
        generate_with_retrieval(
            model,
            db,
            prompt,
            max_new_tokens=10,
            do_sample=True,
            temperature=0.8,
            top_k=1,
            generator=torch.Generator().manual_seed(s),
        ).sequences
        for s in (1, 2)
    ]
    greedy = generate_with_retrieval(model, db, prompt, max_new_tokens=10).sequences
    assert torch.equal(runs[0], greedy) and torch.equal(runs[1], greedy)  # top_k=1 is greedy
    a, b = (
        generate_with_retrieval(
            model,
            db,
            prompt,
            max_new_tokens=10,
            do_sample=True,
            top_p=0.9,
            generator=torch.Generator().manual_seed(3),
        ).sequences
        for _ in range(2)
    )
    assert torch.equal(a, b)


def model_favouring(token: int, margin: float = 3.0) -> RETRO:
    """A model whose logits put ``token`` ahead of every other by ~``margin`` at every position."""
    model = model_for("transformer")
    with torch.no_grad():
        model.to_logits.bias[token] += margin
    return model


@pytest.mark.parametrize(
    "penalties", [{"repetition_penalty": 20.0}, {"no_repeat_ngram_size": 2}, {"repetition_penalty": 1.5}]
)
def test_repetition_penalties_match_hf_generate_and_break_a_favoured_repeat(penalties):
    model = model_favouring(7)
    prompt = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    plain = generate_with_retrieval(model, None, prompt, max_new_tokens=10).sequences
    assert (plain[:, 6:] == 7).all()  # unpenalised, greedy repeats the favoured token
    ours = generate_with_retrieval(model, None, prompt, max_new_tokens=10, **penalties).sequences
    # the reference: HF's own generate, with the same processors it builds from the same options
    reference = model.generate(prompt, max_new_tokens=10, do_sample=False, **penalties)
    assert torch.equal(ours, reference)
    if penalties.get("repetition_penalty", 1.0) > 10 or "no_repeat_ngram_size" in penalties:
        assert not torch.equal(ours, plain)  # strong enough to change the text (1.5 is not, here)
    if "no_repeat_ngram_size" in penalties:
        for row in ours.tolist():
            bigrams = list(zip(row, row[1:], strict=False))
            assert len(bigrams) == len(set(bigrams))
    if "repetition_penalty" in penalties and penalties["repetition_penalty"] > 10:
        assert (ours[:, 6] == 7).all() and (ours[:, 7] != 7).all()  # once produced, 7 is divided down


def test_repetition_penalty_applies_before_sampling_warpers():
    """With top_k=1 sampling is greedy over the penalised logits, so it must avoid the repeat too."""
    model = model_favouring(7)
    prompt = torch.randint(1, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    sampled = generate_with_retrieval(
        model,
        None,
        prompt,
        max_new_tokens=10,
        do_sample=True,
        top_k=1,
        repetition_penalty=20.0,
        generator=torch.Generator().manual_seed(0),
    ).sequences
    greedy = generate_with_retrieval(
        model, None, prompt, max_new_tokens=10, repetition_penalty=20.0
    ).sequences
    assert torch.equal(sampled, greedy)
    assert sampled[0, 6] == 7 and sampled[0, 7] != 7


def test_without_database_no_retrieval_and_eos_stops():
    model = model_for("transformer")
    prompt = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    out = generate_with_retrieval(model, None, prompt, max_new_tokens=8)
    plain = model(input_ids=out.sequences[:, :-1]).logits.argmax(-1)
    assert torch.equal(plain[:, 5:], out.sequences[:, 6:])
    eos = int(out.sequences[0, 6])
    stopped = generate_with_retrieval(model, None, prompt, max_new_tokens=8, eos_token_id=eos)
    assert (stopped.sequences[0, 6:] == eos).all()


def test_bad_input():
    model = model_for("transformer")
    with pytest.raises(ValueError, match="max_seq_len"):
        generate_with_retrieval(model, None, torch.ones(1, 30, dtype=torch.long), max_new_tokens=20)
    db = FakeDatabase(C, VOCAB)
    db.chunk_size = 8
    with pytest.raises(ValueError, match="chunk_size"):
        generate_with_retrieval(model, db, torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        generate_with_retrieval(
            model, None, torch.ones(1, 3, dtype=torch.long), max_new_tokens=4, do_sample=True, temperature=0
        )
    with pytest.raises(ValueError, match="penalty"):
        generate_with_retrieval(
            model, None, torch.ones(1, 3, dtype=torch.long), max_new_tokens=4, repetition_penalty=0.0
        )


def test_model_generate_with_database_delegates_to_the_retrieving_loop():
    model, db = model_for("retnet"), FakeDatabase(C, VOCAB)
    prompt = torch.randint(1, VOCAB, (1, 6), generator=torch.Generator().manual_seed(4))
    via_model = model.generate(prompt, retrieval_database=db, max_new_tokens=7)
    direct = generate_with_retrieval(model, FakeDatabase(C, VOCAB), prompt, max_new_tokens=7)
    assert torch.equal(via_model.sequences, direct.sequences)
    assert len(via_model.retrievals[0]) == (6 + 7 - 1) // C


class RecordingStreamer:
    """HF's ``BaseStreamer`` protocol; records every ``put`` and ``end`` with the retrievals between them."""

    def __init__(self, stop_after: int | None = None):
        self.events: list = []
        self.stop_after = stop_after

    def put(self, value):
        self.events.append(("put", value.clone()))
        if self.stop_after is not None and len(self.events) > self.stop_after:
            raise KeyboardInterrupt("cancelled by the streamer")

    def end(self):
        self.events.append(("end", None))

    def on_retrieval(self, row, step):
        self.events.append(("retrieval", (row, step)))


@pytest.mark.parametrize("decoder", ["transformer", "retnet"])
def test_streamer_and_on_retrieval_see_every_token_and_search_in_order(decoder):
    """The streamer gets the prompt, then one (batch,) token per step, then end(), as HF's ``generate``
    drives it; each retrieval is announced after the token that completes its chunk went out."""
    model, db = model_for(decoder), FakeDatabase(C, VOCAB)
    prompt = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(5))
    recorder = RecordingStreamer()
    out = generate_with_retrieval(
        model, db, prompt, max_new_tokens=9, streamer=recorder, on_retrieval=recorder.on_retrieval
    )
    puts = [v for kind, v in recorder.events if kind == "put"]
    assert torch.equal(puts[0], prompt) and all(p.shape == (2,) for p in puts[1:])
    assert torch.equal(torch.cat([puts[0], torch.stack(puts[1:], dim=1)], dim=1), out.sequences)
    assert recorder.events[-1][0] == "end"
    seen = [[], []]
    for i, (kind, value) in enumerate(recorder.events):
        if kind != "retrieval":
            continue
        row, step = value
        seen[row].append(step)
        tokens_out = sum(v.shape[-1] if v.dim() == 2 else 1 for k, v in recorder.events[:i] if k == "put")
        end = (step.chunk_index + 1) * C
        # a prompt chunk is searched after the prompt went out; a generated one right after its last token
        assert tokens_out == (6 if end <= 6 else end)
    for row in range(2):
        assert [s.chunk_index for s in seen[row]] == [r.chunk_index for r in out.retrievals[row]]
        assert all(a is b for a, b in zip(seen[row], out.retrievals[row], strict=True))


def test_an_exception_from_the_streamer_ends_generation():
    model, db = model_for("transformer"), FakeDatabase(C, VOCAB)
    prompt = torch.randint(1, VOCAB, (1, 6), generator=torch.Generator().manual_seed(6))
    recorder = RecordingStreamer(stop_after=3)
    with pytest.raises(KeyboardInterrupt, match="cancelled"):
        generate_with_retrieval(model, db, prompt, max_new_tokens=20, streamer=recorder)
    assert len(recorder.events) == 4  # the prompt and three tokens, then nothing more was computed
