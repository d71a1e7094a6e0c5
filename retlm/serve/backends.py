"""What `retlm serve` runs: a model and its database behind one small protocol, :class:`Backend`.

Two backends exist, one per way of reading retrieved text:

- :class:`CCABackend`: a RETRO or RETRO-fit model, which reads the neighbors of every completed chunk
  through chunked cross-attention (:func:`retlm.models.retrieval_generation.generate_with_retrieval`). Rows
  of different lengths batch together (left padding), with retrieval on or off.
- :class:`CausalLMBackend`: any HF causal LM. Without retrieval it generates with ``model.generate``
  (batched); with ``--in-context`` retrieval, every ``stride`` tokens the recent text is searched and the
  passages are put in front of the context (In-Context RALM, ``retlm.generation.generate_in_context``),
  one row at a time.

A backend's :meth:`generate` is called from one thread only (the server's worker, which owns the model);
``encode``, ``decode``, ``chat_prompt`` and ``search`` may be called from other threads and take the
backend's lock around the tokenizer and the database, which are not safe to share between threads.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from retlm.generation.neighbors import NeighborText


def neighbor_json(neighbor: NeighborText) -> dict[str, Any]:
    """A neighbor as the API shows it."""
    return {
        "doc_name": neighbor.doc_name,
        "doc_id": neighbor.doc_id,
        "chunk_id": neighbor.chunk_id,
        "score": round(neighbor.score, 6),
        "text": neighbor.text,
    }


@dataclass
class RetrievalStep:
    """One search made while generating a row.

    ``token_offset``: tokens of the row (prompt + completion) before the point where the model starts
    reading ``neighbors``; ``source``: ``"prompt"`` when those tokens all belong to the prompt, else
    ``"completion"``; ``query``: the text that was searched; each neighbor's ``text`` is what the model
    read: the chunk and its continuation (the next chunk of its document).
    """

    token_offset: int
    source: str
    query: str
    neighbors: list[NeighborText] = field(default_factory=list)


@dataclass
class Prompt:
    """A prompt as text and as the model's token ids (``ids`` is ``text`` encoded; for a prompt sent as
    token ids, ``text`` is their decoding)."""

    text: str
    ids: list[int]

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class Sampling:
    """How a batch decodes; requests batch together only when theirs are equal (and have no seed).

    ``temperature == 0``: greedy. ``retrieval=False``: the model without retrieved text.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    retrieval: bool = True
    num_neighbors: int | None = None

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0

    def decoding(self) -> dict[str, Any]:
        """The decoding keywords both generation paths take (RETRO's and In-Context RALM's)."""
        return {
            "do_sample": self.do_sample,
            "temperature": self.temperature if self.do_sample else 1.0,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "repetition_penalty": self.repetition_penalty,
        }

    def generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)


OnRetrieval = Callable[[int, RetrievalStep], None]


class Backend(Protocol):
    """What the server needs from a model (see the module docstring for threads)."""

    kind: str  # "cca", "in-context" or "none": how retrieved text reaches the model
    context_length: int  # tokens of prompt + completion the model accepts
    eos_token_ids: frozenset[int]
    vocab_size: int  # token ids a prompt may hold: 0 .. vocab_size - 1
    max_neighbors: int  # the most neighbors a search can return

    def encode(self, text: str) -> list[int]: ...

    def decode(self, token_ids: Sequence[int]) -> str: ...

    def chat_prompt(self, messages: list[dict[str, str]]) -> str: ...

    def max_rows(self, sampling: Sampling) -> int:
        """How many rows one :meth:`generate` call runs at once for ``sampling`` (1: one at a time)."""
        ...

    def generate(
        self,
        prompts: list[Prompt],
        max_new_tokens: int,
        sampling: Sampling,
        streamer: Any,
        on_retrieval: OnRetrieval,
    ) -> None:
        """Generate for every row of ``prompts``, feeding ``streamer`` (HF's ``BaseStreamer``
        protocol: the prompts ``(batch, len)``, then ``(batch,)`` per step) and ``on_retrieval(row, step)``.
        """
        ...

    def search(self, query: str, k: int) -> list[NeighborText]: ...

    def describe(self) -> dict[str, Any]: ...


