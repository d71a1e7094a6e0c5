"""In-Context RALM for any causal LM: generation (`generate_in_context`) and evaluation
(`evaluate_in_context`), on a real database (GPT-2 chunks of 8 tokens, tiny random embedder) and tiny random
causal LMs (GPT-2, whose absolute positions expose a wrong `position_ids`, and Llama) with their own small
byte-level BPE, trained here: the LM's tokenizer is not the database's, as with a pretrained LM."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from robust_helpers import cli
from tiny_models import tiny_causal_lm
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from training_helpers import build_real_database, python_doc_texts, tiny_bert_embedder
from transformers import PreTrainedTokenizerFast, TextIteratorStreamer
from transformers.generation.streamers import BaseStreamer

from retlm.generation import generate_in_context, search_neighbors
from retlm.generation.in_context import neighbor_block
from retlm.training import in_context as ic
from retlm.training.in_context_scoring import VARIANTS, InContextPlan, plan_jobs, score_plan

MAX_LENGTH = 128


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    root = tmp_path_factory.mktemp("in-context")
    return build_real_database(root / "db", tiny_bert_embedder(root / "embedder"), n_docs=20)


def tiny_lm(kind: str, vocab: int, positions: int = MAX_LENGTH) -> torch.nn.Module:
    return tiny_causal_lm(kind, vocab, positions=positions).double().eval()


@pytest.fixture(scope="module")
def lm_tokenizer():
    """A byte-level BPE of 400 tokens trained on the same documents (lossless, like SmolLM2's)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>"], initial_alphabet=alphabet)
    bpe.train_from_iterator(python_doc_texts(20), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>")


@pytest.fixture(scope="module")
def gpt2(lm_tokenizer):
    return tiny_lm("gpt2", len(lm_tokenizer))


def make_plan(
    db, tokenizer, *, context=48, stride=8, max_length=MAX_LENGTH, max_overlap=None
) -> InContextPlan:
    docs = ic.split_documents(db, "heldout", 0.9, 0)
    windows = ic.make_windows(tokenizer, ic.document_texts(db, docs), docs, context, max_tokens=300)
    plan = InContextPlan(windows, ic.make_segments(windows, stride, 32, tokenizer), stride, max_length)
    ic.attach_neighbors(plan, db, tokenizer, 2, max_overlap)
    return plan


def neighbor_text(db, chunk_id: int) -> str:
    """A neighbor as RETRO reads it: the chunk and its continuation, decoded by the database's tokenizer."""
    tokens = db.retrieved_tokens(np.array([chunk_id]))[0]
    return db.tokenizer.decode(tokens[tokens != db.pad_id].tolist(), skip_special_tokens=True)


def record_inputs(model):
    """Every forward call's ``input_ids`` (with the rows' real tokens only, left padding dropped)."""
    seen = []

    def hook(module, args, kwargs):
        ids, mask = kwargs["input_ids"], kwargs.get("attention_mask")
        rows = [
            row if mask is None else row[m.bool()]
            for row, m in zip(ids, mask if mask is not None else ids, strict=True)
        ]
        seen.append([row.tolist() for row in rows])

    return seen, model.register_forward_pre_hook(hook, with_kwargs=True)


# ---- generation ----


@pytest.mark.heavy
def test_generation_prepends_exactly_the_neighbors_text(db, gpt2, lm_tokenizer):
    seen, handle = record_inputs(gpt2)
    try:
        out = generate_in_context(gpt2, lm_tokenizer, db, "The for statement", max_new_tokens=12, stride=5)
    finally:
        handle.remove()
    rereads = [call[0] for call in seen if len(call[0]) > 1]
    assert len(rereads) == len(out.retrievals) == 3  # at the prompt's end, after 5 and after 10 tokens
    for step, ids in zip(out.retrievals, rereads, strict=True):
        assert step.neighbors, "the database returned neighbors"
        block = neighbor_block([n.text for n in step.neighbors])
        assert lm_tokenizer.decode(ids[: step.neighbor_tokens]) == block
        assert [n.text for n in step.neighbors] == [neighbor_text(db, n.chunk_id) for n in step.neighbors]
        assert all(n.doc_name == db.doc_name(n.doc_id) for n in step.neighbors)
        assert len(ids) == step.context_tokens


@pytest.mark.heavy
def test_generation_rereads_only_at_retrievals_and_decodes_from_the_cache(db, gpt2, lm_tokenizer):
    seen, handle = record_inputs(gpt2)
    calls = []
    try:
        out = generate_in_context(
            gpt2,
            lm_tokenizer,
            db,
            "Assignment statements",
            max_new_tokens=11,
            stride=4,
            on_retrieval=calls.append,
        )
    finally:
        handle.remove()
    lengths = [len(call[0]) for call in seen]
    contexts = iter(step.context_tokens for step in out.retrievals)
    # a retrieval before new tokens 0, 4 and 8: a full re-read; every other token: one token from the cache
    assert lengths == [next(contexts) if i % 4 == 0 else 1 for i in range(11)]
    assert calls == out.retrievals and [s.position for s in calls] == [0, 4, 8]
    # the cached decoding computes what a full forward pass over the same context computes
    prompt_ids = lm_tokenizer("Assignment statements", add_special_tokens=False)["input_ids"]
    ids = prompt_ids + out.token_ids
    for i, token in enumerate(out.token_ids):
        step = out.retrievals[i // 4]
        context = seen[4 * (i // 4)][0] + ids[len(prompt_ids) + 4 * (i // 4) : len(prompt_ids) + i]
        logits = gpt2(input_ids=torch.tensor([context])).logits[0, -1]
        assert int(logits.argmax()) == token, (i, step.position)


def test_streamer_receives_the_tokens_of_the_result(db, gpt2, lm_tokenizer):
    class Recorder(BaseStreamer):
        def __init__(self):
            self.puts, self.ended = [], 0

        def put(self, value):
            self.puts.append(value.tolist())

        def end(self):
            self.ended += 1

    recorder = Recorder()
    out = generate_in_context(
        gpt2,
        lm_tokenizer,
        db,
        "Classes",
        max_new_tokens=9,
        stride=4,
        streamer=recorder,
        do_sample=True,
        seed=3,
    )
    prompt = lm_tokenizer("Classes", add_special_tokens=False)["input_ids"]
    assert recorder.puts[0] == [prompt] and recorder.ended == 1
    assert [p[0] for p in recorder.puts[1:]] == out.token_ids and len(out.token_ids) == 9
    text = TextIteratorStreamer(lm_tokenizer, skip_prompt=True)
    again = generate_in_context(
        gpt2, lm_tokenizer, db, "Classes", max_new_tokens=9, stride=4, streamer=text, do_sample=True, seed=3
    )
    assert again.token_ids == out.token_ids  # the seed makes sampling reproducible
    assert "".join(text) == out.continuation and out.text == "Classes" + out.continuation


def test_generation_never_retrieves_the_excluded_document(db, gpt2, lm_tokenizer):
    doc = 3
    prompt = ic.document_texts(db, [doc])[0][:200]
    free = generate_in_context(gpt2, lm_tokenizer, db, prompt, max_new_tokens=6, stride=3)
    assert any(n.doc_id == doc for s in free.retrievals for n in s.neighbors), "the test can see a leak"
    out = generate_in_context(gpt2, lm_tokenizer, db, prompt, max_new_tokens=6, stride=3, exclude_doc_id=doc)
    assert out.retrievals and all(n.doc_id != doc for s in out.retrievals for n in s.neighbors)


# ---- evaluation ----


@pytest.mark.heavy
def test_evaluation_prepends_exactly_the_neighbors_text(db, gpt2, lm_tokenizer):
    tokenizer = lm_tokenizer
    plan = make_plan(db, tokenizer)
    seen, handle = record_inputs(gpt2)
    try:
        score_plan(gpt2, plan, batch_size=4)
    finally:
        handle.remove()
    rows = {tuple(row) for call in seen for row in call}
    checked = 0
    for segment in plan.segments:
        window = plan.windows[segment.window].tokens
        for variant, neighbors in (
            ("with_retrieval", segment.neighbors),
            ("unrelated_neighbors", segment.unrelated),
        ):
            block = segment.blocks.get(variant, [])
            assert tokenizer.decode(block) == neighbor_block([n.text for n in neighbors])
            assert [n.text for n in neighbors] == [neighbor_text(db, n.chunk_id) for n in neighbors]
            if block:  # the model read block + the window from its start, up to the stride's end or beyond
                assert any(reads(row, block, window, segment.end) for row in rows)
                checked += 1
    assert checked > 20


def reads(row: tuple[int, ...], block: list[int], window: np.ndarray, end: int) -> bool:
    """Whether input ``row`` is ``block`` then the window's first ``end`` tokens or more."""
    rest = row[len(block) :]
    return row[: len(block)] == tuple(block) and rest == tuple(window[: len(rest)]) and len(rest) >= end


def test_the_evaluated_document_is_never_retrieved(db):
    plan = make_plan(db, db.tokenizer)
    own = [plan.windows[s.window].doc_id for s in plan.segments if s.query is not None]
    queries = [s.query for s in plan.segments if s.query is not None]
    leaked = search_neighbors(db, queries, 2)  # without the exclusion, a document finds its own chunks
    assert sum(n.doc_id == d for found, d in zip(leaked, own, strict=True) for n in found) > len(own) // 2
    asked = [s for s in plan.segments if s.query is not None]
    assert all(s.neighbors for s in asked)
    for segment, doc in zip(asked, own, strict=True):
        assert all(n.doc_id != doc for n in segment.neighbors + segment.unrelated)
        assert segment.unrelated and {n.chunk_id for n in segment.unrelated} != {
            n.chunk_id for n in segment.neighbors
        }


@pytest.mark.parametrize(  # 72: block + prefix is cut at the left; GPT-2's absolute positions catch a shift
    "kind, max_length", [("gpt2", MAX_LENGTH), ("gpt2", 72), ("llama", 72)]
)
@pytest.mark.heavy
def test_the_fast_path_equals_the_naive_loop(db, kind, max_length, lm_tokenizer):
    model = tiny_lm(kind, len(lm_tokenizer))
    plan = make_plan(db, lm_tokenizer, max_length=max_length)
    # two strides of one window with the same neighbors share one pass: make some (the search rarely does)
    for previous, segment in zip(plan.segments, plan.segments[1:], strict=False):
        if segment.window == previous.window and previous.query is not None and segment.end % 24 == 0:
            segment.blocks = dict(previous.blocks)
    fast, fast_read = score_plan(model, plan, fast=True, batch_size=5)
    naive, naive_read = score_plan(model, plan, fast=False)
    for variant in VARIANTS:
        for a, b in zip(fast[variant], naive[variant], strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    assert sum(fast_read.values()) < sum(naive_read.values())
    if max_length == MAX_LENGTH:
        assert len(plan_jobs(plan, fast=True)) < len(plan.windows) + 2 * sum(
            s.query is not None for s in plan.segments
        )


def test_retrieval_off_equals_plain_scoring_of_the_windows(db, gpt2, lm_tokenizer):
    report = ic.evaluate_in_context(
        gpt2, lm_tokenizer, db, stride=8, context=40, progress=False, max_length=MAX_LENGTH
    )
    docs = ic.split_documents(db, "heldout", 0.9, 0)
    windows = ic.make_windows(lm_tokenizer, ic.document_texts(db, docs), docs, 40)
    nll, tokens, n_bytes = 0.0, 0, 0
    for window in windows:  # one plain forward pass per window, no padding, no retrieval
        ids = torch.tensor(window.tokens)
        logits = gpt2(input_ids=ids[None]).logits[0]
        nll += float(F.cross_entropy(logits[:-1].detach(), ids[1:], reduction="sum"))
        tokens += len(ids) - 1
        n_bytes += len(lm_tokenizer.decode(window.tokens[1:].tolist()).encode())
    plain = report["without_retrieval"]
    assert plain["tokens"] == tokens and plain["bytes"] == n_bytes
    assert plain["loss"] == pytest.approx(nll / tokens, abs=1e-5)
    assert plain["bits_per_byte"] == pytest.approx(nll / math.log(2) / n_bytes, abs=1e-5)


def test_report_keys_and_max_tokens(db, gpt2, lm_tokenizer):
    report = ic.evaluate_in_context(
        gpt2, lm_tokenizer, db, stride=8, context=48, max_tokens=150, progress=False, max_overlap=0.0
    )
    for variant in VARIANTS:
        assert set(report[variant]) >= {"bits_per_byte", "loss", "tokens", "bytes"}
        assert report[variant]["tokens"] == 150
    assert {"without_retrieval", "with_retrieval", "unrelated_neighbors", "buckets", "differences"} <= set(
        report
    )
    for d in report["differences"].values():
        assert d["low"] <= d["bits_per_byte"] <= d["high"]
    buckets = report["buckets"]
    assert [b["bucket"] for b in buckets] == ["0-12.5%", "12.5-25%", "25-50%", "50-100%", "no retrieval"]
    assert sum(b["tokens"] for b in buckets) == 150
    # max_overlap 0 drops every neighbor that shares a token span with its stride: what is left overlaps 0%
    assert report["dropped_neighbors"] > 0 and report["neighbors"] > 0
    assert [b["strides"] for b in buckets[1:4]] == [0, 0, 0] and buckets[0]["strides"] > 0
    assert report["settings"]["overlap_on"] == "LM tokens" and report["cost"]["lm_tokens"]


# ---- the command line ----


@pytest.fixture(scope="module")
def lm_dir(db, tmp_path_factory, lm_tokenizer):
    folder = tmp_path_factory.mktemp("lm")
    tiny_lm("gpt2", len(lm_tokenizer)).float().save_pretrained(folder)
    lm_tokenizer.save_pretrained(folder)
    return folder


def test_eval_command_in_context(db, lm_dir, tmp_path):
    out = tmp_path / "report.json"
    args = ["eval", lm_dir, "--db", db.path, "--in-context", "--stride", "8", "--context", "48"]
    result = cli(*args, "--max-tokens", "120", "--output", out, "--no-progress")
    assert result.code == 0, result.err
    for row in ("without retrieval", "with retrieval", "unrelated neighbors", "no retrieval", "95% interval"):
        assert row in result.out
    assert json.loads(out.read_text())["with_retrieval"]["tokens"] == 120
    printed = cli(*args, "--max-tokens", "60", "--json", "--no-progress")
    assert json.loads(printed.out)["unrelated_neighbors"]["tokens"] == 60


def test_generate_command_in_context_prints_its_sources(db, lm_dir):
    result = cli(
        "generate", lm_dir, "The while statement", "--db", db.path, "--in-context", "--max-new-tokens", "6"
    )
    assert result.code == 0, result.err
    assert result.out.startswith("The while statement") and "sources read:" in result.out
    assert "end of the prompt: doc-" in result.out and "(score " in result.out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "MODEL", "--stride", "8"], "--stride applies to --in-context retrieval only"),
        (["eval", "MODEL", "--in-context", "--stride", "0"], "--stride must be a positive integer"),
        (["eval", "MODEL", "--in-context", "--max-sequences", "3"], "--max-sequences applies to RETRO"),
        (["eval", "nowhere", "--in-context"], "nowhere"),
        (["generate", "MODEL", "hi", "--query-tokens", "4"], "--query-tokens applies to --in-context"),
    ],
)
def test_in_context_usage_errors(db, lm_dir, argv, message):
    argv = [str(lm_dir) if a == "MODEL" else a for a in argv]
    result = cli(*argv, "--db", db.path)
    assert result.code == 2 and message in result.err and "Traceback" not in result.err
