"""`retlm serve` through the official `openai` client, against a live server on a free loopback port.

Every answer is compared with a direct computation on the same model: ``generate_text`` (RETRO, with the
retrieval it logged) or HF ``generate`` (a causal LM); the streamed text and retrieval steps with the
whole response; 16 concurrent clients (batched) with each prompt run alone.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from serve_helpers import MODEL_ID, cca_backend, live_server, llama_backend, request

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

PROMPT = "The assert statement is a convenient way to"


@pytest.fixture(scope="module")
def live(serve_paths):
    backend = cca_backend(serve_paths)
    with live_server(backend, max_tokens=64) as server:
        yield server


def reference(live, prompt: str, max_new_tokens: int, **options):
    """``generate_text`` on the server's own model and database, outside the server (it is idle)."""
    from retlm.generation import generate_text

    backend = live.service.backend
    return generate_text(
        backend.model,
        backend.database,
        prompt,
        max_new_tokens=max_new_tokens,
        eos_token_id=backend.database.eos_id,
        **options,
    )


def steps_of(result) -> list[tuple[str, list[int], list[str]]]:
    return [(query, [n.chunk_id for n in ns], [n.doc_name for n in ns]) for query, ns in result.chunks]


def read_text(live, chunk_id: int) -> str:
    """What CCA reads for a neighbor: the chunk and its continuation, as text."""
    db = live.service.backend.database
    tokens = db.retrieved_tokens(np.array([chunk_id]))[0]
    return db.tokenizer.decode([int(t) for t in tokens if t != db.pad_id], skip_special_tokens=True)


def as_tuple(step: dict) -> tuple[str, list[int], list[str]]:
    neighbors = step["neighbors"]
    return step["query"], [n["chunk_id"] for n in neighbors], [n["doc_name"] for n in neighbors]


@pytest.mark.heavy
def test_completion_text_and_retrieval_equal_generate_text(live):
    out = live.client().completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=40, temperature=0)
    ref = reference(live, PROMPT, 40)
    choice = out.choices[0]
    assert choice.text == ref.continuation
    assert choice.finish_reason == "length" and out.usage.completion_tokens == 40
    assert out.usage.prompt_tokens == len(live.service.backend.encode(PROMPT))
    steps = out.model_extra["retrieval"]
    assert [as_tuple(step) for step in steps] == steps_of(ref)
    c = live.service.backend.chunk_size
    for u, (step, (_, neighbors)) in enumerate(zip(steps, ref.chunks, strict=True)):
        assert step["token_offset"] == (u + 1) * c
        assert step["source"] == ("prompt" if (u + 1) * c <= out.usage.prompt_tokens else "completion")
        for got, want in zip(step["neighbors"], neighbors, strict=True):
            assert got["score"] == pytest.approx(want.score, abs=1e-5) and got["doc_id"] == want.doc_id
            assert got["text"] == read_text(live, want.chunk_id)  # the chunk and its continuation


@pytest.mark.heavy
def test_stream_equals_the_whole_response_and_orders_retrieval_by_text(live):
    client = live.client()
    whole = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=40, temperature=0)
    text, steps, offsets, reasons, usage = "", [], [], [], None
    stream = client.completions.create(
        model=MODEL_ID,
        prompt=PROMPT,
        max_tokens=40,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        for step in (chunk.model_extra or {}).get("retrieval", []):
            steps.append(step)
            offsets.append(len(text))  # the completion text received before this step arrived
        for choice in chunk.choices:
            text += choice.text
            reasons += [choice.finish_reason] if choice.finish_reason else []
        usage = chunk.usage or usage
    assert text == whole.choices[0].text
    assert steps == whole.model_extra["retrieval"]
    assert reasons == ["length"] and usage.completion_tokens == 40
    later = [(s, o) for s, o in zip(steps, offsets, strict=True) if s["source"] == "completion"]
    assert later and all(s["text_offset"] == o for s, o in later)  # sent where the model read them


def test_retrieval_off_is_the_model_alone(live):
    out = live.client().completions.create(
        model=MODEL_ID, prompt=PROMPT, max_tokens=24, temperature=0, extra_body={"retrieval": False}
    )
    assert out.choices[0].text == reference(live, PROMPT, 24, retrieval=False).continuation
    assert out.model_extra["retrieval"] == []
    on = live.client().completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=24, temperature=0)
    assert on.model_extra["retrieval"]