def left_pad(
    prompts: list[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, both ``(batch, longest)``: each prompt at the right end."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return ids.to(device), mask.to(device)


def plain_chat_prompt(messages: list[dict[str, str]]) -> str:
    """A transcript for a tokenizer without a chat template: ``role: content`` lines, then
    ``assistant:``, so the model continues as the assistant."""
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n".join([*lines, "assistant:"])


class _Shared:
    """The parts every backend has: a tokenizer and a database behind one lock, and the searches."""

    def __init__(self, tokenizer: Any, database: Any):
        self.tokenizer = tokenizer
        self.database = database
        self.lock = threading.RLock()
        self.vocab_size = len(tokenizer)
        self.max_neighbors = max(database.num_chunks, database.num_neighbors) if database is not None else 0

    def encode(self, text: str) -> list[int]:
        """``text`` in the model's tokens, without added special tokens (as In-Context RALM and a chat
        template's text want them)."""
        with self.lock:
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, token_ids: Sequence[int]) -> str:
        with self.lock:
            return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        with self.lock:
            if getattr(self.tokenizer, "chat_template", None):
                return self.tokenizer.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=False
                )
        return plain_chat_prompt(messages)

    def search(self, query: str, k: int) -> list[NeighborText]:
        """The ``k`` nearest chunks of ``query`` (cut to its first ``chunk_size`` LM tokens, as `retlm
        search` does); each ``text`` is the chunk alone."""
        with self.lock:
            db = self.database
            found = db.search([query], k)
            return [
                NeighborText(int(i), int(d), float(s), db.chunk_text(int(i)), db.doc_name(int(d)))
                for i, d, s in zip(found.chunk_ids[0], found.doc_ids[0], found.scores[0], strict=True)
                if int(i) >= 0
            ]

    def describe(self) -> dict[str, Any]:
        """What /health and /v1/models report: the retrieval kind, the model, its context and database."""
        info: dict[str, Any] = {
            "retrieval": self.kind,
            "architecture": type(self.model).__name__,
            "context_length": self.context_length,
        }
        if self.database is not None:
            info["database"] = self.database_info()
        return info

    def database_info(self) -> dict[str, Any]:
        db = self.database
        return {
            "path": str(db.path),
            "chunks": db.num_chunks,
            "documents": db.num_docs,
            "chunk_size": db.chunk_size,
            "num_neighbors": db.num_neighbors,
        }


