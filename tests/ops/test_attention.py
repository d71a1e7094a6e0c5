"""retlm.ops.attention against naive float64 references: masked / offset-causal attention and the CCA
group alignment."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from retlm.ops.attention import attention, cca_groups, chunks_completed, from_groups, to_groups


def naive_attention(q, k, v, key_mask, causal):
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    allowed = torch.ones(scores.shape[-2:], dtype=torch.bool)
    if causal:  # query i is position k_len - q_len + i
        q_pos = torch.arange(k.shape[-2] - q.shape[-2], k.shape[-2])
        allowed = q_pos[:, None] >= torch.arange(k.shape[-2])
    visible = allowed.expand(scores.shape)
    allowed = visible.clone()
    if key_mask is not None:
        allowed &= key_mask[:, None, None, :]
    allowed |= ~allowed.any(-1, keepdim=True) & visible  # rows with nothing to see: all they may see
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("q_len,k_len", [(5, 5), (1, 7), (3, 9)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_attention_matches_naive_float64(q_len, k_len, causal, masked):
    g = torch.Generator().manual_seed(q_len * 31 + k_len)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g, dtype=torch.float64) for n in (q_len, k_len, k_len))
    key_mask = None
    if masked:
        key_mask = torch.rand(2, k_len, generator=g) > 0.4
        key_mask[1] = False  # a row with no real key
    got = attention(q, k, v, key_mask=key_mask, causal=causal)
    assert (got - naive_attention(q, k, v, key_mask, causal)).abs().max() <= 1e-12


@settings(deadline=None, max_examples=60)
@given(c=st.integers(1, 6), start=st.integers(0, 30), length=st.integers(1, 25))
def test_groups_hold_each_position_at_its_offset(c, start, length):
    x = torch.arange(start, start + length, dtype=torch.float64)[None, :, None] + 1  # value = position + 1
    first, num_groups = cca_groups(start, length, c)
    last_pos = start + length - 1
    assert num_groups == (0 if last_pos < c - 1 else (last_pos - c + 1) // c - first + 1)
    if num_groups:
        groups, left = to_groups(x, start, c)
        assert groups.shape == (1, num_groups, c, 1)
        for p in range(max(start, c - 1), start + length):
            g, j = divmod(p - c + 1, c)  # group g = positions g*c + c-1 .. g*c + 2c-2
            assert groups[0, g - first, j, 0] == p + 1
        assert (groups != 0).sum() == start + length - max(start, c - 1)
        back = from_groups(groups, start, length, left)
        expected = torch.where(torch.arange(start, start + length) >= c - 1, x[0, :, 0], 0.0)
        assert torch.equal(back[0, :, 0], expected)
    first_chunk, completed = chunks_completed(start, length, c)
    ends = [u for u in range(0, 100) if start <= u * c + c - 1 < start + length]
    assert completed == len(ends) and (not ends or ends[0] == first_chunk)
