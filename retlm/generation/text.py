"""RETRO's generation from text (:func:`generate_text`): tokenize a prompt with the database's tokenizer,
generate with retrieval at every chunk boundary through chunked cross-attention, and report the neighbors
used, as text. The token-level loop is :func:`retlm.models.retrieval_generation.generate_with_retrieval`;
this module adds the text on both ends (the database and the model share one tokenizer, the database's
LM tokenizer)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from retlm.generation.neighbors import NeighborText
from retlm.models.retrieval_generation import generate_with_retrieval
from retlm.utils import quoted


class _Excluding:
    """A database whose searches skip one document (a prompt's own, when it is in the database)."""

    def __init__(self, database: Any, doc_id: int):
        self.database, self.doc_id = database, int(doc_id)
        self.chunk_size, self.pad_id = database.chunk_size, database.pad_id
        self.num_neighbors = database.num_neighbors

    def search(self, queries: Any, k: int) -> Any:
        return self.database.search(queries, k, exclude_doc_ids=self.doc_id)


@dataclass
class GeneratedText:
    """``prompt`` + ``continuation`` = ``text``; ``chunks[i]`` = (text of completed chunk i, its
    neighbors), in the order the model read them; the first ``prompt_chunks`` of them are the prompt's."""

    prompt: str
    continuation: str
    text: str
    chunks: list[tuple[str, list[NeighborText]]] = field(default_factory=list)
    prompt_chunks: int = 0


def generate_text(
    model: Any,
    database: Any,
    prompt: str,
    *,
    retrieval: bool = True,
    max_new_tokens: int = 64,
    seed: int | None = None,
    exclude_doc_id: int | None = None,
    **sampling: Any,
) -> GeneratedText:
    """Continue ``prompt`` with ``model``, retrieving from ``database`` (unless ``retrieval=False``).

    ``sampling``: ``do_sample, temperature, top_k, top_p, num_neighbors, eos_token_id`` as in
    :func:`generate_with_retrieval`. ``seed`` makes sampling reproducible. ``exclude_doc_id``: a document
    never retrieved from (the prompt's own, so the model cannot read the true continuation).
    """
    tokenizer = database.tokenizer
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("the prompt holds no token; give some text")
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        searched = database if exclude_doc_id is None else _Excluding(database, exclude_doc_id)
        out = generate_with_retrieval(
            model,
            searched if retrieval else None,
            input_ids,
            max_new_tokens=max_new_tokens,
            generator=generator,
            **sampling,
        )
    finally:
        model.train(was_training)
    new = out.sequences[0, len(ids) :].tolist()
    chunks = []
    for r in out.retrievals[0]:
        real = [t for t in r.query.tolist() if t != database.pad_id]
        query = tokenizer.decode(real, skip_special_tokens=True)
        name = getattr(database, "doc_name", None)
        neighbors = [
            NeighborText(int(i), int(d), float(s), database.chunk_text(int(i)), name(int(d)) if name else "")
            for i, d, s in zip(r.chunk_ids, r.doc_ids, r.scores, strict=True)
            if i >= 0
        ]
        chunks.append((query, neighbors))
    continuation = tokenizer.decode(new, skip_special_tokens=True)
    text = tokenizer.decode(out.sequences[0].tolist(), skip_special_tokens=True)
    return GeneratedText(prompt, continuation, text, chunks, len(ids) // int(database.chunk_size))


def print_neighbors(result: GeneratedText) -> None:
    """Each completed chunk of ``result``, then the neighbors the model read for it, each under the name
    of its source document, with their layout kept (the CLI's ``--show-neighbors`` and the demo)."""
    if not result.chunks:
        print("(no chunk was completed, so nothing was retrieved)")
    for i, (query, neighbors) in enumerate(result.chunks):
        where = "of the prompt" if i < result.prompt_chunks else "generated"
        print(f"chunk {i}: ({where})")
        print(quoted(query))
        if not neighbors:
            print("  (no neighbor)")
        for rank, n in enumerate(neighbors, 1):
            print(f"  neighbor {rank}: {n.source}  (score {n.score:.3f}, doc {n.doc_id}, chunk {n.chunk_id})")
            print(quoted(n.text))


def print_generation(result: GeneratedText, show_neighbors: bool) -> None:
    """Print the text, and (optionally) each completed chunk with the neighbors the model read."""
    print(result.text)
    if show_neighbors:
        print()
        print_neighbors(result)
