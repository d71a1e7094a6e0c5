"""In-context retrieval for any frozen causal LM (In-Context RALM, Ram et al. 2023).

The LM is unchanged. Every ``stride`` tokens, the last ``query_tokens`` tokens, decoded to text, query
the database. The top ``num_neighbors`` chunks, each with its continuation (RETRO's neighbor: the chunk
and the next chunk of its document, :meth:`RetrievalDatabase.retrieved_tokens`), are decoded with the
database's tokenizer and placed in front of the context as text: :func:`neighbor_block`, each neighbor
followed by a blank line, best first. The LM's own tokenizer re-tokenizes that text, so the database's
tokenizer need not be the LM's.

The context budget. ``max_length`` is the model's context length (``config.max_position_embeddings``,
or ``n_positions``; 8,192 for SmolLM2), unless the caller gives a smaller one:

- the neighbor block gets at most ``max_length // 2`` tokens (:func:`neighbor_budget`); neighbors go in
  whole, in rank order, while the block fits, and the ones after are left out (never cut mid-text);
- the recent prefix gets the rest, less the tokens read before the next retrieval, so that
  ``block + prefix + stride <= max_length`` holds until then (:func:`context_ids`).

A retrieval changes what is in front of the prefix, so the KV cache of the old context is useless: at
each retrieval the LM re-reads block + prefix in one forward pass. Between retrievals it decodes one token
per forward pass from its KV cache.

The database is anything with ``chunk_size``, ``pad_id``, ``tokenizer`` and ``search(token_chunks, k,
exclude_doc_ids=...)`` returning numpy ``chunk_ids, doc_ids, scores (n, k)`` and ``tokens (n, k, 2 *
chunk_size)`` (:class:`retlm.retrieval.RetrievalDatabase`); ``doc_name(doc_id)`` names sources.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from retlm.compat import cache_kwargs, output_cache
from retlm.errors import OptionError, check_int
from retlm.generation.neighbors import NeighborText
from retlm.models.retrieval_generation import logits_processors

NEIGHBOR_SEPARATOR = "\n\n"  # after each neighbor's text in the block in front of the context


@dataclass
class InContextRetrieval:
    """One retrieval of in-context generation.

    ``position``: tokens generated before it (0: at the end of the prompt); ``text_offset``: characters of
    the result's ``text`` before it; ``query``: the query text; ``neighbors``: what was placed in front,
    best first (each ``text`` is the chunk and its continuation); ``context_tokens``: tokens the LM read
    at this retrieval (neighbor block + prefix), ``neighbor_tokens`` of them the block's.
    """

    position: int
    text_offset: int
    query: str
    neighbors: list[NeighborText]
    context_tokens: int = 0
    neighbor_tokens: int = 0


@dataclass
class InContextText:
    """``prompt`` + ``continuation`` = ``text``; ``token_ids``: the generated ids (what a streamer got after
    the prompt); ``retrievals``: every retrieval, in order."""

    prompt: str
    continuation: str
    text: str
    token_ids: list[int] = field(default_factory=list)
    retrievals: list[InContextRetrieval] = field(default_factory=list)


def context_limit(model: Any) -> int:
    """The longest input ``model`` takes: its config's ``max_position_embeddings`` (or ``n_positions``,
    ``max_seq_len``)."""
    config = model.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    raise ValueError(f"cannot tell the context length of {type(model).__name__}; give max_length")


def neighbor_budget(max_length: int) -> int:
    """Tokens the neighbor block may take of a ``max_length`` context: half of it."""
    return max_length // 2


def neighbor_block(texts: Sequence[str]) -> str:
    """The text placed in front of the context: each neighbor's text followed by a blank line."""
    return "".join(text + NEIGHBOR_SEPARATOR for text in texts)


