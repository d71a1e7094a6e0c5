"""`retlm serve` under bad requests, disconnecting clients, an API key and signals.

Every bad request must get a 400 (413 for a body over the limit) with OpenAI's error object within a
second, while the model is busy with another request, and the server must keep serving after it.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest
from robust_helpers import cli
from serve_helpers import MODEL_ID, HeldBackend, cca_backend, live_server, request

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

CAP = 48
LONG = "x" + " x" * 299  # 300 GPT-2 tokens: over the 256-token context
NEAR = "x" + " x" * 219  # 220 tokens: fits, but not with CAP more


@pytest.fixture(scope="module")
def live(serve_paths):
    backend = HeldBackend(cca_backend(serve_paths, max_batch=1))
    with live_server(backend, max_tokens=CAP, max_body_bytes=8192) as server:
        yield server


def completion(**fields):
    return {"model": MODEL_ID, "prompt": "The assert statement", **fields}


BAD = {
    "malformed JSON": (b'{"model": "tiny-retro", "prompt": ', None),
    "not an object": (b"[1, 2, 3]", None),
    "missing model": ({"prompt": "x"}, "model"),
    "missing prompt": ({"model": MODEL_ID}, "prompt"),
    "prompt of the wrong type": (completion(prompt=5), "prompt"),
    "max_tokens as a string": (completion(max_tokens="5"), "max_tokens"),
    "temperature as a string": (completion(temperature="hot"), "temperature"),
    "stream as a string": (completion(stream="yes"), "stream"),
    "max_tokens over the cap": (completion(max_tokens=CAP + 1), "max_tokens"),
    "max_tokens beyond the context": ({**completion(prompt=NEAR), "max_tokens": CAP}, "max_tokens"),
    "prompt longer than the context": (completion(prompt=LONG), "prompt"),
    "unknown model": (completion(model="gpt-4o"), "model"),
    "unknown field": (completion(frobnicate=True), "frobnicate"),
    "empty prompt": (completion(prompt=""), "prompt"),
    "token id out of range": (completion(prompt=[1, 2, 10**9]), "prompt"),
    "n of zero": (completion(n=0), "n"),
    "temperature above 2": (completion(temperature=3.5), "temperature"),
    "five stop sequences": (completion(stop=list("abcde")), "stop"),
    "unsupported logprobs": (completion(logprobs=3), "logprobs"),
    "unsupported presence_penalty": (completion(presence_penalty=0.5), "presence_penalty"),
}


def hold_the_model(live) -> threading.Thread:
    """A request that holds the model (its generation waits until the test releases it)."""
    backend = live.service.backend
    backend.released.clear()
    backend.held.set()
    thread = threading.Thread(target=request, args=(live.url, "/v1/completions", completion(max_tokens=4)))
    thread.start()
    assert wait_until(lambda: live.service.worker.running == 1, 10)
    return thread


def release_the_model(live, thread: threading.Thread) -> None:
    live.service.backend.held.clear()
    live.service.backend.released.set()
    thread.join(60)


@pytest.mark.parametrize("name", list(BAD))
def test_bad_completion_requests_get_400_at_once_while_the_model_is_busy(live, name):
    body, param = BAD[name]
    busy = hold_the_model(live)
    try:
        started = time.monotonic()
        status, answer, _ = request(live.url, "/v1/completions", body)
        elapsed = time.monotonic() - started
        assert live.service.worker.running == 1  # the model was busy all along
    finally:
        release_the_model(live, busy)
    assert status == 400, answer
    assert elapsed < 1.0
    error = answer["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert 10 < len(error["message"]) < 300 and "\n" not in error["message"]
    status, answer, _ = request(live.url, "/v1/completions", completion(max_tokens=2))
    assert status == 200 and answer["choices"][0]["finish_reason"] in ("length", "stop")  # still serving


@pytest.mark.parametrize(
    "body, param",
    [
        ({"model": MODEL_ID}, "messages"),
        ({"model": MODEL_ID, "messages": []}, "messages"),
        ({"model": MODEL_ID, "messages": "hi"}, "messages"),
        ({"model": MODEL_ID, "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"model": MODEL_ID, "messages": [{"role": "user", "content": LONG}]}, "messages"),
        ({"model": MODEL_ID, "messages": [{"role": "user"}], "max_tokens": 2}, "messages.0.content"),
    ],
)
def test_bad_chat_requests(live, body, param):
    status, answer, _ = request(live.url, "/v1/chat/completions", body)
    assert status == 400 and answer["error"]["param"] == param


def test_bad_search_requests(live):
    for body, param in (({"query": ""}, "query"), ({"query": "x", "k": 0}, "k"), ({"q": "x"}, "query")):
        status, answer, _ = request(live.url, "/v1/search", body)
        assert status == 400 and answer["error"]["param"] == param


def test_the_openai_client_sees_a_bad_request_error(live):
    client = live.client()
    with pytest.raises(openai.BadRequestError, match="max_tokens is at most"):
        client.completions.create(model=MODEL_ID, prompt="x", max_tokens=CAP + 1)
    with pytest.raises(openai.BadRequestError, match="does not exist"):
        client.completions.create(model="nope", prompt="x")


def test_a_body_over_the_limit_gets_413(live):
    big = json.dumps(completion(prompt="x" * 9000)).encode()
    started = time.monotonic()
    status, answer, _ = request(live.url, "/v1/completions", big)
    assert status == 413 and "larger than" in answer["error"]["message"]
    assert time.monotonic() - started < 1.0


def open_stream(live, max_tokens: int) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    connection = http.client.HTTPConnection("127.0.0.1", int(live.url.rsplit(":", 1)[1]), timeout=30)
    body = json.dumps(completion(max_tokens=max_tokens, temperature=0, stream=True))
    connection.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    return connection, connection.getresponse()


def wait_until(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


@pytest.fixture(scope="module")
def roomy(serve_paths):
    """One request at a time, up to 250 tokens each, generation held after the first token on demand."""
    with live_server(HeldBackend(cca_backend(serve_paths, max_batch=1)), max_tokens=250) as server:
        yield server


def test_a_client_that_disconnects_mid_stream_frees_the_model(roomy):
    worker, backend = roomy.service.worker, roomy.service.backend
    rows_before, tokens_before = worker.rows_run, worker.tokens_generated
    backend.released.clear()
    backend.held.set()
    try:
        connection, response = open_stream(roomy, 250)
        assert response.status == 200
        assert response.readline().startswith(b"data: ")  # generating (and held after its first token)
        queued_connection, queued = open_stream(roomy, 250)  # waits: max_batch=1, the model is busy
        assert wait_until(lambda: worker.waiting == 1, 5)
        queued_connection.sock.shutdown(socket.SHUT_RDWR)  # the waiting client leaves: its slot is freed
        queued_connection.close()
        assert wait_until(lambda: worker.waiting == 0, 3)
        assert worker.running == 1  # the first is still generating
        connection.sock.shutdown(socket.SHUT_RDWR)
        connection.close()
        time.sleep(0.3)  # the server sees the disconnect
    finally:
        backend.held.clear()
        backend.released.set()
    assert wait_until(lambda: worker.running == 0, 3)  # cancelled at its next token, not run to its end
    assert worker.rows_run == rows_before + 1  # the queued request never ran
    assert worker.tokens_generated - tokens_before <= 2
    status, answer, _ = request(roomy.url, "/v1/completions", completion(max_tokens=3))
    assert status == 200


def test_a_client_that_gives_up_on_a_whole_response_frees_the_model(roomy):
    worker, backend = roomy.service.worker, roomy.service.backend
    tokens_before = worker.tokens_generated
    backend.released.clear()
    backend.held.set()
    try:
        connection = http.client.HTTPConnection("127.0.0.1", int(roomy.url.rsplit(":", 1)[1]), timeout=0.5)
        body = json.dumps(completion(max_tokens=250, temperature=0))
        connection.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        assert wait_until(lambda: worker.running == 1, 5)
        with pytest.raises(TimeoutError):
            connection.getresponse()
        connection.close()
        time.sleep(0.6)  # the server checks every quarter of a second
    finally:
        backend.held.clear()
        backend.released.set()
    assert wait_until(lambda: worker.running == 0, 3)
    assert worker.tokens_generated - tokens_before <= 2


def test_an_api_key_guards_every_route_but_health_and_leaks_nothing(serve_paths):
    key = "sk-test-0123456789abcdef"
    with live_server(cca_backend(serve_paths), api_key=key) as live:
        assert live.client(api_key=key).models.list().data[0].id == MODEL_ID
        with pytest.raises(openai.AuthenticationError):
            live.client(api_key="wrong").models.list()
        for method_path, body in (
            ("/v1/models", None),
            ("/v1/completions", completion()),
            ("/v1/completions", b"{not json"),  # refused before the body is read
            ("/v1/chat/completions", {"model": MODEL_ID, "messages": []}),
            ("/v1/search", {"query": "assert"}),
            ("/no/such/route", None),
        ):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": key}):
                status, answer, got = request(live.url, method_path, body, headers=headers)
                text = json.dumps(answer)
                assert status == 401 and answer["error"]["code"] == "invalid_api_key"
                assert key not in text and MODEL_ID not in text and "wrong" not in text
                assert got.get("www-authenticate") == "Bearer"
        assert request(live.url, "/health")[:2] == (200, {"status": "ok"})
        status, page, _ = request(live.url, "/")
        assert status == 200 and "<html" in page and MODEL_ID not in page  # a static shell, no data


def test_listening_beyond_loopback_without_a_key_warns():
    from retlm.serve.server import exposure_warning, is_loopback

    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert is_loopback(host) and exposure_warning(host, None) is None
    for host in ("0.0.0.0", "::", "192.168.1.20", "example.org"):
        warning = exposure_warning(host, None)
        assert not is_loopback(host) and "without an API key" in warning and "anyone" in warning
        assert exposure_warning(host, "a-key") is None


def test_cli_refusals_are_one_line(serve_paths, tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        result = cli("serve", serve_paths["model"], "--db", serve_paths["db"], "--port", port)
    finally:
        taken.close()
    assert result.code == 2 and "cannot listen on 127.0.0.1" in result.err and len(result.err_lines) == 1
    result = cli("serve", serve_paths["model"])
    assert result.code == 2 and "--db is needed" in result.err
    result = cli("serve", serve_paths["model"], "--db", tmp_path / "none", "--port", "0")
    assert result.code == 2 and "no database folder" in result.err
    result = cli("serve", serve_paths["model"], "--db", serve_paths["db"], "--max-batch", "0")
    assert result.code == 2 and "--max-batch must be a positive integer" in result.err
    # beyond loopback without a key: the warning, then (192.0.2.1 is a documentation address, not this
    # machine's) a one-line refusal to bind
    result = cli("serve", serve_paths["model"], "--db", serve_paths["db"], "--host", "192.0.2.1")
    assert (
        result.code == 2 and "without an API key" in result.err and "cannot listen on 192.0.2.1" in result.err
    )
    assert len(result.err_lines) == 2
