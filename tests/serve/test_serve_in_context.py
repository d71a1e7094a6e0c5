"""`retlm serve --in-context`: any causal LM reads retrieved passages in its context (In-Context RALM).

The server's answers are compared with ``generate_in_context`` run directly on the same model and
database: the text, and each retrieval step (where, what was searched, which passages were read).
"""

from __future__ import annotations

import threading

import pytest
from serve_helpers import MODEL_ID, live_server, llama_backend

pytest.importorskip("fastapi")
pytest.importorskip("openai")

PROMPT = "Execution of Python coroutines can be suspended and resumed at many points"


@pytest.fixture(scope="module")
def live(serve_paths):
    with live_server(llama_backend(serve_paths, with_db=True), max_tokens=64) as server:
        yield server


def reference(live, prompt: str, max_new_tokens: int, **options):
    from retlm.generation.in_context import generate_in_context

    backend = live.service.backend
    return generate_in_context(
        backend.model,
        backend.tokenizer,
        backend.database,
        prompt,
        max_new_tokens=max_new_tokens,
        stride=backend.stride,
        query_tokens=backend.query_tokens,
        num_neighbors=backend.database.num_neighbors,
        **options,
    )


def test_completion_equals_generate_in_context_with_its_retrieval_steps(live):
    out = live.client().completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=40, temperature=0)
    ref = reference(live, PROMPT, 40)
    assert out.choices[0].text == ref.continuation
    prompt_tokens = out.usage.prompt_tokens
    steps = out.model_extra["retrieval"]
    assert len(steps) == len(ref.retrievals) == 3  # at the prompt's end, then every 16 tokens
    for step, want in zip(steps, ref.retrievals, strict=True):
        assert step["token_offset"] == prompt_tokens + want.position
        assert step["source"] == ("prompt" if want.position == 0 else "completion")
        assert step["text_offset"] == want.text_offset - len(PROMPT)  # characters of the completion
        assert step["query"] == want.query
        assert [(n["chunk_id"], n["doc_name"], n["text"]) for n in step["neighbors"]] == [
            (n.chunk_id, n.doc_name, n.text) for n in want.neighbors
        ]


def test_streamed_in_context_equals_the_whole_answer(live):
    client = live.client()
    whole = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=40, temperature=0)
    text, steps = "", []
    for chunk in client.completions.create(
        model=MODEL_ID, prompt=PROMPT, max_tokens=40, temperature=0, stream=True
    ):
        for step in (chunk.model_extra or {}).get("retrieval", []):
            assert step["text_offset"] == len(text)  # sent before the text generated after reading it
            steps.append(step)
        text += "".join(c.text for c in chunk.choices)
    assert text == whole.choices[0].text and steps == whole.model_extra["retrieval"]


def test_retrieval_off_and_sampling(live):
    client = live.client()
    off = client.completions.create(
        model=MODEL_ID, prompt=PROMPT, max_tokens=20, temperature=0, extra_body={"retrieval": False}
    )
    assert off.model_extra["retrieval"] == []
    backend = live.service.backend
    ids = backend.tokenizer(PROMPT, add_special_tokens=False, return_tensors="pt")["input_ids"]
    plain = backend.model.generate(
        ids, max_new_tokens=20, do_sample=False, pad_token_id=backend.tokenizer.eos_token_id
    )
    assert off.choices[0].text == backend.tokenizer.decode(plain[0, ids.shape[1] :], skip_special_tokens=True)
    sampled = client.completions.create(
        model=MODEL_ID, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=3, n=2
    )
    again = client.completions.create(
        model=MODEL_ID, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=3, n=2
    )
    assert [c.text for c in sampled.choices] == [c.text for c in again.choices]
    ref = reference(live, PROMPT, 12, do_sample=True, temperature=1.0, seed=3)
    assert sampled.choices[0].text == ref.continuation  # the first row draws as generate_in_context does


def test_concurrent_in_context_requests_each_get_their_own_answer(live):
    prompts = [PROMPT, "The with statement", "Assignment statements", "def f(x): return x"]
    wanted = [reference(live, p, 16).continuation for p in prompts]
    got: list[str | None] = [None] * len(prompts)

    def ask(i: int) -> None:
        out = live.client().completions.create(
            model=MODEL_ID, prompt=prompts[i], max_tokens=16, temperature=0
        )
        got[i] = out.choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == wanted
