"""A tiny random Llama written as a GGUF file with the ``gguf`` package's writer, the way llama.cpp's
converter lays it out (tensor names, the rotary permutation of q and k, a byte-level BPE tokenizer in the
metadata), so that tests can convert it without any downloaded model.

``tiny_llama()`` gives the HF model and its tokenizer; ``write_llama_gguf(model, tokenizer, path)``
writes them (weights as float32, or quantized to Q8_0 with ``quantized=True``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from tiny_models import tiny_causal_lm

TEXT = (
    "The capital of France is Paris. Retrieval helps a language model read what it does not remember. "
    "def add(a, b):\n    return a + b\n"
) * 4
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tiny_tokenizer(vocab_size: int = 300) -> Any:
    """A byte-level BPE (GPT-2's scheme) trained on a few sentences: 256 bytes, 3 special tokens and the
    merges that fill ``vocab_size``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=SPECIAL[1], eos_token=SPECIAL[2])


def tiny_llama(vocab_size: int, seed: int = 0) -> Any:
    """A random 2-layer LlamaForCausalLM (hidden 64, 4 heads, 2 KV heads, tied embeddings), float32."""
    model = tiny_causal_lm(
        "llama",
        vocab_size,
        positions=256,
        seed=seed,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    ).eval()
    with torch.no_grad():  # the norms start at 1: make them random too, so that a mix-up shows
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    return model


def _permute_for_gguf(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's rotary layout of q and k: per head, the two rotary halves interleaved."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def gguf_tensors(model: Any) -> dict[str, np.ndarray]:
    """The model's weights under llama.cpp's tensor names (q and k permuted; no output.weight: tied)."""
    config = model.config
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    tensors = {
        "token_embd.weight": state["model.embed_tokens.weight"],
        "output_norm.weight": state["model.norm.weight"],
    }
    names = {
        "attn_norm": "input_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_norm": "post_attention_layernorm",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    for layer in range(config.num_hidden_layers):
        for gguf_name, hf_name in names.items():
            weight = state[f"model.layers.{layer}.{hf_name}.weight"]
            if gguf_name == "attn_q":
                weight = _permute_for_gguf(weight, config.num_attention_heads)
            elif gguf_name == "attn_k":
                weight = _permute_for_gguf(weight, config.num_key_value_heads)
            tensors[f"blk.{layer}.{gguf_name}.weight"] = weight
    return tensors


def write_llama_gguf(model: Any, tokenizer: Any, path: str | Path, *, quantized: bool = False) -> Path:
    """Write ``model`` (a LlamaForCausalLM) and ``tokenizer`` (a byte-level BPE) as a GGUF file.

    ``quantized``: the 2-D weights whose rows are a multiple of 32 wide go in as Q8_0 (so the loader has
    to dequantize them), the rest as float32."""
    import gguf

    config = model.config
    path = Path(path)
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if quantized else gguf.LlamaFileType.ALL_F32)

    vocab = tokenizer.get_vocab()
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    merges = tokenizer.backend_tokenizer.to_str()
    import json

    merges = [m if isinstance(m, str) else " ".join(m) for m in json.loads(merges)["model"]["merges"]]
    special = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token in special else 1 for token in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)

    for name, weight in gguf_tensors(model).items():
        if quantized and weight.ndim == 2 and weight.shape[1] % 32 == 0:
            qtype = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(name, gguf.quants.quantize(weight, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, np.ascontiguousarray(weight, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
