"""Tiny random models and the probes that watch them decode, shared by the model, generation, training
and serve tests: one definition of each, so that a test folder never grows its own copy.

- ``tiny_retnet`` / ``tiny_retnet_config``: a 2-layer, 32-wide RetNet;
- ``tiny_retro`` / ``tiny_retro_config``: a RETRO with chunks of 4, CCA after decoder layers 1 and 3;
- ``tiny_causal_lm``: a GPT-2, Llama or RetNet base, as RETRO-fitting and In-Context RALM take one;
- ``FakeDatabase``: neighbors that are a deterministic function of the query chunk, so a wrong query
  shows up in the logits;
- ``CallLog`` and ``assert_incremental``: what each forward call of a model is given, to prove that
  decoding feeds one new token per step on a cache that holds the rest (equal tokens cannot show it).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from retlm import RETRO, RetNetConfig, RetNetForCausalLM


def tiny_retnet_config(**overrides: Any) -> RetNetConfig:
    """A 2-layer RetNet, hidden 32, 4 heads, value dim 64, vocabulary 64 (``overrides`` win)."""
    fields = dict(
        vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, v_dim=64, ffn_proj_size=64, pad_token_id=0
    )
    return RetNetConfig(**{**fields, **overrides})


def tiny_retnet(seed: int = 0, **overrides: Any) -> RetNetForCausalLM:
    """``tiny_retnet_config`` in eval mode, with no EOS and peaked next-token distributions (initializer
    range 0.3), so that greedy, beam and sampled continuations differ visibly."""
    torch.manual_seed(seed)
    config = tiny_retnet_config(**{"eos_token_id": None, "initializer_range": 0.3, **overrides})
    return RetNetForCausalLM(config).eval()


def tiny_retro_config(**overrides: Any) -> dict[str, Any]:
    """The keyword arguments of a small ``RETRO``: chunks of 4, a 1-layer encoder of width 24, a 3-layer
    decoder of width 32 with CCA after layers 1 and 3, vocabulary 64, sequences up to 48."""
    fields = dict(
        num_tokens=64,
        max_seq_len=48,
        enc_dim=24,
        enc_depth=1,
        dec_dim=32,
        dec_depth=3,
        dec_cross_attn_layers=(1, 3),
        heads=2,
        dim_head=16,
        chunk_size=4,
    )
    return {**fields, **overrides}


def tiny_retro(decoder: str = "transformer", seed: int = 0, **overrides: Any) -> RETRO:
    """``RETRO(**tiny_retro_config(**overrides), decoder=decoder)`` from seed ``seed``, in eval mode."""
    torch.manual_seed(seed)
    return RETRO(**tiny_retro_config(**overrides), decoder=decoder).eval()


def tiny_causal_lm(
    family: str, vocab: int, *, positions: int = 128, layers: int = 2, seed: int = 0, **overrides: Any
) -> torch.nn.Module:
    """A random causal LM of ``family`` (gpt2, llama or retnet), 32 wide, in the mode a fresh model has
    (train: GPT-2's dropout is on until the caller calls ``.eval()``). ``overrides`` go to its config."""
    torch.manual_seed(seed)
    if family == "gpt2":
        fields = dict(vocab_size=vocab, n_positions=positions, n_embd=32, n_layer=layers, n_head=2)
        return GPT2LMHeadModel(GPT2Config(**{**fields, **overrides}))
    if family == "llama":
        fields = dict(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=layers,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=positions,
        )
        return LlamaForCausalLM(LlamaConfig(**{**fields, **overrides}))
    if family == "retnet":
        config = tiny_retnet_config(
            **{"vocab_size": vocab, "num_layers": layers, "num_heads": 2, **overrides}
        )
        return RetNetForCausalLM(config)
    raise ValueError(f"unknown family {family!r}: gpt2, llama or retnet")


class FakeDatabase:
    """A stand-in for ``RetrievalDatabase.search``: each query chunk's neighbors (a chunk and its
    continuation, ``2 * chunk_size`` tokens in ``1..vocab-1``) are a function of the query's tokens, so a
    wrong query changes them. ``calls`` records the shape of every query."""

    pad_id = 0

    def __init__(self, chunk_size: int, vocab: int, num_neighbors: int = 2) -> None:
        self.chunk_size, self.vocab, self.num_neighbors = chunk_size, vocab, num_neighbors
        self.calls: list[tuple[int, ...]] = []

    def search(self, queries: Any, k: int) -> SimpleNamespace:
        """``queries`` ``(..., chunk_size)`` -> tokens ``(..., k, 2 * chunk_size)``, chunk and document ids
        and scores ``(..., k)``."""
        queries = np.asarray(queries)
        self.calls.append(queries.shape)
        lead = queries.shape[:-1]
        start = (queries.sum(-1) % 7)[..., None, None]
        tokens = (start + 3 * np.arange(k)[:, None] + np.arange(2 * self.chunk_size)) % (self.vocab - 1) + 1
        tokens = np.broadcast_to(tokens, (*lead, k, 2 * self.chunk_size)).copy()
        ids = np.broadcast_to(start[..., 0] * 10 + np.arange(k), (*lead, k)).copy()
        return SimpleNamespace(
            tokens=tokens, chunk_ids=ids, doc_ids=ids // 10, scores=np.ones((*lead, k), np.float32)
        )


class CallLog:
    """Records ``(new_tokens, cache_seen)`` and the retention mode of every forward call of ``module``
    (a forward pre-hook; a context manager that removes it)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls: list[tuple[int, int]] = []
        self.modes: list[str | None] = []
        self.handle = module.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("seq")  # RETRO's own name
        new = ids.shape[1] if ids is not None else kwargs["inputs_embeds"].shape[1]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        self.calls.append((new, cache.get_seq_length() if cache is not None else 0))
        self.modes.append(kwargs.get("retention_mode"))  # a RetNet's retention mode

    def __enter__(self) -> CallLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


def assert_incremental(calls: list[tuple[int, int]], prompt_len: int, steps: int, seen: int = 0) -> None:
    """First call: the ``prompt_len`` prompt tokens on a cache that has seen ``seen``; then one token per
    call on a cache that has seen everything before it."""
    assert len(calls) == steps, calls
    assert calls[0] == (prompt_len, seen), calls
    for i, call in enumerate(calls[1:], start=1):
        assert call == (1, seen + prompt_len + i - 1), f"call {i}: {call}; all calls: {calls}"
