"""The request queue of `retlm serve`: one worker thread owns the model; requests wait in a bounded queue
and run in batches.

A :class:`Job` is one HTTP request: one or more prompts, ``n`` completions of each. The worker takes the
oldest job, then every later job that can share its batch (same :class:`~retlm.serve.backends.Sampling`,
no seed) until ``max_batch`` rows, and runs them in one ``generate`` call. Each row is a
:class:`RowState`: it decodes its tokens as they come, stops at an eos token, a stop string or its own
``max_tokens``, and sends its text and retrieval steps to the job's asyncio queue (thread-safely, through
the event loop). When every row of a batch is done, or cancelled, the streamer raises
:class:`BatchFinished` from ``put``, which ends the ``generate`` call at once: this is how a client that
disconnects frees the model (transformers' own server cancels generation the same way).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from retlm.serve.backends import Backend, Prompt, RetrievalStep, Sampling, neighbor_json

logger = logging.getLogger("retlm.serve")


class QueueFull(Exception):
    """The server already holds as many waiting requests as it accepts."""


class ShuttingDown(Exception):
    """The server is stopping and takes no new request."""


class BatchFinished(Exception):
    """Raised by the streamer when no row of the batch needs another token (internal)."""


@dataclass
class Event:
    """What a job tells its request handler: ``kind`` is ``text`` (``index``, ``text``), ``retrieval``
    (``index``, ``step``), ``finish`` (``index``, ``reason``, ``tokens``), ``error`` (``text``; ``reason``
    ``shutdown`` or ``failure``) or ``end``."""

    kind: str
    index: int = 0
    text: str = ""
    step: dict[str, Any] | None = None
    reason: str = ""
    tokens: int = 0


SHUTDOWN = Event("error", text="the server is shutting down", reason="shutdown")


@dataclass(eq=False)  # compared by identity: the queue finds and removes this very job
class Job:
    """One request: ``prompts`` (token ids), ``n`` completions of each; row ``i * n + j`` is choice
    ``i * n + j``, as in OpenAI's API."""

    prompts: list[Prompt]
    n: int
    max_tokens: int
    stop: list[str]
    sampling: Sampling
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    created: float = field(default_factory=time.monotonic)
    withdraw: Any = None  # set by the queue: takes a cancelled job out of the waiting line

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.n

    def emit(self, event: Event) -> None:
        """Hand ``event`` to the request's coroutine (from any thread)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: the server is gone, nobody is listening
            pass

    def cancel(self) -> None:
        """Stop this job: out of the queue if it waits, its rows stopped at their next token if it runs."""
        if not self.cancelled.is_set():
            self.cancelled.set()
            if self.withdraw is not None:
                self.withdraw(self)

    def batch_key(self) -> Sampling | None:
        """Jobs with equal keys may share a batch; a seeded job runs alone, so its result is its own."""
        return None if self.sampling.seed is not None else self.sampling


class RowState:
    """One completion being generated: its tokens, its text so far and why it stopped."""

    def __init__(self, job: Job, index: int, backend: Backend):
        self.job, self.index, self.backend = job, index, backend
        self.tokens: list[int] = []
        self.text = ""
        self.sent = 0  # characters of ``text`` already sent
        self.finish_reason: str | None = None
        self.hold = max((len(s) for s in job.stop), default=1) - 1  # a stop string may still be forming

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def add(self, token: int) -> None:
        if self.done:
            return
        if token in self.backend.eos_token_ids:
            self._finish("stop")
            return
        self.tokens.append(token)
        self.text = self.backend.decode(self.tokens)
        cut = min((i for i in (self.text.find(s) for s in self.job.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            self._finish("stop")
        elif len(self.tokens) >= self.job.max_tokens:
            self._finish("length")
        else:
            self._send(len(self.text.rstrip("\ufffd")) - self.hold)  # hold back a half-decoded character

    def retrieved(self, step: RetrievalStep) -> None:
        """A search made for this row: sent with the characters of completion text generated before it."""
        if self.done:
            return
        payload = {
            "index": self.index,
            "source": step.source,
            "token_offset": step.token_offset,
            "text_offset": len(self.text) if step.source == "completion" else 0,
            "query": step.query,
            "neighbors": [neighbor_json(n) for n in step.neighbors],
        }
        self.job.emit(Event("retrieval", self.index, step=payload))

    def cancel(self) -> None:
        if not self.done:
            self.finish_reason = "cancelled"

    def end(self) -> None:
        """Generation stopped (every row done, or ``max_new_tokens`` reached): finish with what there is."""
        if not self.done:
            self._finish("length")

    def _send(self, upto: int) -> None:
        if upto > self.sent:
            self.job.emit(Event("text", self.index, text=self.text[self.sent : upto]))
            self.sent = upto

    def _finish(self, reason: str) -> None:
        self._send(len(self.text))
        self.finish_reason = reason
        self.job.emit(Event("finish", self.index, reason=reason, tokens=len(self.tokens)))


class BatchStreamer:
    """HF's ``BaseStreamer`` for a batch of rows: skips the prompts, routes each step's ``(batch,)`` tokens
    to the rows, and ends the batch (raising :class:`BatchFinished`) once no row needs more."""

    def __init__(self, rows: list[RowState], stopping: threading.Event):
        self.rows, self.stopping = rows, stopping
        self.prompt_seen = False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True  # HF's first put is the prompt (batch, prompt_len)
        else:
            for row, token in zip(self.rows, value.reshape(-1).tolist(), strict=True):
                row.add(int(token))
        for row in self.rows:
            if row.job.cancelled.is_set() or self.stopping.is_set():
                row.cancel()
        if all(row.done for row in self.rows):
            raise BatchFinished

    def end(self) -> None:
        pass


class GenerationWorker:
    """The thread that owns the model, and the bounded queue of jobs that feeds it."""

    def __init__(
        self, backend: Backend, *, max_batch: int = 16, max_queue: int = 64, batch_wait: float = 0.02
    ):
        self.backend = backend
        self.max_batch, self.max_queue, self.batch_wait = max_batch, max_queue, batch_wait
        self.pending: collections.deque[Job] = collections.deque()
        self.condition = threading.Condition()
        self.stopping = threading.Event()  # cancel what runs, take nothing new
        self.closed = False
        self.batches = 0  # generate calls made, and the rows they ran: rows_run / batches is the mean batch
        self.rows_run = 0
        self.running = 0  # rows in the batch running now
        self.tokens_generated = 0  # completion tokens of every row so far
        self.thread = threading.Thread(target=self._run, name="retlm-serve-model", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def submit(self, job: Job) -> None:
        with self.condition:
            if self.closed:
                raise ShuttingDown
            if len(self.pending) >= self.max_queue:
                raise QueueFull
            job.withdraw = self._withdraw
            self.pending.append(job)
            self.condition.notify()

    def _withdraw(self, job: Job) -> None:
        with self.condition:
            if job in self.pending:
                self.pending.remove(job)

    @property
    def waiting(self) -> int:
        return len(self.pending)

    def close(self, grace: float = 0.0) -> None:
        """Take no new job; cancel the waiting ones now and the running batch after ``grace`` seconds."""
        with self.condition:
            self.closed = True
            waiting, self.pending = list(self.pending), collections.deque()
            self.condition.notify_all()
        for job in waiting:
            job.cancel()
            job.emit(SHUTDOWN)
            job.emit(Event("end"))
        if grace <= 0:
            self.stopping.set()
        else:
            threading.Timer(grace, self.stopping.set).start()

    def join(self, timeout: float) -> None:
        self.stopping.set()
        with self.condition:
            self.condition.notify_all()
        if self.thread.is_alive():
            self.thread.join(timeout)

    def _next_batch(self) -> list[Job] | None:
        """The oldest job and the waiting ones that can share its batch, gathered until the batch is full or
        the oldest has waited ``batch_wait`` seconds: clients that send at the same moment arrive a few
        milliseconds apart (a job that waited behind a running batch has waited long enough)."""
        with self.condition:
            while not self.pending:
                if self.closed:
                    return None
                self.condition.wait(timeout=0.5)
            first = self.pending.popleft()
            batch, rows = [first], first.rows
            key = first.batch_key()
            limit = min(self.max_batch, self.backend.max_rows(first.sampling))
            if key is None or rows >= limit:
                return batch
            deadline = first.created + self.batch_wait
            while True:
                for job in list(self.pending):
                    if rows + job.rows > limit:
                        break
                    if job.batch_key() == key:
                        self.pending.remove(job)
                        batch.append(job)
                        rows += job.rows
                left = deadline - time.monotonic()
                if rows >= limit or left <= 0 or self.closed:
                    return batch
                self.condition.wait(timeout=left)

    def _run(self) -> None:
        import torch

        with torch.inference_mode():
            while not self.stopping.is_set():
                batch = self._next_batch()
                if batch is None:
                    return
                self._generate(batch)

    def _generate(self, jobs: list[Job]) -> None:
        rows: list[RowState] = []
        prompts: list[Prompt] = []
        for job in jobs:
            for index in range(job.rows):
                prompt = job.prompts[index // job.n]
                rows.append(RowState(job, index, self.backend))
                prompts.append(prompt)
        sampling, max_new = jobs[0].sampling, max(job.max_tokens for job in jobs)
        per_call = max(1, self.backend.max_rows(sampling))
        self.batches += 1
        self.rows_run += len(rows)
        self.running = len(rows)
        try:
            for start in range(0, len(rows), per_call):  # one call when the backend batches them all
                part = rows[start : start + per_call]
                self._call(part, prompts[start : start + per_call], max_new, sampling)
        except Exception as err:  # a failure of the model: every request of the batch gets it
            logger.exception("generation failed")
            for job in jobs:
                job.emit(Event("error", text=f"generation failed: {type(err).__name__}", reason="failure"))
        finally:
            self.running = 0
            self.tokens_generated += sum(len(row.tokens) for row in rows)
            for row in rows:
                row.end()
            for job in jobs:
                if self.stopping.is_set() and not job.cancelled.is_set():
                    job.emit(SHUTDOWN)
                job.emit(Event("end"))

    def _call(self, rows: list[RowState], prompts: list[Prompt], max_new: int, sampling: Sampling) -> None:
        if all(row.done for row in rows) or all(row.job.cancelled.is_set() for row in rows):
            return
        streamer = BatchStreamer(rows, self.stopping)

        def on_retrieval(row: int, step: RetrievalStep) -> None:
            rows[row].retrieved(step)

        try:
            self.backend.generate(prompts, max_new, sampling, streamer, on_retrieval)
        except BatchFinished:
            pass
