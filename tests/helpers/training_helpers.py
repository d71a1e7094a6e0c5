"""Test support for the training tests: a small synthetic retrieval database on disk (and ``left_pad``,
which batches prompts of different lengths).

Its memmaps and manifest follow the real database's layout, so the real ``RETRODataset`` reads it; only
the database object is a stand-in (no embeddings or faiss index are needed to train).

The corpus is built so that retrieval can help: documents come in twins with identical tokens, and
each chunk's nearest neighbor is the same chunk of its twin, whose continuation is the next chunk of
the document itself. A model that learns to read its neighbors predicts those tokens almost exactly;
without retrieval it can only learn the token statistics.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from retlm.retrieval.format import FORMAT_VERSION

PAD, EOS = 0, 2
FIRST_WORD = 4  # ids below are special tokens (pad, unk, eos, ...)


def left_pad(prompts: list[torch.Tensor], pad_id: int = PAD) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, both ``(batch, longest)``, each prompt at the right end."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    return ids, mask


class ToyTokenizer:
    """One byte per ordinary token: token ``t`` decodes to the letter ``'a' + (t - FIRST_WORD) % 26``."""

    name_or_path = "toy-letters"

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __len__(self) -> int:
        return self.vocab_size

    def batch_decode(self, sequences, skip_special_tokens: bool = True) -> list[str]:
        return [
            "".join(chr(ord("a") + (t - FIRST_WORD) % 26) for t in seq if t >= FIRST_WORD)
            for seq in sequences
        ]


def write_twin_database(
    path: Path,
    *,
    n_pairs: int = 12,
    chunks_per_doc: int = 8,
    chunk_size: int = 8,
    seq_len: int = 32,
    vocab_size: int = 64,
    num_neighbors: int = 2,
    seed: int = 0,
) -> Path:
    """A database directory in the seed's layout (chunks, doc_ids, seqs, knn memmaps + manifest)."""
    rng = np.random.default_rng(seed)
    c = chunk_size
    docs = []
    for _ in range(n_pairs):
        weights = 1.0 / np.arange(1, vocab_size - FIRST_WORD + 1)  # Zipf: a learnable unigram signal
        tokens = rng.choice(
            np.arange(FIRST_WORD, vocab_size), size=chunks_per_doc * c - 1, p=weights / weights.sum()
        )
        doc = np.concatenate([tokens, [EOS]]).astype(np.int32)
        docs += [doc, doc.copy()]
    rows, doc_ids, seqs = [], [], []
    for d, doc in enumerate(docs):
        first = len(rows)
        padded = np.pad(doc, (0, -len(doc) % c), constant_values=PAD).reshape(-1, c)
        nxt = np.concatenate([padded[1:, 0], [PAD]])
        rows += list(np.concatenate([padded, nxt[:, None]], axis=1))
        doc_ids += [d] * len(padded)
        seqs += list(range(first, first + len(padded), seq_len // c))
    chunks = np.stack(rows).astype(np.int32)
    doc_ids = np.asarray(doc_ids, dtype=np.int32)
    per_doc = len(chunks) // len(docs)
    knn = np.full((len(chunks), num_neighbors), -1, dtype=np.int32)
    for i in range(len(chunks)):
        d = doc_ids[i]
        twin = d + 1 if d % 2 == 0 else d - 1
        knn[i, 0] = twin * per_doc + i % per_doc
        if num_neighbors > 1:
            others = np.flatnonzero((doc_ids != d) & (doc_ids != twin))
            knn[i, 1:] = rng.choice(others, size=num_neighbors - 1, replace=False)
    path.mkdir(parents=True, exist_ok=True)
    for name, array in (
        ("chunks", chunks),
        ("doc_ids", doc_ids),
        ("seqs", np.asarray(seqs, np.int32)),
        ("knn", knn),
    ):
        array.tofile(path / f"{name}.dat")
    manifest = {
        "format_version": FORMAT_VERSION,
        "tokenizer": {"name": ToyTokenizer.name_or_path, "vocab_size": vocab_size},
        "chunk_size": c,
        "num_neighbors": num_neighbors,
        "seq_len": seq_len,
        "pad_id": PAD,
        "eos_id": EOS,
        "num_chunks": len(chunks),
        "num_seqs": len(seqs),
        "num_docs": len(docs),
        "shapes": {
            "chunks": list(chunks.shape),
            "knn": list(knn.shape),
            "doc_ids": [len(doc_ids)],
            "seqs": [len(seqs)],
        },
    }
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def open_twin_database(path: Path) -> SimpleNamespace:
    """The stand-in for ``RetrievalDatabase.open``: the attributes training reads (the real
    ``RETRODataset.from_database`` reads the files through ``path``)."""
    m = json.loads((Path(path) / "manifest.json").read_text())

    def load(name: str) -> np.ndarray:
        return np.memmap(Path(path) / f"{name}.dat", dtype=np.int32, mode="r", shape=tuple(m["shapes"][name]))

    return SimpleNamespace(
        path=Path(path),
        manifest=m,
        chunks=load("chunks"),
        doc_ids=load("doc_ids"),
        seqs=load("seqs"),
        knn=load("knn"),
        chunk_size=m["chunk_size"],
        num_neighbors=m["num_neighbors"],
        seq_len=m["seq_len"],
        pad_id=m["pad_id"],
        eos_id=m["eos_id"],
        tokenizer=ToyTokenizer(m["tokenizer"]["vocab_size"]),
    )


def tiny_model_config(
    vocab_size: int = 64,
    chunk_size: int = 8,
    seq_len: int = 32,
    decoder: str = "retnet",
    dropout: float = 0.0,
) -> dict:
    return dict(
        num_tokens=vocab_size,
        max_seq_len=seq_len,
        chunk_size=chunk_size,
        enc_dim=32,
        enc_depth=1,
        dec_dim=32,
        dec_depth=2,
        dec_cross_attn_layers=[2],
        heads=2,
        dim_head=16,
        decoder=decoder,
        dec_attn_dropout=dropout,
        dec_ff_dropout=dropout,
        enc_ff_dropout=dropout,
    )


def tiny_bert_embedder(folder: Path, *, layers: int = 1, max_positions: int = 64) -> Path:
    """A randomly initialised small BERT (32 wide) with the bundled MiniLM tokenizer: a fast embedder."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import BertConfig, BertModel

    from retlm.retrieval.embedding import load_tokenizer

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=max_positions,
    )
    BertModel(config).save_pretrained(folder)
    load_tokenizer().save_pretrained(folder)
    return folder


def python_doc_texts(n_docs: int = 40, max_chars: int = 1200) -> list[str]:
    """Real English documents, offline: the first pydoc reference topics."""
    from retlm.demo.corpus import pydoc_topics

    return [text[:max_chars] for _, text in list(pydoc_topics())[:n_docs]]


def build_real_database(
    path: Path,
    embedder: Path,
    *,
    chunk_size: int = 8,
    seq_len: int = 32,
    n_docs: int = 40,
    tokenizer: str = "gpt2",
):
    """A real ``RetrievalDatabase`` (GPT-2 or the seed's WordPiece LM tokenizer, tiny random embedder with
    MiniLM's tokenizer, exact index)."""
    from retlm.retrieval import RetrievalDatabase

    return RetrievalDatabase.build(
        python_doc_texts(n_docs),
        path,
        chunk_size=chunk_size,
        seq_len=seq_len,
        num_neighbors=2,
        tokenizer=tokenizer,
        embedder=str(embedder),
        batch_size=64,
        progress=False,
    )