class _LockedSearch:
    """The database as generation reads it, each search under the backend's lock (the embedder's
    tokenizer and the faiss index are not shared safely between threads)."""

    def __init__(self, database: Any, lock: threading.RLock):
        self._database, self._lock = database, lock

    def search(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return self._database.search(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._database, name)


class CCABackend(_Shared):
    """A RETRO or RETRO-fit model (chunked cross-attention) and the database it was trained with."""

    kind = "cca"

    def __init__(self, model: Any, database: Any, *, max_batch: int = 16):
        super().__init__(database.tokenizer, database)
        self.model = model.eval()
        self.max_batch = max_batch
        config = model.config
        self.chunk_size = int(config.chunk_size)
        self.context_length = int(getattr(config, "max_seq_len", None) or 2**31 - 1)
        self.eos_token_ids = frozenset({int(database.eos_id)})
        self.device = next(model.parameters()).device

    def max_rows(self, sampling: Sampling) -> int:
        return self.max_batch

    def generate(
        self,
        prompts: list[Prompt],
        max_new_tokens: int,
        sampling: Sampling,
        streamer: Any,
        on_retrieval: OnRetrieval,
    ) -> None:
        from retlm.models.retrieval_generation import generate_with_retrieval

        input_ids, mask = left_pad([p.ids for p in prompts], self.database.pad_id, self.device)
        searched = _LockedSearch(self.database, self.lock) if sampling.retrieval else None
        prompt_lengths = [len(p) for p in prompts]

        def announce(row: int, found: Any) -> None:
            offset = (int(found.chunk_index) + 1) * self.chunk_size  # the row's tokens up to the chunk's end
            pad, db = self.database.pad_id, self.database
            with self.lock:
                query = self.tokenizer.decode(
                    [int(t) for t in found.query if int(t) != pad], skip_special_tokens=True
                )
                neighbors = [
                    NeighborText(
                        int(i),
                        int(d),
                        float(s),
                        self.tokenizer.decode(
                            [int(t) for t in read if int(t) != pad], skip_special_tokens=True
                        ),
                        db.doc_name(int(d)),
                    )
                    for i, d, s, read in zip(
                        found.chunk_ids, found.doc_ids, found.scores, found.tokens, strict=True
                    )
                    if int(i) >= 0
                ]
            source = "prompt" if offset <= prompt_lengths[row] else "completion"
            on_retrieval(row, RetrievalStep(offset, source, query, neighbors))

        generate_with_retrieval(
            self.model,
            searched,
            input_ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            **sampling.decoding(),
            num_neighbors=sampling.num_neighbors,
            eos_token_id=int(self.database.eos_id),
            generator=sampling.generator(self.device),
            streamer=streamer,
            on_retrieval=announce,
        )


class CausalLMBackend(_Shared):
    """Any HF causal LM: plain ``generate`` without retrieval, In-Context RALM with it.

    ``database=None``: the model alone (every request runs without retrieval). ``stride``: tokens
    generated between two searches; ``query_tokens``: how many recent tokens form the query.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        database: Any | None,
        *,
        max_batch: int = 16,
        stride: int = 16,
        query_tokens: int = 32,
    ):
        super().__init__(tokenizer, database)
        self.model = model.eval()
        self.vocab_size = min(self.vocab_size, int(getattr(model.config, "vocab_size", self.vocab_size)))
        self.kind = "in-context" if database is not None else "none"
        self.max_batch, self.stride, self.query_tokens = max_batch, stride, query_tokens
        config = model.config
        limit = getattr(config, "max_position_embeddings", None) or getattr(tokenizer, "model_max_length", 0)
        self.context_length = int(limit) if limit and limit < 10**9 else 2048
        self.device = next(model.parameters()).device
        self.generation_config = _plain_generation_config(model, tokenizer)
        eos = self.generation_config.eos_token_id
        self.eos_token_ids = frozenset(
            int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None
        )

    def max_rows(self, sampling: Sampling) -> int:
        return 1 if sampling.retrieval and self.database is not None else self.max_batch

    def generate(
        self,
        prompts: list[Prompt],
        max_new_tokens: int,
        sampling: Sampling,
        streamer: Any,
        on_retrieval: OnRetrieval,
    ) -> None:
        if sampling.retrieval and self.database is not None:
            if len(prompts) != 1:  # each row's context is its own (max_rows says 1)
                raise ValueError(f"in-context generation runs one row per call, got {len(prompts)}")
            self._in_context(prompts[0], max_new_tokens, sampling, streamer, on_retrieval)
            return
        input_ids, mask = left_pad([p.ids for p in prompts], self.generation_config.pad_token_id, self.device)
        config = copy.deepcopy(self.generation_config)
        config.max_new_tokens, config.do_sample = max_new_tokens, sampling.do_sample
        if sampling.do_sample:
            config.temperature, config.top_p, config.top_k = (
                sampling.temperature,
                sampling.top_p,
                sampling.top_k,
            )
        if sampling.repetition_penalty is not None:
            config.repetition_penalty = sampling.repetition_penalty
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)  # HF's sampling draws from the global generator
        self.model.generate(
            input_ids=input_ids, attention_mask=mask, generation_config=config, streamer=streamer
        )

    def _in_context(
        self,
        prompt: Prompt,
        max_new_tokens: int,
        sampling: Sampling,
        streamer: Any,
        on_retrieval: OnRetrieval,
    ) -> None:
        from retlm.generation.in_context import generate_in_context

        def announce(step: Any) -> None:
            source = "prompt" if step.position == 0 else "completion"
            on_retrieval(0, RetrievalStep(len(prompt) + step.position, source, step.query, step.neighbors))

        eos = self.generation_config.eos_token_id
        generate_in_context(
            self.model,
            self.tokenizer,
            _LockedSearch(self.database, self.lock),
            prompt.text,
            max_new_tokens=max_new_tokens,
            stride=self.stride,
            query_tokens=self.query_tokens,
            num_neighbors=sampling.num_neighbors or self.database.num_neighbors,
            streamer=streamer,
            on_retrieval=announce,
            seed=sampling.seed,
            **sampling.decoding(),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
        )

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        if self.database is not None:
            info["stride"], info["query_tokens"] = self.stride, self.query_tokens
        return info


def _plain_generation_config(model: Any, tokenizer: Any) -> Any:
    """The model's own generation config with its decoding choices cleared (each request makes its own:
    greedy unless it samples) and a pad token (the eos token when the tokenizer has none)."""
    config = copy.deepcopy(model.generation_config)
    for name in ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty"):
        setattr(config, name, None)
    if config.eos_token_id is None:
        config.eos_token_id = tokenizer.eos_token_id
    if config.pad_token_id is None:
        eos = config.eos_token_id
        fallback = eos[0] if isinstance(eos, list) else eos
        config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else fallback
    return config
