"""A frozen HF encoder turning chunks into unit-norm vectors (mean-pooled or CLS).

Index keys and queries are embedded the same way, from one of two inputs:

- **text** (the default, whenever the LM tokenizer is not the embedder's own): the chunk's text, decoded
  from its LM tokens, is re-tokenized by the embedder's tokenizer (MiniLM's WordPiece) and wrapped as
  ``[CLS] text [SEP]``. A chunk whose WordPiece form is longer than the embedder's limit
  (``Embedder.max_length``: sentence-transformers' ``max_seq_length``, 256 for all-MiniLM-L6-v2, else the
  model's position limit) keeps its first ``max_length - 2`` WordPiece tokens, as sentence-transformers
  truncates; the database manifest counts such chunks. Rows are padded to their own length rounded up to a
  multiple of 16 and batched with rows of the same width, so a chunk's vector depends on its text only,
  not on its neighbors in the batch.
- **tokens** (retro-pytorch's way, ``--tokenizer bert``: the LM reads the embedder's vocabulary): the chunk's
  ids without padding, wrapped as ``[CLS] chunk [SEP]``, padded to the fixed width ``chunk_size + 2``.

Either way builds are reproducible and ``add()`` agrees with a full rebuild.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from retlm.retrieval._storage import ResumableRows, is_complete
from retlm.retrieval.encoders import check_backend, default_backend, load_encoder
from retlm.retrieval.format import POOLINGS
from retlm.tokenization import DEFAULT_EMBEDDER, resolve_model_path
from retlm.tokenization import load_embedder_tokenizer as load_tokenizer

WIDTH_STEP = 16  # text rows are padded to a multiple of this
BLOCK_BATCHES = 16  # embed_rows sorts this many batches of chunks by width at a time


def embedder_max_length(name: str, model_config, tokenizer) -> int:
    """The most WordPiece tokens (with [CLS] and [SEP]) the embedder reads: sentence-transformers'
    ``max_seq_length`` when its folder has ``sentence_bert_config.json``, capped by the model's positions."""
    limits = [getattr(model_config, "max_position_embeddings", None)]
    st_config = Path(resolve_model_path(name)) / "sentence_bert_config.json"
    if st_config.is_file():
        try:
            limits.append(json.loads(st_config.read_text()).get("max_seq_length"))
        except (json.JSONDecodeError, OSError):
            pass
    limits.append(getattr(tokenizer, "model_max_length", None))
    limits = [int(x) for x in limits if isinstance(x, int | float) and 2 < x < 1e9]
    if not limits:
        raise ValueError(f"embedder {name!r}: cannot tell its maximum input length")
    return min(limits)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """``(batch, seq, dim)`` hidden states -> ``(batch, dim)``: masked mean, or the [CLS] position."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling != "mean":
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-8)


class Embedder:
    """A frozen encoder for chunks: ``embed_texts`` (text input) and ``embed_chunks`` (token input) return
    L2-normalised float32 vectors.

    ``backend`` (one of ``retlm.retrieval.encoders.EMBED_BACKENDS``) runs the forward pass: ``torch`` (the
    reference), ``openvino``, ``onnx`` or ``onnx-int8``; default: ``torch`` on a CUDA device, else
    ``openvino``.
    """

    def __init__(
        self,
        name: str = DEFAULT_EMBEDDER,
        pooling: str = "mean",
        device: str | None = None,
        backend: str | None = None,
    ):
        from transformers import AutoConfig

        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.name = str(name)
        self.pooling = pooling
        self.backend = check_backend(backend or default_backend(device))
        self.device = (device or default_device()) if self.backend == "torch" else "cpu"
        self.config = AutoConfig.from_pretrained(resolve_model_path(self.name))
        self.tokenizer = load_tokenizer(self.name)
        self.cls_id = self.tokenizer.cls_token_id
        self.sep_id = self.tokenizer.sep_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        if self.cls_id is None or self.sep_id is None:
            raise ValueError(
                f"embedder {self.name!r}: its tokenizer has no [CLS]/[SEP] token; use a BERT-style encoder"
            )
        self.max_length = embedder_max_length(self.name, self.config, self.tokenizer)
        self.encoder = load_encoder(self.name, self.backend, self.device)

    @property
    def dim(self) -> int:
        return int(self.config.hidden_size)

    @property
    def model(self):
        """The HF torch model (the reference backend's; loaded on first use for the others)."""
        encoder = self.encoder if self.backend == "torch" else load_encoder(self.name, "torch", "cpu")
        return encoder.model

    # ---- text input (the default) ----

    def wordpiece_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """The embedder's own token ids of each text, without [CLS]/[SEP] and untruncated."""
        return self.tokenizer(
            list(texts),
            add_special_tokens=False,
            return_attention_mask=False,
            return_token_type_ids=False,
            verbose=False,
        )["input_ids"]

    def count_truncated(self, texts: Sequence[str]) -> int:
        """How many of ``texts`` are longer than the embedder reads (``max_length``, [CLS]/[SEP] included)."""
        return sum(len(ids) + 2 > self.max_length for ids in self.wordpiece_ids(texts))

    def text_inputs(
        self, texts: Sequence[str], batch_rows: int = 64
    ) -> list[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
        """Encoder batches for ``texts``: ``(rows, input_ids, attention_mask)`` with ``rows`` the positions in
        ``texts`` and the tensors ``(len(rows), width)``; every row of a batch has the same ``width``: its
        length (at most ``max_length``, see the module docstring) rounded up to a multiple of 16."""
        room = self.max_length - 2
        ids = [[self.cls_id, *row[:room], self.sep_id] for row in self.wordpiece_ids(texts)]
        lengths = np.array([len(row) for row in ids], dtype=np.int64)
        widths = np.minimum(-(-lengths // WIDTH_STEP) * WIDTH_STEP, self.max_length)
        batches = []
        for width in np.unique(widths):
            same = np.flatnonzero(widths == width)
            for start in range(0, len(same), batch_rows):
                rows = same[start : start + batch_rows]
                input_ids = np.full((len(rows), int(width)), self.pad_id, dtype=np.int64)
                for out, row in zip(input_ids, rows, strict=True):
                    out[: lengths[row]] = ids[row]
                mask = np.arange(int(width))[None, :] < lengths[rows, None]
                batches.append((rows, torch.from_numpy(input_ids), torch.from_numpy(mask.astype(np.int64))))
        return batches

    def embed_texts(self, texts: Sequence[str], batch_rows: int = 64) -> np.ndarray:
        """Texts -> unit-norm float32 ``(len(texts), dim)``, each re-tokenized by the embedder's tokenizer;
        texts of the same padded width are batched together, ``batch_rows`` at most."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for rows, input_ids, attention_mask in self.text_inputs(texts, batch_rows):
            vectors = self.forward(input_ids, attention_mask).float()
            out[rows] = torch.nn.functional.normalize(vectors, dim=-1).cpu().numpy()
        return out

    # ---- token input (retro-pytorch's way: the LM reads the embedder's vocabulary) ----

    def encoder_inputs(self, chunks: np.ndarray, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(batch, chunk_size)`` chunks -> ``input_ids, attention_mask`` of ``(batch, chunk_size + 2)``.

        Padding (``pad_id``) is removed wherever it is, real tokens keep their order, then the row is
        ``[CLS] tokens [SEP]`` followed by the encoder's pad token.
        """
        chunks = np.asarray(chunks)
        real = chunks != pad_id
        order = np.argsort(~real, axis=1, kind="stable")  # real tokens first, in order
        tokens = np.take_along_axis(chunks, order, axis=1)
        lengths = real.sum(1)
        width = chunks.shape[1] + 2
        positions = np.arange(width)[None, :]
        input_ids = np.full((len(chunks), width), self.pad_id, dtype=np.int64)
        input_ids[:, 1:-1] = tokens
        input_ids[:, 0] = self.cls_id
        input_ids[positions > lengths[:, None]] = self.pad_id
        input_ids[np.arange(len(chunks)), lengths + 1] = self.sep_id
        attention_mask = positions <= lengths[:, None] + 1
        return torch.from_numpy(input_ids), torch.from_numpy(attention_mask.astype(np.int64))

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pooled, unnormalised ``(batch, dim)`` vectors for encoder inputs ``(batch, seq)``."""
        hidden = self.encoder(input_ids, attention_mask)
        return pool(hidden, attention_mask.to(hidden.device), self.pooling)

    def embed_chunks(self, chunks: np.ndarray, pad_id: int = 0, batch_rows: int = 128) -> np.ndarray:
        """``(batch, chunk_size)`` token chunks -> unit-norm float32 ``(batch, dim)`` (cosine = dot), in
        batches of ``batch_rows``."""
        out = np.zeros((len(chunks), self.dim), dtype=np.float32)
        for start in range(0, len(chunks), batch_rows):
            inputs = self.encoder_inputs(chunks[start : start + batch_rows], pad_id)
            vectors = self.forward(*inputs).float()
            out[start : start + len(vectors)] = torch.nn.functional.normalize(vectors, dim=-1).cpu().numpy()
        return out


def chunk_texts(lm_tokenizer, chunks: np.ndarray, pad_id: int) -> list[str]:
    """``(batch, width)`` LM token chunks -> their texts (padding and special tokens dropped)."""
    rows = [row[row != pad_id].tolist() for row in np.asarray(chunks)]
    return lm_tokenizer.batch_decode(rows, skip_special_tokens=True)


def embed_token_chunks(
    embedder: Embedder, chunks: np.ndarray, pad_id: int, lm_tokenizer=None, batch_rows: int = 64
) -> np.ndarray:
    """``(batch, chunk_size)`` LM token chunks -> unit-norm ``(batch, dim)``: through their text when
    ``lm_tokenizer`` is given (text input), else from the ids themselves (token input)."""
    if lm_tokenizer is None:
        return embedder.embed_chunks(chunks, pad_id, batch_rows)
    return embedder.embed_texts(chunk_texts(lm_tokenizer, chunks, pad_id), batch_rows)


def embed_block(batch_size: int) -> int:
    """Rows embedded (and made durable) at a time by ``embed_rows``: ``BLOCK_BATCHES`` batches. Shards of
    the embed stage start at multiples of it, so a sharded build batches every chunk as a whole one does."""
    return batch_size * BLOCK_BATCHES


def embed_rows(
    embedder: Embedder,
    chunks: np.ndarray,
    out_path: Path,
    *,
    dtype: str = "float16",
    batch_size: int = 128,
    pad_id: int = 0,
    rows: tuple[int, int] | None = None,
    lm_tokenizer=None,
    progress: bool = True,
    desc: str = "embed",
) -> Path:
    """Embed ``chunks[lo:hi, :chunk_size]`` into the array file ``out_path`` ``(hi - lo, dim)``; resumable.

    ``lm_tokenizer``: decode the chunks and embed their text (see the module docstring); None: embed the
    ids. Rows are read in blocks of ``embed_block(batch_size)``, the fixed row ranges ``lo + j * block``;
    within a block, texts of the same padded width are batched together (``batch_size`` rows at most), so
    batches hold little padding. A resumed run recomputes exactly the blocks an uninterrupted run would,
    and writes the same bytes.
    """
    lo, hi = rows if rows is not None else (0, len(chunks))
    chunk_size = chunks.shape[1] - 1
    block = embed_block(batch_size)
    key = {
        "embedder": embedder.name,
        "backend": embedder.backend,
        "pooling": embedder.pooling,
        "dtype": dtype,
        "rows": [lo, hi],
        "batch_size": batch_size,
        "block": block,
        "input": "tokens" if lm_tokenizer is None else "text",
    }
    if is_complete(out_path):
        return Path(out_path)
    out = ResumableRows(out_path, hi - lo, (embedder.dim,), dtype, key)
    bar = tqdm(total=hi - lo, initial=out.rows_done, desc=desc, unit="chunk", disable=not progress)
    for start in range(out.rows_done, hi - lo, block):
        rows_ = np.asarray(chunks[lo + start : lo + min(start + block, hi - lo), :chunk_size])
        vectors = embed_token_chunks(embedder, rows_, pad_id, lm_tokenizer, batch_size)
        out.write(start, vectors.astype(dtype))
        bar.update(len(rows_))
    bar.close()
    out.finish()
    return Path(out_path)


def count_truncated_chunks(
    embedder: Embedder,
    lm_tokenizer,
    chunks: np.ndarray,
    pad_id: int,
    rows: tuple[int, int] | None = None,
    block: int = 4096,
) -> int:
    """How many chunks of ``chunks[lo:hi]`` have a text longer than the embedder reads (it keeps their
    first ``max_length - 2`` WordPiece tokens)."""
    lo, hi = rows if rows is not None else (0, len(chunks))
    c = chunks.shape[1] - 1
    return sum(
        embedder.count_truncated(
            chunk_texts(lm_tokenizer, np.asarray(chunks[start : min(start + block, hi), :c]), pad_id)
        )
        for start in range(lo, hi, block)
    )


def tokenize(texts: str | list[str], add_special_tokens: bool = True, tokenizer=None) -> torch.Tensor:
    """The seed's ``tokenize``: texts -> padded ``LongTensor (batch, seq)`` of ids (MiniLM's by default)."""
    if isinstance(texts, str):
        texts = [texts]
    tokenizer = tokenizer or load_tokenizer(DEFAULT_EMBEDDER)
    encoding = tokenizer(
        list(texts), add_special_tokens=add_special_tokens, padding=True, return_tensors="pt"
    )
    return encoding["input_ids"]


@torch.inference_mode()
def bert_embed(
    token_ids: torch.Tensor,
    mask: torch.Tensor | bool | None = None,
    return_cls_repr: bool = False,
    eps: float = 1e-8,
    pad_id: int = 0,
    embedder: Embedder | None = None,
) -> torch.Tensor:
    """The seed's ``bert_embed``: ``(batch, seq)`` ids (with [CLS]/[SEP]) -> ``(batch, dim)`` vectors.

    Masked mean over every attended token (how MiniLM was trained), or the [CLS] vector. Not normalised.
    ``mask`` defaults to ``token_ids != pad_id``; retro-pytorch's positional ``bert_embed(ids, True)`` still
    means ``return_cls_repr=True``.
    """
    if isinstance(mask, bool):
        mask, return_cls_repr = None, mask
    embedder = embedder or Embedder(DEFAULT_EMBEDDER)
    mask = (token_ids != pad_id) if mask is None else mask
    hidden = embedder.model(
        input_ids=token_ids.to(embedder.device), attention_mask=mask.long().to(embedder.device)
    ).last_hidden_state
    if return_cls_repr:
        return hidden[:, 0].detach()
    weights = mask.to(embedder.device).unsqueeze(-1).to(hidden.dtype)
    return ((hidden * weights).sum(1) / (weights.sum(1) + eps)).detach()
