"""Support for the robustness tests (integrity, bounds, locks, usage errors, fuzzing): a small real
database built from a folder, a RETRO trained two steps on it, byte flips, and an in-process CLI runner
that returns the exit code and both output streams like a subprocess would."""

from __future__ import annotations

import contextlib
import io
import shutil
from dataclasses import dataclass
from pathlib import Path

from training_helpers import tiny_model_config

C, SEQ = 16, 64
# training_helpers' tiny RETRO (RetNet decoder) without what the database decides: a --model-config
TINY_MODEL = {
    k: v for k, v in tiny_model_config().items() if k not in ("num_tokens", "max_seq_len", "chunk_size")
}


def write_corpus(folder: Path, n_docs: int = 10, chars: int = 900) -> Path:
    from retlm.demo.corpus import pydoc_topics

    folder.mkdir(parents=True, exist_ok=True)
    for name, text in list(pydoc_topics())[:n_docs]:
        (folder / f"{name}.txt").write_text(text[:chars])
    return folder


def build_db(corpus: Path, out: Path, embedder: str, **options):
    from retlm.retrieval import RetrievalDatabase

    settings = dict(
        chunk_size=C,
        seq_len=SEQ,
        num_neighbors=2,
        embedder=embedder,
        embedding_dtype="float32",
        batch_size=64,
        progress=False,
    )
    return RetrievalDatabase.build(corpus, out, **{**settings, **options})


def train_tiny(db, out: Path) -> Path:
    from retlm.training import train

    train(
        db,
        dict(TINY_MODEL),
        out,
        max_steps=2,
        batch_size=2,
        save_every=None,
        eval_every=None,
        progress=False,
        lr=1e-3,
    )
    return out / "model"


def flip(path: Path, offset: int | None = None, count: int = 1) -> None:
    """XOR ``count`` bytes of ``path`` with 0xFF from ``offset`` (default: the middle)."""
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    for i in range(offset, min(offset + count, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def copy_tree(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(".lock"))
    return target


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.err.strip().splitlines() if line.strip()]


def cli(*args) -> Result:
    """``retlm ARGS`` in this process: exit code (SystemExit included), stdout and stderr."""
    from retlm.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    return Result(int(code or 0), out.getvalue(), err.getvalue())


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def build_args(robust, corpus, out, *extra) -> tuple:
    """``retlm build-db`` CORPUS --out OUT with the settings of ``build_db`` (the ``robust`` fixture's
    embedder), then ``extra``."""
    return (
        "build-db",
        corpus,
        "--out",
        out,
        "--chunk-size",
        C,
        "--seq-len",
        SEQ,
        "--embedder",
        robust.embedder,
        "--embedding-dtype",
        "float32",
        "--no-progress",
        *extra,
    )
