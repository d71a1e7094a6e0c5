"""Every option of ``retlm demo`` checked before its first step (the demo builds, trains, evaluates and
generates for minutes; a bad value must not surface at the end).

``check_options(opts)`` (the body of ``DemoOptions.validate``) raises ``OptionError`` (CLI exit code 2)
for a value out of range, a prompt with no text, a model config that does not exist or holds an unknown
key, a corpus folder without text, and ``ResourceError`` for a sequence length whose training step cannot
fit in memory. The database's options (``DemoOptions.build_options``) get build-db's checks
(``retlm.retrieval.preflight.check_options``: their ranges, a chunk size the embedder can read, a
tokenizer that loads), in messages that name the demo's flags.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from retlm.errors import OptionError, check_int, check_number, short_repr


def check_options(opts: Any) -> None:
    """See the module docstring; ``opts`` is a ``DemoOptions``."""
    from retlm.retrieval import preflight
    from retlm.retrieval.chunking import EmptySourceError
    from retlm.retrieval.sources import scan_source

    minutes = opts.minutes
    if isinstance(minutes, bool) or not isinstance(minutes, int | float) or not 0 < minutes < math.inf:
        raise OptionError(f"--minutes must be positive (a training time budget), got {short_repr(minutes)}")
    _check_pretrained(opts)
    check_number("--lr", opts.lr)
    check_number("--repetition-penalty", opts.repetition_penalty)
    check_int("--no-repeat-ngram-size", opts.no_repeat_ngram_size, low=0)
    for name, value in (
        ("--batch-size", opts.batch_size),
        ("--max-new-tokens", opts.max_new_tokens),
        ("--num-prompts", opts.num_prompts),
    ):
        check_int(name, value)
    check_int("--seed", opts.seed, low=0)
    if opts.seed >= 2**32:
        raise OptionError(f"--seed must be below 2**32, got {short_repr(opts.seed)}")
    if opts.eval_sequences is not None:  # the command line's 0 (all) is None by now
        if isinstance(opts.eval_sequences, int) and opts.eval_sequences < 0:
            raise OptionError(f"--eval-sequences must be >= 0 (0: all), got {opts.eval_sequences}")
        check_int("--eval-sequences", opts.eval_sequences)
    prompt = getattr(opts, "prompt", None)
    if prompt is not None:
        if not isinstance(prompt, str) or not prompt.strip():
            raise OptionError("--prompt is empty: give some text to continue")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:
            raise OptionError("--prompt is not valid UTF-8 text") from None
    # the database's options: build-db's checks (ranges, the embedder's positions, the tokenizer loads)
    preflight.check_options(opts.build_options(), flags=True)
    if opts.corpus is not None:
        corpus = Path(opts.corpus)
        if not corpus.is_dir():
            raise OptionError(f"--corpus {corpus}: no such folder")
        if not any(p.is_file() for p in corpus.rglob("*")):
            raise OptionError(f"--corpus {corpus}: the folder holds no file")
        try:
            scan_source(corpus, "**/*")
        except EmptySourceError as err:
            raise OptionError(f"--corpus: {err}") from None
    _check_model(opts)


def _check_model(opts: Any) -> None:
    """The model config exists, its keys and types are RetroConfig's, and a training step fits."""
    from retlm.models.retro import RetroConfig
    from retlm.retrieval.embedding import DEFAULT_EMBEDDER
    from retlm.tokenization import load_tokenizer
    from retlm.training.config import read_model_config
    from retlm.training.resources import check_training_memory

    try:
        mapping = read_model_config(opts.model_config)
    except FileNotFoundError as err:
        raise OptionError(f"--model-config: {err}") from None
    vocab = len(load_tokenizer(opts.tokenizer, embedder=DEFAULT_EMBEDDER))  # it loads: check_options
    defaults = {"num_tokens": vocab, "chunk_size": opts.chunk_size, "pad_id": 0, "max_seq_len": opts.seq_len}
    try:
        config = RetroConfig(**{**defaults, **mapping})
    except (TypeError, ValueError) as err:
        raise OptionError(f"--model-config {opts.model_config}: {err}") from None
    if opts.seq_len > config.max_seq_len:
        raise OptionError(
            f"--seq-len {opts.seq_len} is longer than the model's max_seq_len {config.max_seq_len} "
            f"(--model-config {opts.model_config})"
        )
    check_training_memory(config, opts.batch_size, opts.seq_len)


def _check_pretrained(opts: Any) -> None:
    """--pretrained names a model retlm can resolve (nothing is loaded or converted here), or 'none'."""
    name = getattr(opts, "pretrained", "none")
    if str(name).lower() == "none":
        return
    from retlm.models.pretrained import model_kind

    try:
        model_kind(name)
    except FileNotFoundError as err:
        raise OptionError(f"--pretrained: {err}") from None
    check_int("--pretrained-tokens", opts.pretrained_tokens)
