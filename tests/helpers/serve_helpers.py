"""Test support for `retlm serve`: a real database and a tiny RETRO trained on it, a tiny Llama with a chat
template, and the app running in this process on a free loopback port (uvicorn in a thread).

The models run in float64 so that a batched row and the same prompt alone pick the same tokens (float32
rounding could flip a near tie and fail a test for a reason that is not a bug).
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from robust_helpers import TINY_MODEL, build_db, write_corpus
from tiny_models import tiny_causal_lm
from training_helpers import tiny_bert_embedder

MODEL_ID = "tiny-retro"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_fixture(root: Path) -> dict[str, Path]:
    """A database of 10 pydoc topics (chunk 16) and a RETRO (transformer decoder, 256-token context)
    trained 2 steps on it; a tiny Llama with the database's tokenizer and a chat template."""
    from retlm.training import train

    root.mkdir(parents=True, exist_ok=True)
    embedder = str(tiny_bert_embedder(root / "embedder", layers=1, max_positions=64))
    db = build_db(write_corpus(root / "corpus"), root / "db", embedder)
    config = dict(TINY_MODEL, decoder="transformer", max_seq_len=256)
    train(
        db, config, root / "run", max_steps=2, batch_size=2, save_every=None, eval_every=None, progress=False
    )
    llama = root / "llama"
    tiny_llama(db.tokenizer).save_pretrained(llama)
    tokenizer = db.tokenizer
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(llama)
    return {"db": db.path, "model": root / "run" / "model", "llama": llama, "embedder": Path(embedder)}


def tiny_llama(tokenizer: Any) -> Any:
    """A tiny random Llama with ``tokenizer``'s vocabulary, its EOS as the padding token."""
    eos = tokenizer.eos_token_id
    return tiny_causal_lm(
        "llama",
        len(tokenizer),
        positions=256,
        bos_token_id=None,
        eos_token_id=eos,
        pad_token_id=eos,
        tie_word_embeddings=True,
    )


def cca_backend(paths: dict[str, Path], max_batch: int = 16) -> Any:
    from retlm.models.auto import load_model
    from retlm.retrieval import RetrievalDatabase
    from retlm.serve import CCABackend

    db = RetrievalDatabase.open(paths["db"])
    return CCABackend(load_model(paths["model"]).double(), db, max_batch=max_batch)


def llama_backend(paths: dict[str, Path], with_db: bool = False, max_batch: int = 16) -> Any:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from retlm.retrieval import RetrievalDatabase
    from retlm.serve import CausalLMBackend

    model = AutoModelForCausalLM.from_pretrained(paths["llama"]).double()
    tokenizer = AutoTokenizer.from_pretrained(paths["llama"])
    db = RetrievalDatabase.open(paths["db"]) if with_db else None
    return CausalLMBackend(model, tokenizer, db, max_batch=max_batch)


class HeldBackend:
    """The real backend, whose generation pauses after its first token while ``held`` is set, until
    ``released``: the model is provably busy, mid-generation, for as long as a test wants."""

    def __init__(self, backend):
        self.backend = backend
        self.held, self.released = threading.Event(), threading.Event()

    def generate(self, prompts, max_new_tokens, sampling, streamer, on_retrieval):
        if self.held.is_set():
            streamer = Pausing(streamer, self.released)
        return self.backend.generate(prompts, max_new_tokens, sampling, streamer, on_retrieval)

    def __getattr__(self, name):
        return getattr(self.backend, name)


class Pausing:
    """A streamer that passes everything on, and waits for ``released`` once the first token is out."""

    def __init__(self, streamer, released: threading.Event):
        self.streamer, self.released, self.puts = streamer, released, 0

    def put(self, value):
        self.streamer.put(value)
        self.puts += 1
        if self.puts == 2:  # the prompt, then the first token
            self.released.wait(30)

    def end(self):
        self.streamer.end()


@dataclass
class Live:
    """A server running in this process: its URL, app, service (queue, backend) and uvicorn server."""

    url: str
    app: Any
    server: Any
    thread: threading.Thread

    @property
    def service(self) -> Any:
        return self.app.state.service

    def client(self, api_key: str = "unused", **options: Any) -> Any:
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, **options)


@contextmanager
def live_server(backend: Any, **settings: Any):
    """The app for ``backend`` served on a free 127.0.0.1 port until the block ends."""
    from retlm.serve import ServeSettings, create_app
    from retlm.serve.server import listen, make_server

    settings.setdefault("model_id", MODEL_ID)
    app = create_app(backend, ServeSettings(**settings))
    sock = listen("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = make_server(app, grace=settings.get("shutdown_grace", 0.5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield Live(f"http://127.0.0.1:{port}", app, server, thread)
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


def request(
    url: str, path: str, body: Any = None, *, method: str | None = None, headers: dict | None = None
) -> tuple[int, Any, dict[str, str]]:
    """One HTTP request with the standard library: ``(status, parsed JSON or text, headers)``.

    ``body``: a dict (sent as JSON), bytes (sent as they are) or None (a GET)."""
    import http.client
    import json
    from urllib.parse import urlsplit

    where = urlsplit(url)
    connection = http.client.HTTPConnection(where.hostname, where.port, timeout=30)
    data = json.dumps(body).encode() if isinstance(body, dict | list) else body
    sent = {"Content-Type": "application/json", **(headers or {})}
    try:
        connection.request(method or ("GET" if body is None else "POST"), path, body=data, headers=sent)
        response = connection.getresponse()
        raw = response.read().decode("utf-8", "replace")
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = raw
        return response.status, parsed, dict(response.getheaders())
    finally:
        connection.close()
