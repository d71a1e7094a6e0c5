"""RETRO on a left-padded batch: prompts of different lengths in one batch, each row computed as if alone.

A RETRO chunk is counted from a row's first real token, so a left-padded row's chunk boundaries, its
neighbors (``retrieved[i, u]`` = row i's u-th chunk) and the causality of chunked cross-attention are
those of the same prompt unpadded. A model that cut chunks at the batch's columns would read other
neighbors, at other tokens, in every padded row whose padding is not a whole number of chunks (the
lengths below are chosen so that none is).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import CallLog, FakeDatabase, assert_incremental, tiny_retro, tiny_retro_config
from training_helpers import build_real_database, left_pad, tiny_bert_embedder

from retlm import RETRO
from retlm.models.retrieval_generation import generate_with_retrieval

C = 4
VOCAB = 64
LENGTHS = [13, 6, 9, 3]  # paddings 0, 7, 4, 10: none a multiple of C except 0 and 4
ATOL = 1e-5  # float32; the padded rows differ from the rows alone by rounding only (seen: < 1e-6)


def random_prompts(lengths: list[int], vocab: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=g) for n in lengths]


@pytest.mark.parametrize(
    "decoder, extra",
    [
        ("transformer", {}),
        ("transformer", {"absolute_position_embedding": True}),
        ("retnet", {}),
        ("retnet", {"retention_mode": "chunkwise", "retention_block_size": 3}),
    ],
)
def test_padded_forward_equals_each_row_alone(decoder: str, extra: dict) -> None:
    model = tiny_retro(decoder, **extra)
    prompts = random_prompts(LENGTHS, VOCAB)
    g = torch.Generator().manual_seed(2)
    own = [torch.randint(1, VOCAB, (len(p) // C, 2, 2 * C), generator=g) for p in prompts]
    ids, mask = left_pad(prompts)
    # retrieved[i, u]: row i's u-th chunk; the shorter rows' extra entries are ignored (-1 here)
    retrieved = torch.full((len(prompts), max(len(r) for r in own), 2, 2 * C), -1)
    for i, r in enumerate(own):
        retrieved[i, : len(r)] = r
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask, retrieved=retrieved).logits
        for i, (p, r) in enumerate(zip(prompts, own, strict=True)):
            alone = model(input_ids=p[None], retrieved=r[None] if len(r) else None).logits[0]
            torch.testing.assert_close(padded[i, ids.shape[1] - len(p) :], alone, rtol=0, atol=ATOL)


@pytest.mark.parametrize("decoder", ["transformer", "retnet"])
def test_padded_prompt_then_token_by_token_equals_full_forward(decoder: str) -> None:
    """The incremental API on a left-padded cache: each call gets the neighbors of the chunks its rows
    complete (a row completing none ignores its entry); the logits equal one full forward per row."""
    model = tiny_retro(decoder)
    full = random_prompts([20, 14, 17], VOCAB, seed=3)
    g = torch.Generator().manual_seed(4)
    own = [torch.randint(1, VOCAB, (len(p) // C, 2, 2 * C), generator=g) for p in full]
    # the prompts: each row's first len - 12 tokens (8, 2, 5: paddings 0, 6, 3); then 12 one-token calls
    prompts = [p[: len(p) - 12] for p in full]
    ids, mask = left_pad(prompts)
    pad = [ids.shape[1] - len(p) for p in prompts]

    def neighbors(row_chunks: list[range]) -> torch.Tensor | None:
        width = max(len(u) for u in row_chunks)
        if width == 0:
            return None
        out = torch.full((len(full), width, 2, 2 * C), -1)
        for i, us in enumerate(row_chunks):
            for j, u in enumerate(us):
                out[i, j] = own[i][u]
        return out

    with torch.no_grad():
        first = model(
            input_ids=ids,
            attention_mask=mask,
            retrieved=neighbors([range(len(p) // C) for p in prompts]),
            use_cache=True,
        )
        cache, steps = first.past_key_values, [first.logits]
        for t in range(12):
            positions = [len(p) + t for p in prompts]
            r = neighbors([range(n // C, (n + 1) // C) for n in positions])
            column = torch.stack([full[i][positions[i]] for i in range(len(full))])[:, None]
            out = model(input_ids=column, retrieved=None if r is None else r[:, 0], past_key_values=cache)
            steps.append(out.logits)
        logits = torch.cat(steps, dim=1)
        for i, p in enumerate(full):
            alone = model(input_ids=p[None], retrieved=own[i][None]).logits[0]
            torch.testing.assert_close(logits[i, pad[i] :], alone, rtol=0, atol=ATOL)


@pytest.fixture(scope="module")
def real_database(tmp_path_factory: pytest.TempPathFactory):
    root = Path(tmp_path_factory.mktemp("pad-db"))
    return build_real_database(root / "db", tiny_bert_embedder(root / "embedder"), n_docs=12)


def database_model(db, decoder: str) -> RETRO:
    torch.manual_seed(0)
    # float64: greedy argmax must not flip on a rounding-level near-tie between the two layouts
    return (
        RETRO(
            **{**tiny_retro_config(), "num_tokens": 50257, "max_seq_len": 64, "chunk_size": db.chunk_size},
            pad_id=db.pad_id,
            decoder=decoder,
        )
        .double()
        .eval()
    )


@pytest.mark.parametrize("decoder", ["transformer", "retnet"])
@pytest.mark.heavy
def test_greedy_generation_of_a_padded_batch_equals_each_prompt_alone(real_database, decoder: str) -> None:
    db = real_database
    c = db.chunk_size
    model = database_model(db, decoder)
    # real text: the database's own chunks, cut to lengths that put every row at another chunk phase
    prompts = [
        torch.as_tensor(
            [*db.chunk_tokens(3 * i), *db.chunk_tokens(3 * i + 1), *db.chunk_tokens(3 * i + 2)][:n]
        ).long()
        for i, n in enumerate([2 * c + 3, c + 1, 2 * c, 5])
    ]
    ids, mask = left_pad(prompts, pad_id=db.pad_id)
    new = 3 * c + 2
    batch = generate_with_retrieval(model, db, ids, attention_mask=mask, max_new_tokens=new)
    via_hf = model.generate(ids, attention_mask=mask, retrieval_database=db, max_new_tokens=new)
    assert torch.equal(via_hf.sequences, batch.sequences)
    for i, p in enumerate(prompts):
        alone = generate_with_retrieval(model, db, p[None], max_new_tokens=new)
        assert torch.equal(batch.sequences[i, ids.shape[1] - len(p) :], alone.sequences[0])
        # the same retrievals, at the row's own chunk boundaries, with the same queries and results
        got, want = batch.retrievals[i], alone.retrievals[0]
        assert [r.chunk_index for r in got] == [r.chunk_index for r in want]
        assert len(want) == (len(p) + new - 1) // c
        for a, b in zip(got, want, strict=True):
            assert (a.query == b.query).all() and (a.chunk_ids == b.chunk_ids).all()
            assert (a.tokens == b.tokens).all()


@pytest.mark.parametrize("decoder", ["transformer", "retnet"])
def test_hf_generate_of_a_padded_batch_without_retrieval_equals_each_prompt_alone(decoder: str) -> None:
    model = tiny_retro(decoder).double()
    prompts = random_prompts(LENGTHS, VOCAB, seed=5)
    ids, mask = left_pad(prompts)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], max_new_tokens=10, do_sample=False)
        assert torch.equal(out[i, ids.shape[1] - len(p) :], alone[0])


@pytest.mark.parametrize("decoder", ["transformer", "retnet"])
def test_padded_batch_decodes_one_token_per_step(decoder: str) -> None:
    """The padded batch keeps the incremental contract of test_decode_steps.py: prompt once, then one token
    per call on the growing cache, with retrieval and with HF generate."""
    model = tiny_retro(decoder, num_tokens=53, max_seq_len=64, pad_id=0)
    prompts = random_prompts([11, 6, 9], 53, seed=6)
    ids, mask = left_pad(prompts)
    width, new = ids.shape[1], 16
    with CallLog(model) as log:
        out = model.generate(
            ids, attention_mask=mask, retrieval_database=FakeDatabase(C, 53), max_new_tokens=new
        )
    assert out.sequences.shape == (3, width + new)
    assert_incremental(log.calls, width, new)
    for i, p in enumerate(prompts):
        assert [r.chunk_index for r in out.retrievals[i]] == list(range((len(p) + new - 1) // 4))
    with CallLog(model) as log:
        model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    assert_incremental(log.calls, width, new)


def test_padding_errors() -> None:
    model = tiny_retro()
    ids = torch.randint(1, VOCAB, (2, 6))
    with pytest.raises(ValueError, match="hole"):
        model(input_ids=ids, attention_mask=torch.tensor([[0, 1, 0, 1, 1, 1], [1] * 6]))
    with pytest.raises(ValueError, match="empty row"):
        model(input_ids=ids, attention_mask=torch.tensor([[0] * 6, [1] * 6]))
    right = torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6])
    model(input_ids=ids, attention_mask=right)  # a full forward: right padding needs no masking
    with pytest.raises(ValueError, match="left padding only"):
        model(input_ids=ids, attention_mask=right, use_cache=True)
    with pytest.raises(ValueError, match="left padding only"):
        model(input_ids=ids, attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="left padding"):
        generate_with_retrieval(model, None, ids, attention_mask=right, max_new_tokens=2)
    left = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])
    out = model(input_ids=ids, attention_mask=left, use_cache=True)
    grown = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1] * 7])  # more padding than the first call had
    with pytest.raises(ValueError, match="first call"):
        model(input_ids=ids[:, :1], attention_mask=grown, past_key_values=out.past_key_values)
    # the shorter row (4 tokens) completes 1 chunk, the longer (6) 1: num_chunks is the most a row completes
    with pytest.raises(ValueError, match="num_chunks=1"):
        model(input_ids=ids, attention_mask=left, retrieved=torch.ones(2, 2, 2, 2 * C, dtype=torch.long))