def fit_neighbors(tokenizer: Any, texts: Sequence[str], budget: int) -> tuple[list[int], int]:
    """``(ids, kept)``: the LM tokens of the block of the first ``kept`` neighbors (rank order), the most
    that fit in ``budget`` tokens whole."""
    ids: list[int] = []
    kept = 0
    for n in range(1, len(texts) + 1):
        candidate = tokenizer(neighbor_block(texts[:n]), add_special_tokens=False)["input_ids"]
        if len(candidate) > budget:
            break
        ids, kept = list(candidate), n
    return ids, kept


def context_ids(block: Sequence[int], history: Sequence[int], max_length: int, reserve: int) -> list[int]:
    """``block`` + as much of the end of ``history`` as leaves ``reserve`` tokens free in ``max_length``."""
    room = max(max_length - len(block) - reserve, 1)
    return [*block, *history[-room:]]


def search_neighbors(
    database: Any,
    queries: Sequence[str],
    k: int,
    exclude_doc_ids: int | Sequence[int] | np.ndarray | None = None,
) -> list[list[NeighborText]]:
    """The ``k`` nearest chunks of each query text, each with its continuation, as text.

    A query is re-tokenized by the database's tokenizer and cut to its LAST ``chunk_size`` tokens (the
    most recent text; queries are chunks, as in RETRO). A query with no token gets no neighbor.
    ``exclude_doc_ids``: one document for all queries, or one per query (-1: none), never retrieved.
    """
    tokenizer, c, pad = database.tokenizer, int(database.chunk_size), int(database.pad_id)
    ids = tokenizer(list(queries), add_special_tokens=False)["input_ids"] if len(queries) else []
    tokens = np.full((len(ids), c), pad, dtype=np.int64)
    for row, query in zip(tokens, ids, strict=True):
        last = query[-c:]
        row[: len(last)] = last
    present = np.flatnonzero([len(q) > 0 for q in ids])
    result: list[list[NeighborText]] = [[] for _ in ids]
    if not len(present):
        return result
    exclude = None
    if exclude_doc_ids is not None:
        exclude = np.broadcast_to(np.asarray(exclude_doc_ids, dtype=np.int64), (len(ids),))[present]
    found = database.search(tokens[present], k, exclude_doc_ids=exclude)
    chunk_ids, doc_ids, scores = (np.asarray(a) for a in (found.chunk_ids, found.doc_ids, found.scores))
    rows = np.asarray(found.tokens)
    wanted = [(i, j) for i in range(len(present)) for j in range(k) if chunk_ids[i, j] >= 0]
    texts = tokenizer.batch_decode(
        [[t for t in rows[i, j].tolist() if t != pad] for i, j in wanted], skip_special_tokens=True
    )
    name = getattr(database, "doc_name", None)
    for (i, j), text in zip(wanted, texts, strict=True):
        doc = int(doc_ids[i, j])
        neighbor = NeighborText(
            int(chunk_ids[i, j]), doc, float(scores[i, j]), text, name(doc) if name else ""
        )
        result[int(present[i])].append(neighbor)
    return result


class _Decoder:
    """Feeds the LM: a re-read of a whole context at a retrieval, else one token from the KV cache."""

    def __init__(self, model: Any) -> None:
        self.model, self.cache = model, None
        self.device = next(model.parameters()).device

    def read(self, ids: Sequence[int]) -> torch.Tensor:
        """Forward ``ids`` after a fresh start; returns the last position's logits ``(1, vocab)``."""
        inputs = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        out = self.model(input_ids=inputs, use_cache=True, logits_to_keep=1)
        self.cache = output_cache(out)
        return out.logits[:, -1]

    def step(self, token: int) -> torch.Tensor:
        inputs = torch.tensor([[token]], dtype=torch.long, device=self.device)
        out = self.model(input_ids=inputs, use_cache=True, **cache_kwargs(self.cache))
        self.cache = output_cache(out)
        return out.logits[:, -1]


