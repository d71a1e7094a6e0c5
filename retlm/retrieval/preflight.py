"""Everything a build checks before it writes a byte: options, the embedder, the source, disk and memory.

``check_build`` runs first in ``RetrievalDatabase.build`` (and so in ``retlm build-db``):

- every option's type and range, the shard and stage, and the faiss ``index_factory`` string (parsed by
  faiss itself) -> ``OptionError`` (CLI exit code 2);
- the embedder is a bundled name, a local folder or a model in the local Hugging Face cache (nothing is
  downloaded), and ``chunk_size + 2`` fits its position limit -> ``OptionError``;
- the source exists and has something to read: a folder has a matching file with some text, a record
  file's schema (or first record) has the text field -> ``SourceError`` / ``EmptySourceError``
  (``retlm.retrieval.sources``);
- the disk space and memory the build needs (estimated from the source's size, lower bounds) are free
  -> ``ResourceError`` quoting both figures (exit code 1).

``resolve_local_model`` is also what a database uses to find the embedder its manifest names: a name
that is not on this machine is refused, never fetched.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from retlm.errors import OptionError, ResourceError, format_bytes, short_repr
from retlm.retrieval.config import option_name
from retlm.retrieval.format import (
    CHUNKING_FILE,
    CHUNKS_FILE,
    DOC_IDS_FILE,
    EMBEDDINGS_FILE,
    INDEX_FILE,
    KNN_FILE,
    MANIFEST_FILE,
)
from retlm.retrieval.sources import Source, SourceOptions, open_source
from retlm.utils import available_memory_bytes, free_disk_bytes

BYTES_PER_TOKEN_BOUND = 8  # English text averages ~4 bytes per BPE or WordPiece token; 8 keeps it a bound
MAX_SEQ_LEN = 1 << 24  # a sanity bound: no model trains on 16M-token sequences


# ---- the embedder ----


def resolve_local_model(name: str, what: str = "embedder") -> str:
    """The local folder of a model name: the bundled MiniLM, a folder, or a Hugging Face cache snapshot.

    Raises ``OptionError`` for anything else: nothing is downloaded.
    """
    from retlm.tokenization import DEFAULT_ALIASES, resolve_model_path

    if not isinstance(name, str) or not name:
        raise OptionError(f"{what} must be a model name or folder, got {short_repr(name)}")
    if name in DEFAULT_ALIASES:
        return resolve_model_path(name)
    folder = Path(name).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise OptionError(f"{what} {name}: the folder holds no config.json (not a Hugging Face model)")
        return str(folder)
    if folder.exists():
        raise OptionError(f"{what} {name}: not a folder")
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep == "\\" and "\\" in name:
        raise OptionError(f"{what} {name}: no such folder")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, local_files_only=True)
    except Exception:  # not cached, or not a valid repo id
        raise OptionError(
            f"{what} {short_repr(name)}: no such folder, and not in the local Hugging Face cache (retlm "
            "downloads nothing; give a model folder, or the bundled all-MiniLM-L6-v2)"
        ) from None


@dataclass(frozen=True)
class EmbedderShape:
    """What the build needs to know about an embedder before loading it."""

    folder: str
    hidden_size: int
    max_positions: int
    heads: int
    layers: int


def embedder_shape(name: str) -> EmbedderShape:
    """Read the embedder's config.json (no weights): its width, position limit, heads and layers."""
    from transformers import AutoConfig

    folder = resolve_local_model(name)
    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as err:  # a broken folder: its config cannot be read
        raise OptionError(
            f"embedder {name}: cannot read its config.json ({type(err).__name__}: {err})"
        ) from None
    limit = getattr(config, "max_position_embeddings", None) or 512
    return EmbedderShape(
        folder=folder,
        hidden_size=int(config.hidden_size),
        max_positions=int(limit),
        heads=int(getattr(config, "num_attention_heads", 1) or 1),
        layers=int(getattr(config, "num_hidden_layers", 1) or 1),
    )


# ---- estimates ----


@dataclass(frozen=True)
class BuildEstimate:
    """Lower bounds of what a build needs, from the source's size: ``disk`` and ``memory`` in bytes."""

    chunks: int
    disk: int
    memory: int
    parts: dict[str, int]

    def describe(self) -> str:
        return ", ".join(f"{name} {format_bytes(size)}" for name, size in self.parts.items())


def chunks_lower_bound(file_sizes: list[int], chunk_size: int) -> int:
    """At least this many chunks come out of files of these sizes (one per non-empty file, at least)."""
    return sum(math.ceil(size / (BYTES_PER_TOKEN_BOUND * chunk_size)) for size in file_sizes if size)


def estimate_build(n: int, config: Any, shape: EmbedderShape) -> BuildEstimate:
    """Disk and memory of a build of ``n`` chunks (lower bounds when ``n`` is ``chunks_lower_bound``).

    chunks.dat, doc_ids.dat, embeddings.dat, knn.dat and the index grow with the number of chunks. In
    memory: the index (float32 for Flat; for the default IVF index a 4-bit PQ code of ``dim / 8`` bytes,
    a float16 copy for the re-rank and an 8-byte id; a byte per dimension for any other factory, a lower
    bound), one document's row while chunking, and one encoder layer's attention scores and activations
    for a batch.
    """
    c, k, dim, factory = config.chunk_size, config.num_neighbors, shape.hidden_size, config.index_factory
    itemsize = 2 if config.embedding_dtype == "float16" else 4
    exact = factory is None and n < config.exact_threshold or factory in ("Flat", "IDMap,Flat")
    per_vector = 4 * dim if exact else dim // 8 + 2 * dim + 8 if factory is None else dim
    parts = {
        CHUNKS_FILE: n * (c + 1) * 4,
        DOC_IDS_FILE: n * 4,
        EMBEDDINGS_FILE: n * dim * itemsize,
        KNN_FILE: n * k * 4,
        INDEX_FILE: n * per_vector,
    }
    width = c + 2
    batch = min(config.batch_size, max(n, 1))
    memory = max(
        n * per_vector,  # the index, in memory while it is built and searched
        2 * (c + 1) * 4,  # a document's row as it is cut (and its copy)
        batch * shape.heads * width * width * 4 + batch * width * dim * 4 * 4,  # one encoder layer
    )
    return BuildEstimate(chunks=n, disk=sum(parts.values()), memory=memory, parts=parts)


