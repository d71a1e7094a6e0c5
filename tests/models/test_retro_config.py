"""RetroConfig in transformers' dataclass style: its defaults (GPT-2's vocabulary, the default tokenizer's),
its checks, and the keys renamed for issue #20 (``retnet_mode`` -> ``retention_mode``,
``retnet_chunk_size`` -> ``retention_block_size``) still loading from an old config.json with a warning."""

import json
import warnings

import pytest
import torch

from retlm import RETRO
from retlm.models.padding import check_right_padding, leading_padding
from retlm.models.retro import RetroConfig, RetroForCausalLM
from retlm.tokenization import GPT2_VOCAB_SIZE, load_tokenizer

TINY = dict(
    num_tokens=32, max_seq_len=16, chunk_size=4, enc_dim=16, enc_depth=1, dec_dim=16, dec_depth=2,
    dec_cross_attn_layers=[2], heads=2, dim_head=8, decoder="retnet",
)  # fmt: skip


def test_default_vocabulary_is_the_default_tokenizers_and_retro_keeps_retro_pytorchs():
    assert RetroConfig().vocab_size == GPT2_VOCAB_SIZE == 50257 == len(load_tokenizer("gpt2"))
    assert RETRO(**{k: v for k, v in TINY.items() if k != "num_tokens"}).config.num_tokens == 28996


def test_old_config_json_keys_load_with_a_deprecation_warning(tmp_path):
    config = RetroConfig(**TINY, retention_mode="chunkwise", retention_block_size=2)
    saved = config.to_dict()
    assert "retnet_mode" not in saved and saved["retention_mode"] == "chunkwise"
    old = {k: v for k, v in saved.items() if not k.startswith("retention_")}
    old.update(retnet_mode="chunkwise", retnet_chunk_size=2)
    (tmp_path / "config.json").write_text(json.dumps(old))
    with pytest.warns(DeprecationWarning, match="retnet_mode is deprecated; use retention_mode"):
        loaded = RetroConfig.from_pretrained(tmp_path)
    assert (loaded.retention_mode, loaded.retention_block_size) == ("chunkwise", 2)
    assert loaded.to_dict() == saved


def test_the_old_forward_keyword_warns_and_gives_the_same_logits():
    torch.manual_seed(0)
    model = RetroForCausalLM(RetroConfig(**TINY)).eval()
    seq = torch.randint(1, 32, (1, 8))
    with torch.no_grad():
        new = model(seq, retention_mode="recurrent").logits
        with pytest.warns(DeprecationWarning, match="retnet_mode= is deprecated"):
            old = model(seq, retnet_mode="recurrent").logits
    assert torch.equal(new, old)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"dec_dim": "wide"}, "dec_dim must be int, got 'wide'"),
        ({"heads": True}, "heads must be int, got True"),
        ({"retention_mode": "fast"}, "unknown retention_mode 'fast'"),
        ({"chunk_size": 0}, "chunk_size must be a positive integer"),
        ({"dec_cross_attn_layers": [3]}, r"dec_cross_attn_layers must hold layer numbers in 1..2"),
    ],
)
def test_a_bad_field_is_refused_by_name(change, message):
    with pytest.raises(ValueError, match=message):
        RetroConfig(**{**TINY, **change})


def test_ints_for_floats_and_tuples_for_layer_lists_are_accepted():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = RetroConfig(**{**TINY, "dec_cross_attn_layers": (2, 1), "norm_eps": 1, "dec_ff_dropout": 0})
    assert config.dec_cross_attn_layers == [1, 2] and config.norm_eps == 1.0


def test_padding_policies():
    left = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert leading_padding(left).tolist() == [1, 0]
    assert leading_padding(torch.tensor([[1, 1, 0]])).tolist() == [0]  # right padding: RetNet takes it
    with pytest.raises(ValueError, match="RetNet's attention_mask has a hole"):
        leading_padding(torch.tensor([[1, 0, 1]]))
    check_right_padding(torch.tensor([[1, 1, 0]]))
    with pytest.raises(ValueError, match="RETRO-fitting supports right padding only"):
        check_right_padding(left)
