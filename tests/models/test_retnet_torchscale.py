"""Importing torchscale 0.3.0's RetNetDecoder: our logits equal its parallel-mode logits.

torchscale imports ``timm.models.layers.drop_path`` (for DropPath), and timm would pull a CUDA torch,
so it is not installed: a minimal stand-in of that one function is registered below before
torchscale is imported. It is only reached with drop_path_rate > 0, which these tests do not use.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn


def _drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False) -> torch.Tensor:
    """Stochastic depth: zero whole samples with probability drop_prob, rescale the survivors."""
    if not training or not drop_prob:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - drop_prob)
    return x * keep / (1 - drop_prob)


def _register_timm_stand_in() -> None:
    if "timm" in sys.modules:
        return
    names = ["timm", "timm.models", "timm.models.layers"]
    modules = {name: types.ModuleType(name) for name in names}
    modules["timm.models.layers"].drop_path = _drop_path
    modules["timm"].models = modules["timm.models"]
    modules["timm.models"].layers = modules["timm.models.layers"]
    sys.modules.update(modules)


_register_timm_stand_in()
torchscale_retnet = pytest.importorskip("torchscale.architecture.retnet")
torchscale_config = pytest.importorskip("torchscale.architecture.config")

from retlm.models.retnet.convert import from_torchscale  # noqa: E402

VOCAB = 97


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """Frobenius-norm relative error ||ours - reference|| / ||reference||."""
    return ((ours - reference).norm() / reference.norm().clamp(min=1e-300)).item()


def build_torchscale(seed: int, weight_scale: float, **overrides):
    """A small torchscale RetNetDecoder with random weights (norm gains too, so that none is trivial)."""
    torch.manual_seed(seed)
    fields = dict(
        decoder_embed_dim=64,
        decoder_value_embed_dim=128,
        decoder_retention_heads=4,
        decoder_ffn_embed_dim=96,
        decoder_layers=3,
        vocab_size=VOCAB,
        layernorm_eps=1e-6,
        activation_fn="gelu",
    )
    fields.update(overrides)
    args = torchscale_config.RetNetConfig(**fields)
    embed = nn.Embedding(VOCAB, args.decoder_embed_dim)
    decoder = torchscale_retnet.RetNetDecoder(args, embed_tokens=embed)
    with torch.no_grad():
        for name, param in decoder.named_parameters():
            if name.endswith("layer_norm.weight") or "layernorm" in name:
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, weight_scale * param.shape[-1] ** -0.5)
    return args, decoder.eval()


CASES = {
    "default": dict(),
    "swish-tied-scaled": dict(
        activation_fn="swish", share_decoder_input_output_embed=True, no_scale_embedding=False
    ),
    "layernorm-embedding-eps": dict(layernorm_embedding=True, layernorm_eps=1e-2, decoder_retention_heads=2),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("weight_scale", [1.0, 8.0])  # large weights make the |sum R| >= 1 clamp bite
def test_logits_match_torchscale_parallel(case: str, weight_scale: float) -> None:
    args, decoder = build_torchscale(seed=len(case), weight_scale=weight_scale, **CASES[case])
    model = from_torchscale(args, decoder.state_dict())
    tokens = torch.randint(0, VOCAB, (2, 45), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference, _ = decoder(tokens)
        for mode in ("parallel", "chunkwise", "recurrent"):
            logits = model(tokens, retention_mode=mode, retention_block_size=16).logits
            err = relative_error(logits, reference)
            assert err <= 1e-5, f"{case} {mode}: relative error {err:.2e} against torchscale parallel"


def test_tied_import_shares_the_embedding() -> None:
    args, decoder = build_torchscale(seed=0, weight_scale=1.0, share_decoder_input_output_embed=True)
    model = from_torchscale(args, decoder.state_dict())
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_fairseq_prefixed_state_dict() -> None:
    args, decoder = build_torchscale(seed=3, weight_scale=1.0)
    prefixed = {f"decoder.{k}": v for k, v in decoder.state_dict().items()}
    model = from_torchscale(args, prefixed)
    tokens = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        assert relative_error(model(tokens).logits, decoder(tokens)[0]) <= 1e-5


@pytest.mark.parametrize(
    "option, value",
    [("deepnorm", True), ("moe_freq", 2), ("multiway", True), ("activation_fn", "relu")],
)
def test_unsupported_options_raise(option: str, value) -> None:
    args, decoder = build_torchscale(seed=0, weight_scale=1.0)
    setattr(args, option, value)
    with pytest.raises(ValueError, match=option):
        from_torchscale(args, decoder.state_dict())


def test_missing_embedding_raises() -> None:
    args, decoder = build_torchscale(seed=0, weight_scale=1.0)
    state = {k: v for k, v in decoder.state_dict().items() if not k.startswith("embed_tokens")}
    with pytest.raises(ValueError, match="embed_tokens"):
        from_torchscale(args, state)
