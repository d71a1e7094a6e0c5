"""SIGINT and SIGTERM stop `retlm serve` within seconds: waiting requests are cancelled, running ones get
the shutdown grace, then end (a stream with an error event and ``data: [DONE]``), and the process exits.

The fast test runs uvicorn in this process's main thread (where it installs its signal handlers) and
signals the process from a client thread; the slow one signals a real `retlm serve` process.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from serve_helpers import MODEL_ID, HeldBackend, cca_backend

pytest.importorskip("fastapi")


def stream_then_signal(port: int, model: str, sig: int, server, backend, result: dict) -> None:
    """Start a long streamed completion (held after its first token), signal this process, release the
    generation after the shutdown grace, read the rest."""
    try:
        deadline = time.monotonic() + 60
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        body = {"model": model, "prompt": "x " * 5, "max_tokens": 200, "stream": True}
        connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        result["first"] = response.readline()
        result["signalled"] = time.monotonic()
        os.kill(os.getpid(), sig)
        time.sleep(1.0)  # past the grace: the running request is then cancelled at its next token
        backend.released.set()
        result["rest"] = response.read().decode()
    except BaseException as err:  # reported by the test
        result["error"] = err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.heavy
def test_a_signal_stops_the_server_and_ends_its_streams(serve_paths, sig):
    from retlm.serve import ServeSettings, create_app
    from retlm.serve.server import listen, make_server

    backend = HeldBackend(cca_backend(serve_paths))
    backend.held.set()
    app = create_app(backend, ServeSettings(model_id=MODEL_ID, shutdown_grace=0.5))
    server = make_server(app, grace=0.5)
    sock = listen("127.0.0.1", 0)
    result: dict = {}
    client = threading.Thread(
        target=stream_then_signal, args=(sock.getsockname()[1], MODEL_ID, sig, server, backend, result)
    )
    client.start()
    previous = signal.signal(sig, lambda *_: None)  # uvicorn restores it and raises the signal again
    try:
        server.run(sockets=[sock])  # returns once the signal has stopped it
        stopped = time.monotonic()
    finally:
        signal.signal(sig, previous)
        sock.close()
        client.join(30)
    assert "error" not in result, result.get("error")
    assert result["first"].startswith(b"data: ")
    assert stopped - result["signalled"] < 5
    assert "the server is shutting down" in result["rest"] and result["rest"].rstrip().endswith(
        "data: [DONE]"
    )
    assert app.state.service.worker.tokens_generated <= 2  # cancelled after the grace, not finished


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_a_retlm_serve_process(serve_paths, sig):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    command = [
        sys.executable,
        "-m",
        "retlm",
        "serve",
        str(serve_paths["model"]),
        "--db",
        str(serve_paths["db"]),
    ]
    process = subprocess.Popen(
        [*command, "--port", "0", "--shutdown-grace", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = process.stdout.readline()
        assert "on http://127.0.0.1:" in line, process.stderr.read()
        url = line.rsplit(" on ", 1)[1].strip().rstrip("/")
        port = int(url.rsplit(":", 1)[1])
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        body = {"model": str(serve_paths["model"]), "prompt": "x " * 5, "max_tokens": 240, "stream": True}
        connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.readline().startswith(b"data: ")
        started = time.monotonic()
        process.send_signal(sig)
        rest = response.read().decode()  # the stream ends: an error event, then [DONE]
        process.wait(10)
        assert time.monotonic() - started < 6
        assert rest.rstrip().endswith("data: [DONE]") and "shutting down" in rest
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
