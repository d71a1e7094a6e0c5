"""The growing KV cache of RETRO's transformer decoder holds exactly what concatenation would."""

import torch

from retlm.layers.attention import KVCache


def test_kv_cache_equals_concatenation_across_growth_and_selects_rows():
    g = torch.Generator().manual_seed(0)
    pieces = [
        (torch.randn(3, 2, n, 4, generator=g), torch.randn(3, 2, n, 5, generator=g))
        for n in (7, 1, 1, 9, 1, 30, 1)
    ]
    cache = KVCache(*pieces[0])
    for k, v in pieces[1:]:
        keys, values = cache.append(k, v)
    assert torch.equal(keys, torch.cat([p[0] for p in pieces], dim=2))
    assert torch.equal(values, torch.cat([p[1] for p in pieces], dim=2))
    assert cache.length == keys.shape[2] == 50 and cache.keys.shape[2] >= 50
    picked = cache.index_select(0, torch.tensor([2, 0]))
    more_k, more_v = torch.randn(2, 2, 1, 4, generator=g), torch.randn(2, 2, 1, 5, generator=g)
    keys2, values2 = picked.append(more_k, more_v)
    assert torch.equal(keys2, torch.cat((keys[[2, 0]], more_k), dim=2))
    assert torch.equal(values2, torch.cat((values[[2, 0]], more_v), dim=2))
    assert cache.length == 50  # the original is untouched