@torch.no_grad()
def generate_in_context(
    model: Any,
    tokenizer: Any,
    database: Any,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    stride: int = 32,
    query_tokens: int = 32,
    num_neighbors: int = 2,
    exclude_doc_id: int | None = None,
    max_length: int | None = None,
    streamer: Any = None,
    on_retrieval: Callable[[InContextRetrieval], None] | None = None,
    seed: int | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    no_repeat_ngram_size: int | None = None,
    eos_token_id: int | None = None,
) -> InContextText:
    """Continue ``prompt`` with the frozen causal LM ``model`` (its ``tokenizer``), retrieving from
    ``database`` at the end of the prompt and then every ``stride`` generated tokens.

    ``streamer``: HF's ``BaseStreamer`` protocol, as ``generate`` drives it: ``put`` the prompt ids ``(1,
    prompt_len)``, then each new token ``(1,)``, then ``end()`` (``TextIteratorStreamer(skip_prompt=True)``
    streams the continuation). ``on_retrieval(step)`` is called at each retrieval, before the LM reads
    its neighbors. ``exclude_doc_id``: a document never retrieved from (the prompt's own).
    ``max_length``: the context budget (default: the model's; see the module docstring). Sampling options
    mean what they mean in HF ``generate``; ``eos_token_id`` (default: the tokenizer's) stops early.
    """
    _check_schedule(stride, query_tokens, num_neighbors, max_new_tokens)
    max_length = context_limit(model) if max_length is None else int(max_length)
    if stride >= neighbor_budget(max_length):
        raise OptionError(f"stride must be less than half the context length {max_length}, got {stride}")
    prompt_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if not prompt_ids:
        raise OptionError("the prompt holds no token; give some text")
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    processors = logits_processors(
        do_sample, temperature, top_k, top_p, repetition_penalty, no_repeat_ngram_size
    )
    decoder = _Decoder(model)
    generator = None if seed is None else torch.Generator(device=decoder.device).manual_seed(seed)
    ids, new, retrievals = list(prompt_ids), [], []
    prompt_text = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    if streamer is not None:
        streamer.put(torch.tensor([prompt_ids]))
    was_training = model.training
    model.eval()
    try:
        for _ in range(max_new_tokens):
            if len(new) % stride == 0:
                query = tokenizer.decode(ids[-query_tokens:], skip_special_tokens=True)
                neighbors = search_neighbors(database, [query], num_neighbors, exclude_doc_id)[0]
                block, kept = fit_neighbors(
                    tokenizer, [n.text for n in neighbors], neighbor_budget(max_length)
                )
                context = context_ids(block, ids, max_length, stride)
                offset = len(prompt) + len(_continuation(tokenizer, prompt_text, ids))
                step = InContextRetrieval(len(new), offset, query, neighbors[:kept], len(context), len(block))
                retrievals.append(step)
                if on_retrieval is not None:
                    on_retrieval(step)
                logits = decoder.read(context)
            else:
                logits = decoder.step(new[-1])
            scores = processors(torch.tensor([ids], device=logits.device), logits.float())
            if do_sample:
                token = int(torch.multinomial(scores.softmax(-1), 1, generator=generator))
            else:
                token = int(scores.argmax(-1))
            ids.append(token)
            new.append(token)
            if streamer is not None:
                streamer.put(torch.tensor([token]))
            if eos is not None and token == eos:
                break
    finally:
        model.train(was_training)
        if streamer is not None:
            streamer.end()
    continuation = _continuation(tokenizer, prompt_text, ids)
    return InContextText(prompt, continuation, prompt + continuation, new, retrievals)


def _continuation(tokenizer: Any, prompt_text: str, ids: Sequence[int]) -> str:
    """The text the tokens after the prompt add to it (decoded with the prompt, so that a token's leading
    space is kept)."""
    text = tokenizer.decode(list(ids), skip_special_tokens=True)
    return text[len(prompt_text) :] if text.startswith(prompt_text) else text


def _check_schedule(stride: int, query_tokens: int, num_neighbors: int, max_new_tokens: int) -> None:
    for name, value in (("stride", stride), ("query_tokens", query_tokens), ("num_neighbors", num_neighbors)):
        check_int(name, value)
    if max_new_tokens < 0:
        raise OptionError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
