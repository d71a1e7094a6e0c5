"""Chunking: layout against a naive re-implementation, round trips, streaming, bad input."""

import io
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retlm.demo.corpus import pydoc_topics
from retlm.retrieval.chunking import (
    Document,
    EmptySourceError,
    SkipReport,
    chunk_document,
    chunk_mask,
    document_token_ids,
    write_chunks,
)
from retlm.retrieval.embedding import load_tokenizer
from retlm.retrieval.sources import SourceError, iter_documents

os.environ.setdefault("HF_HUB_OFFLINE", "1")
PAD, SEP = 0, 102


def naive_rows(tokens: list[int], c: int) -> np.ndarray:
    """The seed's layout, written the obvious way: rows of c, padded, plus the next row's first token."""
    n = -(-len(tokens) // c)
    padded = tokens + [PAD] * (n * c - len(tokens))
    rows = [padded[i * c : (i + 1) * c] + [padded[(i + 1) * c] if i + 1 < n else PAD] for i in range(n)]
    return np.array(rows, dtype=np.int32)


@settings(deadline=None, max_examples=60)
@given(
    tokens=st.lists(st.integers(1, 30000), min_size=1, max_size=200),
    c=st.integers(1, 17),
    cuts=st.lists(st.integers(0, 200), max_size=6),
)
def test_chunk_layout_matches_naive_for_any_piece_split(tokens, c, cuts):
    bounds = sorted({0, len(tokens), *(x % (len(tokens) + 1) for x in cuts)})
    pieces = [np.array(tokens[a:b], dtype=np.int32) for a, b in zip(bounds, bounds[1:], strict=False)]
    got = np.concatenate(list(chunk_document(pieces, c, PAD)))
    np.testing.assert_array_equal(got, naive_rows(tokens, c))


def build_in_memory(docs, c=16, seq_len=64):
    tokenizer = load_tokenizer()
    files = [io.BytesIO() for _ in range(3)]
    report = SkipReport()
    counts = write_chunks(
        iter_documents(docs, report=report),
        tokenizer,
        chunk_size=c,
        seq_len=seq_len,
        pad_id=PAD,
        eos_id=SEP,
        chunks_file=files[0],
        doc_ids_file=files[1],
        seqs_file=files[2],
        report=report,
    )
    chunks, doc_ids, seqs = (np.frombuffer(f.getvalue(), dtype="<i4") for f in files)
    return counts, chunks.reshape(-1, c + 1), doc_ids, seqs, report


def test_round_trip_reassembles_documents():
    tokenizer = load_tokenizer()
    docs = [text for _, text in list(pydoc_topics())[:5]]
    counts, chunks, doc_ids, seqs, _ = build_in_memory(docs)
    assert counts.num_docs == 5 and counts.num_chunks == len(chunks) == len(doc_ids)
    for d, text in enumerate(docs):
        rows = chunks[doc_ids == d]
        tokens = rows[:, :-1][chunk_mask(rows[:, :-1])]
        expected = tokenizer(text, add_special_tokens=False)["input_ids"] + [SEP]
        np.testing.assert_array_equal(tokens, expected)
        decoded = tokenizer.decode(tokens[:-1].tolist())
        assert decoded == tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"])
        # continuation column = next row's first token, pad after the document's last row
        np.testing.assert_array_equal(rows[:-1, -1], rows[1:, 0])
        assert rows[-1, -1] == PAD
    # one sequence start every seq_len // chunk_size = 4 chunks within each document
    starts = np.flatnonzero(np.r_[True, doc_ids[1:] != doc_ids[:-1]])
    ends = np.r_[starts[1:], len(doc_ids)]
    expected_seqs = np.concatenate([np.arange(a, b, 4) for a, b in zip(starts, ends, strict=True)])
    np.testing.assert_array_equal(seqs, expected_seqs)


def test_enormous_line_streams_with_identical_tokens(tmp_path):
    tokenizer = load_tokenizer()
    words = " ".join(f"word{i % 97} alpha-{i % 13}" for i in range(3000))  # one line, ~40k chars
    path = tmp_path / "big.txt"
    path.write_text(words)
    streamed = np.concatenate(
        list(document_token_ids(Document("big", path=path), tokenizer, SEP, piece_chars=1000))
    )
    whole = tokenizer(words, add_special_tokens=False)["input_ids"] + [SEP]
    np.testing.assert_array_equal(streamed, whole)
    pieces = list(Document("big", path=path).pieces(1000))
    assert max(map(len, pieces)) <= 1000 and "".join(pieces) == words
    # a run without whitespace is cut anyway, so no piece exceeds the bound
    assert max(map(len, Document("x", text="a" * 5000).pieces(1000))) == 1000


def test_empty_folder_and_no_match_fail_before_work(tmp_path):
    with pytest.raises(EmptySourceError, match="matches the glob"):
        iter_documents(tmp_path)
    (tmp_path / "a.md").write_text("hello")
    with pytest.raises(EmptySourceError, match=r"\*\*/\*\.txt"):
        iter_documents(tmp_path)
    with pytest.raises(SourceError, match="no such file or folder"):
        iter_documents(tmp_path / "missing")


def test_binary_non_utf8_and_empty_documents_are_skipped(tmp_path):
    (tmp_path / "good.txt").write_text("a good document about cats")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (tmp_path / "binary.txt").write_bytes(b"\x00\x01\x02binary")
    (tmp_path / "empty.txt").write_text("   \n")
    report = SkipReport()
    docs = list(iter_documents(tmp_path, report=report))
    assert sorted(d.name for d in docs) == ["empty.txt", "good.txt"]  # relative to the folder
    assert sorted(report.unreadable) == [str(tmp_path / "binary.txt"), str(tmp_path / "latin1.txt")]
    with pytest.warns(UserWarning, match="latin1.txt"):
        report.warn()
    counts, chunks, *_ = build_in_memory(tmp_path)
    assert counts.num_docs == 1 and len(chunks) == 1


def test_empty_strings_are_skipped():
    counts, chunks, doc_ids, _, report = build_in_memory(["", "real text here", "  "])
    assert counts.num_docs == 1 and report.empty == 2 and set(doc_ids) == {0}
