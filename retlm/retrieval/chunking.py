"""Documents -> fixed-size token chunks, streamed to int32 memmaps.

Layout (retro-pytorch's, see docs/retrieval.md):
- ``chunks``  int32 ``(num_chunks, chunk_size + 1)``: each document's tokens followed by its end-of-document
  token, cut into rows of ``chunk_size``; the last row of a document is padded with ``pad_id``. The extra
  column holds the first token of the next chunk of the same document (``pad_id`` if none), so a training
  sequence's labels need no second lookup.
- ``doc_ids`` int32 ``(num_chunks,)``: the document of each chunk, numbered from 0 in reading order.
- ``seqs``    int32 ``(num_seqs,)``: the first chunk of each training sequence, one every
  ``seq_len // chunk_size`` chunks within each document.

- ``doc_names.jsonl``: one JSON string per line, the name of each document (its path relative to the source
  folder, its record's id or place, or ``doc-<i>`` for the i-th string of a list; see
  ``retlm.retrieval.sources``), so that neighbors can be shown with their source.

Nothing holds a whole document, let alone the corpus, in memory: files are read in bounded pieces, and each
piece is tokenized on its own. A piece ends just before a whitespace character that follows a non-whitespace
one. Every pre-tokenizer used here splits there: BERT's splits at whitespace, and in GPT-2's byte-level
regex no pre-token holds a non-space character followed by a space (a space only ever starts a token). So
the tokens are the same as for the whole document at once.
"""

from __future__ import annotations

import codecs
import json
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

PIECE_CHARS = 1 << 20  # characters tokenized at once; bounds memory for any line length
_READ_BYTES = 1 << 20


class EmptySourceError(ValueError):
    """The source holds no readable document (empty folder, no file matching the glob)."""


@dataclass
class Document:
    """One document as a stream of text pieces: ``name`` for messages, ``pieces()`` yields ``str``."""

    name: str
    path: Path | None = None
    text: str | None = None

    def pieces(self, piece_chars: int = PIECE_CHARS) -> Iterator[str]:
        if self.path is not None:
            yield from _whitespace_pieces(read_text_blocks(self.path), piece_chars)
        else:
            yield from _whitespace_pieces(iter([self.text or ""]), piece_chars)


@dataclass
class SkipReport:
    """What reading a source skipped: files that could not be read as UTF-8 text, empty documents, and
    malformed records (``skip_bad_records``; the first messages are kept in ``bad_examples``)."""

    unreadable: list[str] = field(default_factory=list)
    empty: int = 0
    bad_records: int = 0
    bad_examples: list[str] = field(default_factory=list)

    def recorded(self) -> dict[str, Any]:
        """The report as chunking.json (and a Ray chunk shard) records it."""
        return {
            "skipped_files": self.unreadable,
            "skipped_empty_docs": self.empty,
            "bad_records": self.bad_records,
            "bad_record_examples": self.bad_examples[:3],
        }

    @classmethod
    def from_record(cls, info: dict[str, Any]) -> SkipReport:
        """The report that ``recorded`` wrote into ``info``."""
        return cls(
            list(info.get("skipped_files", [])),
            int(info.get("skipped_empty_docs", 0)),
            int(info.get("bad_records", 0)),
            list(info.get("bad_record_examples", []))[:3],
        )

    def warn(self) -> None:
        if self.unreadable:
            shown = ", ".join(self.unreadable[:5]) + (" ..." if len(self.unreadable) > 5 else "")
            warnings.warn(
                f"skipped {len(self.unreadable)} non-UTF-8 or binary file(s): {shown}", stacklevel=3
            )
        if self.bad_records:
            first = self.bad_examples[0] if self.bad_examples else ""
            warnings.warn(f"skipped {self.bad_records} bad record(s); the first: {first}", stacklevel=3)


def read_text_blocks(path: Path) -> Iterator[str]:
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    with open(path, "rb") as f:
        while block := f.read(_READ_BYTES):
            yield decoder.decode(block)
        yield decoder.decode(b"", final=True)


def is_utf8_text(path: Path) -> bool:
    """True if the file decodes as UTF-8 and holds no NUL byte (a cheap binary-file test). Streams."""
    try:
        return all("\x00" not in block for block in read_text_blocks(path))
    except (UnicodeDecodeError, OSError):
        return False


def _whitespace_pieces(blocks: Iterator[str], piece_chars: int) -> Iterator[str]:
    """Re-cut a stream of text into pieces of at most ``piece_chars`` that end before whitespace.

    Each cut falls just before a space or newline that follows a non-whitespace character (a token boundary
    for every pre-tokenizer, see the module docstring). A stretch of ``piece_chars`` with no such place is
    cut anyway (a single "word" of a megabyte is not text; it only must not exhaust memory).
    """
    carry = ""
    for block in blocks:
        text, start = carry + block, 0
        while len(text) - start >= piece_chars:
            end = start + piece_chars
            cut = _cut_point(text, start, end)
            yield text[start:cut]
            start = cut
        carry = text[start:]
    if carry:
        yield carry


