"""retro-pytorch 0.3.9 import: same weights, same input, same retrieved chunks -> same logits."""

from __future__ import annotations

import pytest
import torch
from retro_peer import load_retro_pytorch

from retlm.models.retro.convert import from_retro_pytorch

TOL = 1e-5
BASE = dict(num_tokens=50, max_seq_len=40, enc_depth=2, dec_depth=4, dim_head=32, chunk_size=4)
CONFIGS = [
    dict(BASE, enc_dim=48, dec_dim=64, dec_cross_attn_layers=(1, 3)),  # enc_dim != dec_dim
    dict(BASE, enc_dim=64, dec_dim=64, dec_cross_attn_layers=(2, 4), heads=2),  # heads is ignored there
    dict(BASE, enc_dim=32, dec_dim=48, dec_cross_attn_layers=(1, 2, 3, 4), enc_cross_attn_layers=(2,)),
    dict(BASE, enc_dim=32, dec_dim=32, dec_cross_attn_layers=(3,), gated_rmsnorm=True),
    dict(BASE, enc_dim=32, dec_dim=48, dec_cross_attn_layers=(1, 4), use_deepnet=True),
]


@pytest.fixture
def retro_pytorch(monkeypatch):
    return load_retro_pytorch(monkeypatch)


def pair(retro_pytorch, kwargs, seed=0):
    torch.manual_seed(seed)
    peer = retro_pytorch.RETRO(**kwargs).eval()
    ours = from_retro_pytorch(kwargs, peer.state_dict()).eval()
    return peer, ours


def inputs(kwargs, seq_len, k=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(1, kwargs["num_tokens"], (2, seq_len), generator=g)
    c = kwargs["chunk_size"]
    retrieved = torch.randint(1, kwargs["num_tokens"], (2, seq_len // c, k, 2 * c), generator=g)
    retrieved[0, :, 0, -3:] = 0  # padded tails
    if seq_len // c:
        retrieved[1, 0, 1] = 0  # a missing neighbor
    return seq, retrieved


@pytest.mark.parametrize(
    "kwargs", CONFIGS, ids=lambda k: f"e{k['enc_dim']}d{k['dec_dim']}x{k['dec_cross_attn_layers']}"
)
@pytest.mark.parametrize("seq_len", [16, 18, 3])  # multiple of chunk_size, partial last chunk, n < chunk_size
def test_logits_match_retro_pytorch(retro_pytorch, kwargs, seq_len):
    peer, ours = pair(retro_pytorch, kwargs)
    seq, retrieved = inputs(kwargs, seq_len)
    with torch.no_grad():
        expected_without = peer(seq)
        # retro-pytorch crashes on zero chunks; there its CCA adds zeros, i.e. the no-retrieval logits
        expected_with = peer(seq, retrieved) if seq_len >= kwargs["chunk_size"] else expected_without
        got_with = ours(seq, retrieved)
        got_without = ours(seq)
    assert (got_with - expected_with).abs().max() <= TOL
    assert (got_without - expected_without).abs().max() <= TOL
    if seq_len >= kwargs["chunk_size"]:  # retrieval must matter, or the comparison proves little
        assert (expected_with - expected_without).abs().max() > 1e-3


def test_loss_matches_retro_pytorch(retro_pytorch):
    kwargs = CONFIGS[0]
    peer, ours = pair(retro_pytorch, kwargs)
    seq, retrieved = inputs(kwargs, 17)
    seq[:, -2:] = 0  # pad labels are ignored by both
    peer.train()  # retro-pytorch asserts training mode for return_loss; dropout is 0
    expected = peer(seq, retrieved, return_loss=True)
    got = ours(seq, retrieved, return_loss=True)
    assert abs(got.item() - expected.item()) <= TOL


def test_bad_state_dict_is_refused(retro_pytorch):
    kwargs = CONFIGS[0]
    peer = retro_pytorch.RETRO(**kwargs)
    other = dict(kwargs, dec_cross_attn_layers=(2,))
    with pytest.raises(ValueError, match="does not match"):
        from_retro_pytorch(other, peer.state_dict())
    with pytest.raises(ValueError, match="not retro-pytorch"):
        from_retro_pytorch(dict(kwargs, bogus=1), peer.state_dict())
