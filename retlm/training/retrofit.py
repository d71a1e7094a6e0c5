"""RETRO-fitting a pretrained causal LM on a retrieval database (the RETRO paper's section 4.2).

``retrofit(base, db, out_dir, ...)`` wraps ``base`` (GPT-2, a Llama-family model, a retlm RetNet or
RETRO control; a known name such as ``smollm2-135m``, a .gguf file, a folder, a run directory, a Hub id or
a model) into a
:class:`~retlm.models.retrofit.RetroFitForCausalLM`, freezes it, and trains only the new parameters
(the neighbor encoder and the chunked cross-attention layers) with :func:`retlm.training.train`: the
same time budget, resume, atomic checkpoints, held-out evaluation with and without retrieval, and run
files. The run's ``model/`` holds the adapter's weights and a config that names the base.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from retlm.data import open_database
from retlm.models.folders import resolve_model_dir
from retlm.models.pretrained import model_kind, pretrained_path
from retlm.training.checkpoint import database_signature
from retlm.training.trainer import TrainResult, train

ADAPTER_OPTIONS = (
    "enc_dim",
    "enc_depth",
    "heads",
    "dim_head",
    "rotary_dim",
    "ff_mult",
    "enc_attn_dropout",
    "enc_ff_dropout",
    "cca_dropout",
)


class TokenizerMismatch(ValueError):
    """The database was built with another tokenizer than the base's."""


def resolve_base(base: str | os.PathLike[str]) -> str:
    """How a run names its base: a known name (``smollm2-135m``) or a Hub id unchanged, a .gguf file or a
    model folder as an absolute path, a retlm run directory as its model's (``RUN/model`` or its newest
    checkpoint). An unknown name or a missing path is refused in one line."""
    kind = model_kind(base)
    if kind in ("known", "hub"):
        return str(base)
    path = Path(base).expanduser()
    if kind == "gguf" or (path / "config.json").is_file():
        return str(path.resolve())
    return str(resolve_model_dir(path).resolve())


def _tokenizer_of_base(source: str | None) -> Any:
    """The tokenizer saved with a base (a local folder, or a known name's converted one), or None when
    it has none."""
    if not source:
        return None
    try:
        folder = pretrained_path(source, weights=False)
    except (OSError, ValueError):
        return None
    if not isinstance(folder, Path) or not folder.is_dir():
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError, KeyError):
        return None


def check_tokenizer(base: Any, source: str | None, db: Any) -> None:
    """Refuse, with a one-line :class:`TokenizerMismatch`, a database whose tokenizer is not the base's.

    The evidence used, strongest first: the tokenizer a retlm-trained base records (its name and
    vocabulary size); the tokenizer saved in the base's folder (every database token must have the same
    id there); otherwise the vocabulary sizes must be equal.
    """
    data = database_signature(db)
    name, size = data["tokenizer"], data["vocab_size"]
    ours = f"the database {getattr(db, 'path', '')}".rstrip() + f" uses {name!r} ({size} tokens)"
    base_name = source or getattr(base, "name_or_path", "") or type(base).__name__
    fix = f"build one with its tokenizer (`retlm build-db TEXTS --out DB --tokenizer {base_name}`)"
    vocab_size = int(base.config.vocab_size)

    def mismatch(theirs: str) -> TokenizerMismatch:
        return TokenizerMismatch(f"tokenizer mismatch: {ours} but the base {base_name} {theirs}; {fix}")

    trained = getattr(base.config, "retlm_data", None) or {}
    if trained.get("tokenizer") or trained.get("vocab_size"):
        recorded = (trained.get("tokenizer"), trained.get("vocab_size"))
        shas = (trained.get("tokenizer_sha256"), data.get("tokenizer_sha256"))
        if recorded != (name, size) or (all(shas) and shas[0] != shas[1]):
            raise mismatch(f"was trained with {recorded[0]!r} ({recorded[1]} tokens)")
        return
    if size > vocab_size:
        raise mismatch(f"has only {vocab_size} token embeddings")
    theirs = _tokenizer_of_base(source)
    db_tokenizer = getattr(db, "tokenizer", None)
    if theirs is not None and hasattr(db_tokenizer, "get_vocab"):
        base_vocab, db_vocab = theirs.get_vocab(), db_tokenizer.get_vocab()
        differ = [tok for tok, i in db_vocab.items() if base_vocab.get(tok) != i and i < vocab_size]
        if differ:
            raise mismatch(
                f"uses {getattr(theirs, 'name_or_path', '?')!r} ({len(base_vocab)} tokens; "
                f"{len(differ)} of the database's tokens have other ids there, e.g. {differ[0]!r})"
            )
        return
    if size != vocab_size:
        raise mismatch(f"has {vocab_size} token embeddings and no tokenizer to compare")


def retrofit(
    base: Any,
    db: Any,
    out_dir: str | os.PathLike[str],
    *,
    cca_layers: list[int] | None = None,
    **options: Any,
) -> TrainResult:
    """RETRO-fit ``base`` on ``db`` into ``out_dir`` and return the training result.

    ``base``: a model, a known name (``smollm2-135m``), a .gguf file, a model folder, a retlm run
    directory (its final model) or a Hub id; the saved config names it the same way (a path made
    absolute), so the adapter finds its base again.
    ``db``: a ``RetrievalDatabase`` or its path; its tokenizer must be the base's (else
    :class:`TokenizerMismatch`). ``cca_layers``: 1-based decoder layers a chunked cross-attention follows
    (default: every third from the sixth; see :func:`~retlm.models.retrofit.default_cca_layers`).
    ``options``: the adapter's shape (``enc_dim``, ``enc_depth``, ``heads``, ``dim_head``, ``rotary_dim``,
    ``ff_mult``, dropouts) and the fields of :class:`~retlm.training.TrainOptions`. For a base trained
    by retlm, ``train_fraction`` and ``seed`` default to the base's, so that the documents it held out
    stay held out (a different split is refused).
    """
    from retlm.models.retrofit import RetroFitForCausalLM, load_base

    db = open_database(db)
    adapter = {name: options.pop(name) for name in ADAPTER_OPTIONS if options.get(name) is not None}
    for name in ADAPTER_OPTIONS:
        options.pop(name, None)
    source = None
    if not hasattr(base, "config"):
        source = resolve_base(base)
        base = load_base(source)
    else:
        source = getattr(base, "name_or_path", None) or None
    check_tokenizer(base, source, db)
    split = (getattr(base.config, "retlm_data", None) or {}).get("split")
    if split:
        for name in ("train_fraction", "seed"):
            given = options.get(name)
            if given is not None and given != split[name]:
                raise ValueError(
                    f"the base was trained with {name}={split[name]}; retrofitting with {name}={given} "
                    "would train on documents it held out. Keep the base's split"
                )
            options[name] = split[name]
    for name in ("train_fraction", "seed"):  # None: the base's, else TrainOptions' default
        if options.get(name, 0) is None:
            del options[name]
    model = RetroFitForCausalLM.from_base(
        base,
        chunk_size=int(db.chunk_size),
        pad_id=int(db.pad_id),
        cca_layers=cca_layers,
        seed=int(options.get("seed", 0)),
        base_name_or_path=source,
        **adapter,
    )
    return train(db, model.config, out_dir, model=model, **options)
