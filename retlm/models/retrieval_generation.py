"""Generation that retrieves: at every chunk boundary, search the database with the chunk just
completed and continue with its neighbors in chunked cross-attention.

The loop drives :class:`RetroForCausalLM`'s incremental API (see ``modeling_retro``): a call receives
the neighbors of every chunk whose LAST token is among its ``input_ids``. Because the tokens of a
chunk are all known before that chunk's last token is fed, the database is searched just before that
call, so the last token of chunk u already reads the neighbors of chunk u, exactly as in training.

The database is duck-typed (this module imports nothing from ``retlm.retrieval``): anything with
``chunk_size``, ``pad_id``, ``num_neighbors`` and ``search(token_chunks (..., chunk_size), k)``
returning an object with ``tokens (..., k, 2 * chunk_size)``, ``chunk_ids``, ``doc_ids`` and
``scores`` (numpy) works; :class:`retlm.retrieval.RetrievalDatabase` is one.

Decoding reuses transformers' logits processors (repetition penalty, no-repeat n-gram size, then
temperature, top-k, top-p when sampling), so the options mean what they mean in
``GenerationMixin.generate``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor
from transformers.generation.logits_process import (
    LogitsProcessorList,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from retlm.compat import cache_kwargs, output_cache
from retlm.models.padding import left_padding
from retlm.utils import deprecated_keyword


class SearchableDatabase(Protocol):
    chunk_size: int
    pad_id: int
    num_neighbors: int

    def search(self, queries: Any, k: int) -> Any: ...


@dataclass
class ChunkRetrieval:
    """What was retrieved for one completed chunk of one row.

    ``chunk_index``: which chunk of the sequence (0-based); ``query``: its token ids ``(chunk_size,)``;
    ``chunk_ids``, ``doc_ids``, ``scores``: ``(k,)`` database neighbors (-1: none);
    ``tokens``: ``(k, 2 * chunk_size)`` neighbor + continuation as fed to the model.
    """

    chunk_index: int
    query: np.ndarray
    chunk_ids: np.ndarray
    doc_ids: np.ndarray
    scores: np.ndarray
    tokens: np.ndarray


@dataclass
class RetrievalGenerateOutput:
    """``sequences (batch, prompt + new)``; ``retrievals[row]``: one :class:`ChunkRetrieval` per completed
    chunk, in order, covering the prompt's own chunks and the generated ones."""

    sequences: Tensor
    retrievals: list[list[ChunkRetrieval]] = field(default_factory=list)


def logits_processors(
    do_sample: bool,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    repetition_penalty: float | None = None,
    no_repeat_ngram_size: int | None = None,
) -> LogitsProcessorList:
    """HF's processors in ``GenerationMixin.generate``'s order: the penalties (greedy or sampled), then,
    when sampling, the warpers (temperature, top-k, top-p)."""
    processors = LogitsProcessorList()
    if repetition_penalty is not None and repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))  # raises if <= 0
    if no_repeat_ngram_size is not None and no_repeat_ngram_size > 0:
        processors.append(NoRepeatNGramLogitsProcessor(no_repeat_ngram_size))
    if not do_sample:
        return processors
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if temperature != 1.0:
        processors.append(TemperatureLogitsWarper(temperature))
    if top_k is not None and top_k > 0:
        processors.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p))
    return processors


class _Retriever:
    """Searches the database for completed chunks and remembers what it found, per row.

    ``padding (batch,)``: each row's leading padding columns; row i's chunk u is its columns
    ``padding[i] + u*c .. padding[i] + u*c + c - 1`` (chunks are counted from the row's first real token).
    """

    def __init__(
        self,
        database: SearchableDatabase,
        k: int,
        padding: Tensor,
        on_retrieval: Callable[[int, ChunkRetrieval], None] | None = None,
    ) -> None:
        self.database = database
        self.k = k
        self.padding = padding.tolist()
        self.on_retrieval = on_retrieval
        self.log: list[list[ChunkRetrieval]] = [[] for _ in self.padding]

    def __call__(self, sequence: Tensor, chunks: list[range]) -> Tensor | None:
        """Neighbors of row i's ``chunks[i]`` of ``sequence (batch, n)``: ``(batch, m, k, 2c)`` with ``m``
        the longest list (a shorter row's extra entries are -1: missing), or None when none is asked."""
        width = max(len(u) for u in chunks)
        if width == 0:
            return None
        c = self.database.chunk_size
        wanted = [(row, j, u) for row, us in enumerate(chunks) for j, u in enumerate(us)]
        rows = sequence.cpu().numpy()
        queries = np.stack([rows[row, self.padding[row] + u * c :][:c] for row, _, u in wanted])
        found = self.database.search(queries, self.k)
        tokens = np.asarray(found.tokens)
        out = np.full((len(chunks), width, *tokens.shape[1:]), -1, dtype=np.int64)
        for n, (row, j, u) in enumerate(wanted):
            out[row, j] = tokens[n]
            step = ChunkRetrieval(
                u, queries[n], found.chunk_ids[n], found.doc_ids[n], found.scores[n], tokens[n]
            )
            self.log[row].append(step)
            if self.on_retrieval is not None:
                self.on_retrieval(row, step)
        return torch.as_tensor(out, dtype=torch.long, device=sequence.device)


