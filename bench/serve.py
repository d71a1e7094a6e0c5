"""`retlm serve` against `transformers serve`, on the same model, in one go: requests/s and generated
tokens/s at 1, 4 and 16 concurrent clients.

    python bench/serve.py --model smollm2-135m --db demo-work/db

Servers (each on a free loopback port, all started before the first row and stopped after the last):

- `transformers serve FOLDER` (the peer; no retrieval; its default, sequential ``model.generate``);
- `retlm serve MODEL --in-context --db DB`, requests with ``"retrieval": false`` (the model alone: the
  goal is at least the peer's throughput) and with retrieval (In-Context RALM: a search and a re-read
  of the context every ``--stride`` tokens: what retrieval costs);
- `retlm serve ... --max-batch 1` with retrieval off: the queue alone, no batching (what batching buys).

Every client sends its requests one after the other (greedy, ``max_tokens`` each, the same prompts
everywhere: the first 40 words of evenly spaced documents of the database); the clock runs from the
first request to the last answer. Each server answers a warm-up request first. The rows run in rounds
(``--repeats``), every row once per round, and the best round of each row is reported, so that other load
on the machine disturbs the comparison less. Only 127.0.0.1 is used, every request has a timeout, and
every loop is bounded.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"
TIMEOUT = 900  # seconds one request may take (16 clients queued on 2 CPU cores)


@dataclass
class Row:
    server: str
    retrieval: str
    clients: int
    requests: int
    seconds: float
    tokens: int

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def tps(self) -> float:
        return self.tokens / self.seconds


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def post(port: int, path: str, body: dict, timeout: float = TIMEOUT) -> dict:
    connection = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        answer = json.loads(response.read())
        if response.status != 200:
            raise RuntimeError(f"{path} answered {response.status}: {str(answer)[:300]}")
        return answer
    finally:
        connection.close()


class Server:
    """A server process on a free loopback port, ready when it answers ``GET /v1/models``."""

    def __init__(self, name: str, command: list[str], port: int, log: Path):
        self.name, self.port = name, port
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
        self.log = log.open("w")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{name} exited ({self.process.returncode}); see {log}")
            try:
                connection = http.client.HTTPConnection(HOST, port, timeout=5)
                connection.request("GET", "/v1/models")
                if connection.getresponse().status == 200:
                    return
            except OSError:
                time.sleep(1)
        self.stop()
        raise RuntimeError(f"{name} did not start in 10 minutes; see {log}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def load(port: int, body: dict, prompts: list[str], clients: int, per_client: int) -> tuple[float, int]:
    """``clients`` threads, each sending ``per_client`` completions in turn; ``(seconds, tokens)``."""
    tokens = [0] * clients
    errors: list[BaseException] = []
    barrier = threading.Barrier(clients + 1)

    def client(i: int) -> None:
        barrier.wait()
        try:
            for j in range(per_client):
                prompt = prompts[(i * per_client + j) % len(prompts)]
                answer = post(port, "/v1/completions", {**body, "prompt": prompt})
                tokens[i] += answer["usage"]["completion_tokens"]
        except BaseException as err:  # reported after the others finish
            errors.append(err)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join(TIMEOUT * per_client)
    seconds = time.perf_counter() - started
    if errors:
        raise errors[0]
    return seconds, sum(tokens)


def run_row(server: Server, model_name: str, mode: str, extra: dict, clients: int, args, prompts) -> Row:
    body = {"model": model_name, "max_tokens": args.max_tokens, "temperature": 0, **extra}
    per_client = max(1, args.requests // clients)
    seconds, tokens = load(server.port, body, prompts, clients, per_client)
    row = Row(server.name, mode, clients, clients * per_client, seconds, tokens)
    print(
        f"{row.server:<27} {mode:<3} {clients:>3} clients: {row.requests:>3} requests in {seconds:7.1f} s "
        f"= {row.rps:6.3f} req/s, {row.tps:7.2f} tok/s (load average {os.getloadavg()[0]:.1f})",
        flush=True,
    )
    return row


def prompts_from(db_path: Path, count: int, words: int) -> list[str]:
    from retlm.retrieval import RetrievalDatabase

    db = RetrievalDatabase.open(db_path)
    doc_ids = db.doc_ids
    firsts = [i for i in range(db.num_chunks) if i == 0 or doc_ids[i] != doc_ids[i - 1]]
    step = max(1, len(firsts) // count)
    texts = [" ".join(db.chunk_text(firsts[i]).split()[:words]) for i in range(0, len(firsts), step)]
    return [t for t in texts if t][:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="a name, folder or .gguf (load_causal_lm)")
    parser.add_argument("--db", type=Path, default=Path("demo-work/db"))
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=16, help="requests per row (at least one per client)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="rounds over every row; the best round counts")
    parser.add_argument("--stride", type=int, default=16, help="retlm serve --stride (retrieval on)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["transformers", "retlm", "retlm-queue"])
    parser.add_argument("--logs", type=Path, default=Path("/tmp/bench-serve"))
    args = parser.parse_args()

    import torch

    from retlm.models.pretrained import pretrained_path

    folder = str(pretrained_path(args.model))  # transformers serve takes a folder (or a Hub id)
    prompts = prompts_from(args.db, 16, 40)
    args.logs.mkdir(parents=True, exist_ok=True)
    print(
        f"model {args.model} ({folder}), database {args.db}, {len(prompts)} prompts of 40 words, "
        f"max_tokens {args.max_tokens}, greedy; torch {torch.__version__}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    retlm = [sys.executable, "-m", "retlm", "serve", args.model, "--in-context", "--db", str(args.db)]
    retlm += ["--stride", str(args.stride), "--max-tokens", str(args.max_tokens), "--host", HOST]
    transformers = [str(Path(sys.executable).with_name("transformers")), "serve", folder, "--host", HOST]
    plans = [
        ("transformers", "transformers serve", transformers, folder, {"off": {}}),
        (
            "retlm",
            "retlm serve --in-context",
            retlm,
            args.model,
            {"off": {"retrieval": False}, "on": {"retrieval": True}},
        ),
        (
            "retlm-queue",
            "retlm serve --max-batch 1",
            [*retlm, "--max-batch", "1"],
            args.model,
            {"off": {"retrieval": False}},
        ),
    ]
    servers: dict[str, tuple[Server, str, dict]] = {}
    try:
        for key, name, command, model_name, modes in plans:  # all up front: idle ones cost only memory
            if key not in args.skip:
                port = free_port()
                server = Server(name, [*command, "--port", str(port)], port, args.logs / f"{key}.log")
                servers[key] = (server, model_name, modes)
                for extra in modes.values():
                    body = {"model": model_name, "max_tokens": args.max_tokens, "temperature": 0, **extra}
                    post(port, "/v1/completions", {**body, "prompt": prompts[0]})  # warm-up
        rows: list[Row] = []
        for _ in range(args.repeats):  # the rows of one repeat in turn, so a load change hits them alike
            for clients in args.clients:
                for server, model_name, modes in servers.values():
                    for mode, extra in modes.items():
                        rows.append(run_row(server, model_name, mode, extra, clients, args, prompts))
    finally:
        for server, _, _ in servers.values():
            server.stop()
    report(rows, args.clients)


def report(rows: list[Row], clients: list[int]) -> None:
    """The best round of each row (the least disturbed by other load), then the ratios."""
    best: dict[tuple[str, str, int], Row] = {}
    for row in rows:
        key = (row.server, row.retrieval, row.clients)
        if key not in best or row.tps > best[key].tps:
            best[key] = row
    print("\nbest round of each row:")
    print("| server | retrieval | clients | requests | req/s | tokens/s |")
    print("|---|---|---|---|---|---|")
    for (server, mode, c), row in best.items():
        print(f"| {server} | {mode} | {c} | {row.requests} | {row.rps:.3f} | {row.tps:.2f} |")

    def tps(server: str, mode: str, c: int) -> float | None:
        row = best.get((server, mode, c))
        return row.tps if row else None

    print("\nratios (tokens/s):")
    for c in clients:
        peer, off = tps("transformers serve", "off", c), tps("retlm serve --in-context", "off", c)
        on, queue = tps("retlm serve --in-context", "on", c), tps("retlm serve --max-batch 1", "off", c)
        parts = []
        if peer and off:
            parts.append(f"retlm off / transformers serve = {off / peer:.2f}x")
        if on and off:
            parts.append(f"retrieval on / off = {on / off:.2f}x")
        if queue and off:
            parts.append(f"batching / queue alone = {off / queue:.2f}x")
        print(f"  {c:>2} clients: " + ", ".join(parts))


if __name__ == "__main__":
    main()