_NOT_WHITE_SPACE = "\x1c\x1d\x1e\x1f"  # str.isspace() says yes, Unicode's White_Space (regex \s) says no


def _is_white_space(char: str) -> bool:
    return char.isspace() and char not in _NOT_WHITE_SPACE


def _cut_point(text: str, start: int, end: int) -> int:
    """The last index in ``(start, end)`` where whitespace follows a non-whitespace character, or ``end``."""
    cut = max(text.rfind(" ", start + 1, end), text.rfind("\n", start + 1, end))
    while cut > start and _is_white_space(text[cut - 1]):
        cut -= 1
    return cut if cut > start else end


def document_token_ids(
    doc: Document, tokenizer, eos_id: int, piece_chars: int = PIECE_CHARS
) -> Iterator[np.ndarray]:
    """Token ids of one document, piece by piece, ending with ``eos_id``; nothing if it has no token.

    Text that spells a special token (``<|endoftext|>``, ``[SEP]``) is tokenized as text: only the
    ``eos_id`` appended here ends a document.
    """
    any_tokens = False
    for piece in doc.pieces(piece_chars):
        ids = tokenizer(
            piece,
            add_special_tokens=False,
            return_attention_mask=False,
            return_token_type_ids=False,
            split_special_tokens=True,
            verbose=False,
        )["input_ids"]
        if ids:
            any_tokens = True
            yield np.asarray(ids, dtype=np.int32)
    if any_tokens:
        yield np.asarray([eos_id], dtype=np.int32)


def chunk_document(token_pieces: Iterable[np.ndarray], chunk_size: int, pad_id: int) -> Iterator[np.ndarray]:
    """Rows ``(n, chunk_size + 1)`` of one document, emitted as soon as they are complete."""
    pending = np.empty(0, dtype=np.int32)
    for ids in token_pieces:
        pending = np.concatenate([pending, ids])
        # Keep one token past the last full row back: it is that row's continuation column.
        full = (len(pending) - 1) // chunk_size
        if full > 0:
            body = pending[: full * chunk_size].reshape(full, chunk_size)
            nxt = pending[chunk_size : full * chunk_size + 1 : chunk_size]
            yield np.concatenate([body, nxt[:, None]], axis=1)
            pending = pending[full * chunk_size :]
    if len(pending):
        row = np.full((1, chunk_size + 1), pad_id, dtype=np.int32)
        row[0, : len(pending)] = pending
        yield row


def sequence_starts(first_chunk: int, num_chunks: int, chunks_per_seq: int) -> np.ndarray:
    """Start chunk of each training sequence of a document that owns chunks ``first_chunk ...``."""
    return np.arange(first_chunk, first_chunk + num_chunks, chunks_per_seq, dtype=np.int32)


@dataclass
class ChunkCounts:
    num_chunks: int = 0
    num_docs: int = 0
    num_seqs: int = 0


def write_chunks(
    docs: Iterable[Document],
    tokenizer,
    *,
    chunk_size: int,
    seq_len: int,
    pad_id: int,
    eos_id: int,
    chunks_file,
    doc_ids_file,
    seqs_file,
    names_file=None,
    first_doc_id: int = 0,
    first_chunk: int = 0,
    report: SkipReport | None = None,
    progress=None,
) -> ChunkCounts:
    """Tokenize and chunk ``docs``, appending raw int32 rows to three open binary files (and, with
    ``names_file``, an open text file, each document's name as one JSON line).

    ``first_doc_id`` / ``first_chunk`` number the new documents and chunks after existing ones
    (``add()``). Empty documents are skipped and counted in ``report``.
    """
    counts = ChunkCounts()
    chunks_per_seq = seq_len // chunk_size
    for doc in docs:
        doc_chunks = 0
        for rows in chunk_document(document_token_ids(doc, tokenizer, eos_id), chunk_size, pad_id):
            chunks_file.write(rows.astype("<i4").tobytes())
            doc_chunks += len(rows)
        if doc_chunks == 0:
            if report is not None:
                report.empty += 1
            continue
        doc_id = first_doc_id + counts.num_docs
        start = first_chunk + counts.num_chunks
        doc_ids_file.write(np.full(doc_chunks, doc_id, dtype="<i4").tobytes())
        seqs = sequence_starts(start, doc_chunks, chunks_per_seq)
        seqs_file.write(seqs.astype("<i4").tobytes())
        if names_file is not None:
            names_file.write(json.dumps(doc.name, ensure_ascii=False) + "\n")
        counts.num_chunks += doc_chunks
        counts.num_docs += 1
        counts.num_seqs += len(seqs)
        if progress is not None:
            progress.update(doc_chunks)
    return counts


def chunk_mask(chunks: np.ndarray, pad_id: int = 0) -> np.ndarray:
    """``True`` where a chunk row holds a real token, ``False`` on padding. Any shape."""
    return np.asarray(chunks) != pad_id