@torch.no_grad()
def generate_with_retrieval(
    model: Any,
    database: SearchableDatabase | None,
    input_ids: Tensor,
    *,
    attention_mask: Tensor | None = None,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    no_repeat_ngram_size: int | None = None,
    num_neighbors: int | None = None,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
    retention_mode: str | None = None,
    streamer: Any | None = None,
    on_retrieval: Callable[[int, ChunkRetrieval], None] | None = None,
    **deprecated: Any,
) -> RetrievalGenerateOutput:
    """Continue ``input_ids (batch, prompt_len)`` by up to ``max_new_tokens``, retrieving from
    ``database`` at every chunk boundary (``database=None``: no retrieval).

    ``attention_mask (batch, prompt_len)``: left padding (zeros, then ones) batches prompts of different
    lengths; each row is then generated, and retrieves at its own chunk boundaries, as if alone.

    The prompt runs in one forward pass (its completed chunks retrieved first); then one token per
    step with the model's cache (KV cache for the transformer decoder, constant-size recurrent state
    for the RetNet decoder). Rows stop independently at ``eos_token_id`` (then padded with it).
    ``repetition_penalty`` and ``no_repeat_ngram_size`` apply to greedy and sampled decoding alike, over
    the whole sequence (prompt included), as in HF's ``generate``.

    ``streamer``: HF's ``BaseStreamer`` protocol, as ``generate`` drives it: ``put(input_ids (batch,
    prompt_len))`` first, then ``put(tokens (batch,))`` after every step, then ``end()``; an exception
    raised by ``put`` ends generation (a server cancels a request this way). ``on_retrieval(row, step)``
    is called with each :class:`ChunkRetrieval` as it is searched: a row's prompt chunks before the first
    forward pass, then the chunk that each new token completes, after that token went to the streamer.
    ``retention_mode``: the RetNet decoder's (``retnet_mode=`` is its deprecated name).
    """
    retention_mode = retention_mode or deprecated_keyword(deprecated, "retnet_mode", "retention_mode")
    if deprecated:
        raise TypeError(f"generate_with_retrieval() got unexpected keyword arguments {sorted(deprecated)}")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(
            f"input_ids must be a non-empty (batch, prompt_len) tensor, got {tuple(input_ids.shape)}"
        )
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    config = model.config
    c = config.chunk_size
    if database is not None and database.chunk_size != c:
        raise ValueError(
            f"the database's chunk_size={database.chunk_size} differs from the model's "
            f"chunk_size={c}; build the database with --chunk-size {c}"
        )
    total = input_ids.shape[1] + max_new_tokens
    if total > config.max_seq_len:
        from retlm.errors import OptionError  # a usage error (exit code 2), before any forward pass

        raise OptionError(
            f"prompt ({input_ids.shape[1]}) + max_new_tokens ({max_new_tokens}) = {total} "
            f"exceeds the model's max_seq_len={config.max_seq_len}"
        )
    k = num_neighbors or (database.num_neighbors if database is not None else 0)
    batch, prompt_len = input_ids.shape
    padding = torch.zeros(batch, dtype=torch.long)
    if attention_mask is not None:
        found_padding = left_padding(attention_mask, None, 0, prompt_len, decoding=True)  # validates
        padding = found_padding.cpu() if found_padding is not None else padding
    retrieve = _Retriever(database, k, padding, on_retrieval) if database is not None else None
    processors = logits_processors(
        do_sample, temperature, top_k, top_p, repetition_penalty, no_repeat_ngram_size
    )
    mask = {"attention_mask": attention_mask} if bool(padding.any()) else {}
    lengths = (prompt_len - padding).tolist()  # real tokens per row

    sequence = input_ids
    if streamer is not None:
        streamer.put(sequence.cpu())
    retrieved = retrieve(sequence, [range(n // c) for n in lengths]) if retrieve else None
    out = model(
        input_ids=sequence,
        retrieved=retrieved,
        use_cache=True,
        retention_mode=retention_mode,
        logits_to_keep=1,
        **mask,
    )
    cache = output_cache(out)
    finished = torch.zeros(sequence.shape[0], dtype=torch.bool, device=sequence.device)
    for step in range(max_new_tokens):
        scores = processors(sequence, out.logits[:, -1].float())
        if do_sample:
            probs = scores.softmax(dim=-1)
            next_token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            next_token = scores.argmax(dim=-1)
        if eos_token_id is not None:
            next_token = torch.where(finished, torch.full_like(next_token, eos_token_id), next_token)
            finished |= next_token == eos_token_id
        sequence = torch.cat((sequence, next_token[:, None]), dim=1)
        if streamer is not None:
            streamer.put(next_token.cpu())
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        retrieved = None
        if retrieve:  # row i's token about to be fed sits at its position n; it completes chunk n // c
            positions = [n + step for n in lengths]
            retrieved = retrieve(sequence, [range(n // c, (n + 1) // c) for n in positions])
            if retrieved is not None:
                retrieved = retrieved[:, 0]  # (batch, k, 2c): one chunk, as the incremental API expects
        out = model(
            input_ids=sequence[:, -1:],
            retrieved=retrieved,
            use_cache=True,
            retention_mode=retention_mode,
            **cache_kwargs(cache),
        )
    if streamer is not None:
        streamer.end()
    return RetrievalGenerateOutput(sequence, retrieve.log if retrieve else [[] for _ in range(len(sequence))])
