"""The neighbor-overlap measure (retlm/training/overlap.py) against a naive reference that tries every
span of the chunk, and its alignment with what each target token reads."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from overlap_reference import PAD, naive_overlap, naive_span

from retlm.training.overlap import (
    UNBUCKETED,
    bucket_of,
    chunk_overlaps,
    drop_overlapping,
    longest_common_spans,
    sequence_overlaps,
    target_buckets,
)

tokens = st.integers(min_value=-1, max_value=4)  # a small alphabet: many repeats; 0 = pad, -1 = missing


@given(st.data())
def test_spans_and_overlaps_match_the_naive_reference(data):
    n = data.draw(st.integers(1, 9))
    r = data.draw(st.integers(1, 12))
    k = data.draw(st.integers(1, 3))
    m = data.draw(st.integers(1, 3))
    chunks = np.array(data.draw(st.lists(st.lists(tokens, min_size=n, max_size=n), min_size=m, max_size=m)))
    neighbors = np.array(
        data.draw(
            st.lists(
                st.lists(st.lists(tokens, min_size=r, max_size=r), min_size=k, max_size=k),
                min_size=m,
                max_size=m,
            )
        )
    )
    lengths, starts = longest_common_spans(chunks, neighbors, PAD)
    overlap, single = chunk_overlaps(chunks, neighbors, PAD)
    for i in range(m):
        for j in range(k):
            assert (lengths[i, j], starts[i, j]) == naive_span(chunks[i].tolist(), neighbors[i, j].tolist())
        expected, expected_single = naive_overlap(chunks[i].tolist(), neighbors[i].tolist())
        assert abs(overlap[i] - expected) < 1e-12
        np.testing.assert_allclose(single[i], expected_single, atol=1e-12)


def test_examples():
    chunk = np.array([[5, 6, 7, 8, 9, 10, 11, 12]])
    neighbors = np.array([[[1, 5, 6, 7, 2, 2, 2, 2], [9, 10, 11, 12, 5, 6, 7, 8]]])
    lengths, starts = longest_common_spans(chunk, neighbors, PAD)
    assert lengths.tolist() == [[3, 4]] and starts.tolist() == [[0, 0]]  # ties: the leftmost span in C
    overlap, single = chunk_overlaps(chunk, neighbors, PAD)
    assert overlap.tolist() == [4 / 8] and single.tolist() == [[3 / 8, 4 / 8]]
    # padding never matches padding, and the fraction counts real tokens only
    overlap, _ = chunk_overlaps(np.array([[5, 6, PAD, PAD]]), np.array([[[5, 6, PAD, PAD]]]), PAD)
    assert overlap.tolist() == [1.0]


def test_buckets_are_the_papers():
    assert bucket_of(np.array([0.0, 0.12, 0.125, 0.2, 0.25, 0.49, 0.5, 1.0])).tolist() == [
        0,
        0,
        1,
        1,
        2,
        2,
        3,
        3,
    ]


def test_chunk_v_is_compared_with_the_neighbors_retrieved_for_chunk_v_minus_1():
    c = 4
    seq = np.arange(1, 3 * c + 2)  # 13 tokens: chunks [1..4] [5..8] [9..12] and the extra target 13
    retrieved = np.full((3, 1, 2 * c), 50)
    retrieved[0, 0, :c] = seq[c : 2 * c]  # read by chunk 1 (targets 5..8): all of it
    retrieved[1, 0, :2] = seq[2 * c : 2 * c + 2]  # read by chunk 2 (targets 9..12): half
    retrieved[2, 0, 0] = 13  # read by the extra target
    overlap, single = sequence_overlaps(seq, retrieved, c, PAD)
    assert overlap.tolist() == [1.0, 0.5, 1.0] and single[:, 0].tolist() == [1.0, 0.5, 1.0]
    # label t predicts seq[t + 1]: 0..2 -> chunk 0 (unbucketed), 3..6 -> chunk 1, 7..10 -> chunk 2,
    # 11 -> the extra target (unbucketed)
    buckets = target_buckets(overlap, seq_len=3 * c, chunk_size=c)
    assert buckets.tolist() == [UNBUCKETED] * 3 + [3] * 4 + [3] * 4 + [UNBUCKETED]
    filtered, dropped = drop_overlapping(seq, retrieved, c, PAD, max_overlap=0.5)
    assert dropped == 2 and (filtered[0] == PAD).all() and (filtered[2] == PAD).all()
    assert np.array_equal(filtered[1], retrieved[1])
    assert drop_overlapping(seq, retrieved, c, PAD, max_overlap=1.0)[1] == 0