def check_resources(estimate: BuildEstimate, out: Path) -> None:
    """Refuse a build whose estimate exceeds the free disk space or the available memory."""
    free = free_disk_bytes(out)
    if estimate.disk > free:
        raise ResourceError(
            f"building {out} needs at least {format_bytes(estimate.disk)} of disk (about {estimate.chunks} "
            f"chunks: {estimate.describe()}), but only {format_bytes(free)} are free there; "
            "nothing was written"
        )
    available = available_memory_bytes()
    if estimate.memory > available:
        raise ResourceError(
            f"building {out} needs at least {format_bytes(estimate.memory)} of memory (about "
            f"{estimate.chunks} chunks; the index or one encoder batch), but only {format_bytes(available)} "
            "are available; lower --chunk-size or --batch-size, or use an IVF index"
        )


# ---- options ----


def check_index_factory(factory: str | None, dim: int) -> None:
    """Let faiss parse ``factory`` for ``dim``-d inner-product vectors; refuse what it cannot build."""
    if factory is None:
        return
    if not isinstance(factory, str) or not factory.strip():
        raise OptionError(f"index_factory must be a faiss index_factory string, got {short_repr(factory)}")
    import faiss

    try:
        faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        text = str(err).strip().splitlines()
        reason = text[-1] if text else ""
        raise OptionError(
            f"index_factory {short_repr(factory)} is not a faiss index_factory string for {dim}-d vectors "
            f"(faiss: {reason.split('Error: ')[-1][:200]}); examples: 'Flat', 'IVF1024,SQ8', 'HNSW32'"
        ) from None


def check_index_fits(factory: str | None, num_chunks: int, num_neighbors: int | None = None) -> None:
    """Checked after chunking, before embedding: the neighbors per chunk cannot exceed the chunks, and
    an IVF index needs at least as many vectors as lists to train on."""
    if num_neighbors is not None and num_chunks and num_neighbors > num_chunks:
        raise OptionError(
            f"num_neighbors must be at most the number of chunks ({num_chunks}), got {num_neighbors}"
        )
    if factory is None or num_chunks == 0:
        return
    import re

    match = re.search(r"IVF(\d+)", factory)
    if match and int(match.group(1)) > num_chunks:
        raise OptionError(
            f"index_factory {short_repr(factory)} has {match.group(1)} lists but the database has only "
            f"{num_chunks} chunks to train them on; use fewer lists or 'Flat'"
        )


def check_options(config: Any, flags: bool = False) -> EmbedderShape:
    """Types and ranges of every build option (``BuildConfig.validate``), and those that depend on the
    embedder. ``flags``: messages name the options by their command-line flags (``BuildConfig.validate``)."""
    config.validate(flags)
    shape = embedder_shape(config.embedder)
    name = partial(option_name, flags=flags)
    if config.chunk_size + 2 > shape.max_positions:
        raise OptionError(
            f"{name('chunk_size')} must be at most {shape.max_positions - 2}: the embedder "
            f"{config.embedder} reads at most {shape.max_positions} positions, [CLS] and [SEP] included; "
            f"got {config.chunk_size}"
        )
    if config.seq_len > MAX_SEQ_LEN:
        raise OptionError(f"{name('seq_len')} must be at most {MAX_SEQ_LEN} tokens, got {config.seq_len}")
    check_index_factory(config.index_factory, shape.hidden_size)
    check_tokenizer(config, flags)
    return shape


def check_tokenizer(config: Any, flags: bool = False) -> None:
    """The LM tokenizer (``gpt2``, ``bert`` or a folder) loads; its errors name the file and the fix."""
    if not hasattr(config, "tokenizer"):
        return
    from retlm.tokenization import load_tokenizer

    try:
        load_tokenizer(config.tokenizer, embedder=config.embedder)
    except OptionError:
        raise
    except (OSError, ValueError) as err:  # TokenizerFilesError, FileNotFoundError, a broken folder
        shown = f"{option_name('tokenizer', flags)} {short_repr(config.tokenizer)}"
        raise OptionError(f"{shown}: {' '.join(str(err).split())}") from None


def check_build(source: Any, path: Path, config: Any, stage: str, options: SourceOptions) -> Source | None:
    """All checks of a build that can run before its first step (see the module docstring); returns the
    resolved source (None when the chunk stage has run already, or is not run)."""
    shape = check_options(config)
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OptionError(f"output {path} exists and is not a folder")
    if (path / MANIFEST_FILE).is_file():
        return None
    if stage not in ("all", "chunk"):
        if not (path / CHUNKING_FILE).is_file():
            raise OptionError(f"--stage {stage}: {path} has not been chunked; run --stage chunk first")
        return None
    if (path / CHUNKING_FILE).is_file():
        return None  # chunked by an earlier run; the rest resumes
    if source is None:
        raise OptionError("the chunk stage needs a source (a folder, a file or an iterable of strings)")
    resolved = open_source(source, options)
    resolved.check()
    sizes = resolved.size_bytes()
    if sizes:
        n = chunks_lower_bound(sizes, config.chunk_size)
        check_resources(estimate_build(n, config, shape), path)
    return resolved