def test_chat_without_a_template_continues_a_transcript(live):
    from retlm.serve.backends import plain_chat_prompt

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is assert?"}]
    out = live.client().chat.completions.create(
        model=MODEL_ID, messages=messages, max_tokens=20, temperature=0
    )
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == reference(live, plain_chat_prompt(messages), 20).continuation
    streamed = live.client().chat.completions.create(
        model=MODEL_ID, messages=messages, max_tokens=20, temperature=0, stream=True
    )
    chunks = [c for c in streamed if c.choices]  # the others carry retrieval steps
    assert chunks[0].choices[0].delta.role == "assistant"
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == out.choices[0].message.content
    )


def test_seed_n_and_stop(live):
    client = live.client()

    def sample(seed: int):
        out = client.completions.create(
            model=MODEL_ID, prompt=PROMPT, max_tokens=12, temperature=1.0, top_p=0.9, n=3, seed=seed
        )
        return [c.text for c in sorted(out.choices, key=lambda c: c.index)]

    first = sample(7)
    assert len(first) == 3 and len(set(first)) > 1  # three draws, not one copied
    assert sample(7) == first and sample(8) != first
    greedy = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=30, temperature=0).choices[0]
    stop = greedy.text[10:16]
    cut = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=30, temperature=0, stop=[stop])
    assert cut.choices[0].text == greedy.text[: greedy.text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_sixteen_concurrent_clients_are_batched_and_each_gets_its_own_answer(live):
    prompts = [f"{PROMPT} {word}" * (1 + i % 3) for i, word in enumerate("abcdefghijklmnop")]
    wanted = [reference(live, p, 20).continuation for p in prompts]
    batches_before = live.service.worker.batches
    got: list[str | None] = [None] * len(prompts)
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(prompts))

    def ask(i: int) -> None:
        try:
            client = live.client()
            barrier.wait()
            out = client.completions.create(model=MODEL_ID, prompt=prompts[i], max_tokens=20, temperature=0)
            got[i] = out.choices[0].text
        except BaseException as err:  # reported below, with the others
            errors.append(err)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    assert got == wanted  # left-padded rows in a batch give each prompt's own greedy text
    assert live.service.worker.batches - batches_before < len(prompts)  # some requests shared a batch


def test_models_search_and_health(live):
    client = live.client()
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL_ID]
    assert models[0].model_extra["retlm"]["retrieval"] == "cca"
    backend = live.service.backend
    query = backend.database.chunk_text(30)
    status, found, _ = request(live.url, "/v1/search", {"query": query, "k": 3})
    assert status == 200
    found = found["data"]
    direct = backend.database.search([query], 3)
    assert [h["chunk_id"] for h in found] == direct.chunk_ids[0].tolist()
    assert [h["doc_name"] for h in found] == direct.doc_names[0]
    assert found[0]["chunk_id"] == 30 and found[0]["score"] == pytest.approx(1.0, abs=1e-4)  # its own text
    assert request(live.url, "/health")[:2] == (200, {"status": "ok"})


def test_causal_lm_backend_batches_like_hf_generate(serve_paths):
    backend = llama_backend(serve_paths)
    prompts = ["def f(x):", "The with statement", "Assignment statements are used to (re)bind names"]
    tokenizer, model = backend.tokenizer, backend.model
    wanted = []
    for prompt in prompts:
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        out = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        wanted.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    with live_server(backend) as live:
        out = live.client().completions.create(model=MODEL_ID, prompt=prompts, max_tokens=16, temperature=0)
        assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == wanted
        assert out.model_extra["retrieval"] == []
        messages = [{"role": "user", "content": "hello"}]
        chat = live.client().chat.completions.create(
            model=MODEL_ID, messages=messages, max_tokens=8, temperature=0
        )
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert rendered == "<|user|>hello\n<|assistant|>"  # the tokenizer's template, not a transcript
        ids = torch.tensor([tokenizer(rendered)["input_ids"]])
        ref = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        assert chat.choices[0].message.content == tokenizer.decode(
            ref[0, ids.shape[1] :], skip_special_tokens=True
        )


@pytest.mark.heavy
def test_requests_sent_together_share_one_batch(serve_paths):
    """An idle worker waits ``batch_wait`` for company, so four clients that send at once are decoded as
    one batch of four (without the wait the first would run alone: it arrives a few ms earlier)."""
    with live_server(cca_backend(serve_paths, max_batch=4), batch_wait=2.0) as live:
        worker = live.service.worker
        live.client().completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=1)  # first-use costs
        before = worker.batches, worker.rows_run
        barrier = threading.Barrier(4)
        answers: list = []

        def ask(i: int) -> None:
            client = live.client()
            barrier.wait()
            answers.append(client.completions.create(model=MODEL_ID, prompt=f"{PROMPT} {i}", max_tokens=4))

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(answers) == 4
        assert (worker.batches - before[0], worker.rows_run - before[1]) == (1, 4)
