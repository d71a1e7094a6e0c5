"""`retlm demo`: the whole workflow on the bundled corpus (or a folder of your own text), on a CPU.

1. build the retrieval database (GPT-2 byte-level BPE chunks by default; ``tokenizer="bert"``: retro-pytorch's
   single WordPiece vocabulary);
2. a pretrained LM (``pretrained``, SmolLM2-135M by default, offline), frozen: held-out bits per byte
   without retrieval, with in-context retrieval and with unrelated neighbors
   (:mod:`retlm.demo.pretrained`);
3. its continuations of prompts taken from held-out documents (the first chunk of each, cut back to its
   last sentence end; or ``prompt``), with the passages it read and their sources;
4. train a small RETRO with the RetNet decoder from scratch on ~90% of the documents (the same split),
   within a time budget (with ``baseline=True``: also the same model trained with no retrieval at all, the
   paper's control); evaluate held-out perplexity and bits per byte with retrieval and with it switched off;
5. generate from the same prompts with it, retrieving at chunk boundaries with the prompt's own document
   excluded, and show every neighbor read, with the name of its source document;
6. write ``loss.png`` (training and validation curves) and ``report.json`` (scores and generations), and
   end with both models' held-out figures side by side.

Every step resumes: a second run (or a run after a kill) reuses the finished database, checkpoints and
evaluations in the work directory instead of redoing them.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retlm.demo.display import say, show_continuation
from retlm.options import option, option_from, zero_is_none
from retlm.retrieval.config import BuildConfig, BuildOptions
from retlm.utils import atomic_write, ensure_writable_dir

# Decoding defaults of the demo's generations (measured in docs/benchmarks.md, "Demo generations"): a
# model trained for minutes puts most of its mass on whitespace and on " the"; without a penalty its samples
# are runs of spaces and newlines.
REPETITION_PENALTY = 1.3
NO_REPEAT_NGRAM_SIZE = 3
BUILD_FIELDS = ("tokenizer", "retriever", "seq_len", "chunk_size", "num_neighbors")  # BuildConfig's


@dataclass
class DemoOptions:
    """The knobs of :func:`run_demo`; `retlm demo`'s options are derived from these fields (those with
    ``cli=False`` are Python keywords only)."""

    work_dir: Path = option(Path("demo-work"), help="where everything is written")
    corpus: Path | None = option(
        None, help="folder of your own text files (default: the bundled Python documentation)"
    )
    # the database's options are build-db's (BuildConfig's help and choices), with defaults of the demo's
    tokenizer: str = option_from(BuildConfig, "tokenizer")
    retriever: str = option_from(BuildConfig, "retriever", "hybrid")  # best in-context: docs/in_context.md
    pretrained: str = option(
        "smollm2-135m",
        help="pretrained LM shown reading retrieved passages in its context: a name (smollm2-135m), a model "
        "folder or a .gguf file; 'none' skips it",
    )
    pretrained_tokens: int = option(
        1024, help="held-out tokens the pretrained LM scores (each three ways: without, with, unrelated)"
    )
    minutes: float = option(3.0, help="training time budget of the RETRO trained from scratch")
    baseline: bool = option(
        False, help="also train the same model with no retrieval at all (the paper's control)"
    )
    model_config: str = option(
        "retro-tiny", help="built-in model config name or a yaml file of RetroConfig arguments"
    )
    seq_len: int = option_from(BuildConfig, "seq_len", 256)
    chunk_size: int = option_from(BuildConfig, "chunk_size", 64)
    num_neighbors: int = option_from(BuildConfig, "num_neighbors", 2)
    batch_size: int = option(8, help="training batch size")
    lr: float = option(2e-3, help="peak learning rate")
    eval_sequences: int | None = option(
        256, to_value=zero_is_none, help="held-out sequences scored at the end (0: all)"
    )
    eval_every: int = option(20, cli=False, help="steps between the validation points of the loss curve")
    prompt: str | None = option(
        None,
        help="prompt for the generation step (default: the first chunk of --num-prompts held-out documents)",
    )
    num_prompts: int = option(2, help="held-out documents whose first chunk is a prompt (without --prompt)")
    max_new_tokens: int = option(
        128, help="tokens to generate (enough to cross chunk boundaries, so retrieval happens)"
    )
    temperature: float = option(0.8, cli=False, help="sampling temperature of the generations")
    top_k: int = option(40, cli=False, help="generations sample among the k most likely tokens")
    repetition_penalty: float = option(
        REPETITION_PENALTY,
        help="generations: divide the positive logits of tokens already in the text by this (1: off)",
    )
    no_repeat_ngram_size: int = option(
        NO_REPEAT_NGRAM_SIZE, help="generations never repeat an n-gram of this many tokens (0: off)"
    )
    seed: int = option(0, help="seed of initialisation, data order, split")
    progress: bool = option(True, negate=True, help="hide progress bars")

    def validate(self) -> None:
        """Every option, before the first step (``retlm.demo.checks``: ranges, the prompt, the corpus,
        the model config, and whether a training step fits in memory)."""
        from retlm.demo.checks import check_options

        check_options(self)

    def build_options(self) -> BuildOptions:
        """The options the demo builds its database with: its own ``BUILD_FIELDS``, every file of a
        ``corpus`` folder (binary ones are skipped) or the bundled corpus's ``.txt`` files; the rest are
        build-db's defaults."""
        glob = "*.txt" if self.corpus is None else "**/*"
        shared = {name: getattr(self, name) for name in BUILD_FIELDS}
        return BuildOptions(**shared, glob=glob, progress=self.progress)


def _cached(path: Path, key: dict[str, Any], compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``compute()``, or its stored result when ``path`` holds one for the same ``key``."""
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("key") == key:
            return stored["value"]
    value = compute()
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps({"key": key, "value": value}, indent=2)))
    return value


def build_database(opts: DemoOptions) -> Any:
    from retlm.demo.corpus import write_python_docs_corpus
    from retlm.retrieval import RetrievalDatabase

    db_dir = opts.work_dir / "db"
    if (db_dir / "manifest.json").is_file():
        hint = f"; delete {opts.work_dir} or pass another --work-dir"
        try:
            db = RetrievalDatabase.open(db_dir)
        except ValueError as err:  # e.g. a database of an older format
            raise ValueError(f"{err}{hint}") from None
        if db.retriever != opts.retriever:
            built = f"{db_dir} was built with --retriever {db.retriever}"
            raise ValueError(f"{built}, not {opts.retriever}{hint}")
        if db.tokenizer_name != opts.tokenizer:
            raise ValueError(
                f"{db_dir} was built with tokenizer {db.tokenizer_name!r}, not {opts.tokenizer!r}{hint}"
            )
        say(f"[1/6] database: reusing {db_dir} ({db.num_chunks} chunks, tokenizer {db.tokenizer_name})")
        return db
    corpus = opts.corpus
    if corpus is None:
        corpus = write_python_docs_corpus(opts.work_dir / "corpus", progress=opts.progress)
    start = time.perf_counter()
    db = RetrievalDatabase.build(corpus, db_dir, opts.build_options())
    say(
        f"[1/6] database: {db.num_chunks} chunks of {db.chunk_size} {db.tokenizer_name} tokens from "
        f"{db.num_docs} documents of {corpus} in {time.perf_counter() - start:.0f} s -> {db_dir}"
    )
    return db


def train_model(opts: DemoOptions, db: Any, *, retrieval: bool, max_steps: int | None = None) -> Any:
    """Train within ``opts.minutes``; the control (``retrieval=False``) instead gets ``max_steps``, the
    steps the retrieval model made, so that both see the same tokens (with twice the time as a cap)."""
    from retlm.training import train

    run_dir = opts.work_dir / ("run" if retrieval else "run-no-retrieval")
    minutes = opts.minutes if max_steps is None else 2 * opts.minutes
    result = train(
        db,
        opts.model_config,
        run_dir,
        minutes=minutes,
        max_steps=max_steps,
        lr=opts.lr,
        batch_size=opts.batch_size,
        seq_len=opts.seq_len,
        seed=opts.seed,
        retrieval=retrieval,
        eval_every=opts.eval_every,
        eval_sequences=32,
        save_every=50,
        progress=opts.progress,
    )
    what = "with retrieval" if retrieval else "without retrieval (control)"
    verb = "reused" if result.stop_reason == "already_finished" else "trained"
    loss = f", last training loss {result.last_train_loss:.3f}" if result.last_train_loss is not None else ""
    say(
        f"[4/6] model {what}: {verb} {result.global_step} steps in {result.elapsed_s / 60:.1f} min{loss} "
        f"-> {result.model_dir}"
    )
    return result


def evaluate_model(opts: DemoOptions, db: Any, trained: Any) -> dict[str, Any]:
    from retlm.training import evaluate

    key = {"step": trained.global_step, "model": str(trained.model_dir), "sequences": opts.eval_sequences}
    return _cached(
        trained.run_dir / "demo-eval.json",
        key,
        lambda: evaluate(trained.model_dir, db, max_sequences=opts.eval_sequences, progress=opts.progress),
    )


_SENTENCE_END = re.compile(r"[.!?](?=\s)")


def prose_prompt(chunk: str) -> str | None:
    """``chunk`` cut back to the end of its last sentence (``.``, ``!`` or ``?`` followed by whitespace),
    when that keeps at least half of it; None when it has no such sentence end (a chunk that ends in a
    table, a grammar rule, a code example or a list of headings, where a minutes-old model writes junk)."""
    ends = [m.end() for m in _SENTENCE_END.finditer(chunk)]
    if not ends or ends[-1] < len(chunk) // 2:
        return None
    return chunk[: ends[-1]]


def held_out_prompts(opts: DemoOptions, db: Any) -> list[dict[str, Any]]:
    """``num_prompts`` prompts from held-out documents of at least two chunks (the documents the demo's
    RETRO holds out: training's default split with ``opts.seed``), each the document's first chunk cut back
    to its last sentence end (:func:`prose_prompt`); documents whose first chunk has none are skipped,
    unless no held-out document has one (then the first chunk is cut back to its last line end when that
    keeps at least half of it). Or ``opts.prompt``."""
    from retlm.data import DocumentSplit
    from retlm.training.options import TrainOptions

    if opts.prompt is not None:
        return [{"doc_id": None, "document": None, "prompt": opts.prompt}]
    doc_ids = np.asarray(db.doc_ids)
    split = DocumentSplit.make(doc_ids, TrainOptions().train_fraction, opts.seed)
    starts = np.flatnonzero(np.r_[True, doc_ids[1:] != doc_ids[:-1]])
    lengths = np.diff(np.r_[starts, len(doc_ids)])
    first_chunk = dict(zip(doc_ids[starts].tolist(), starts.tolist(), strict=True))
    chunks_of = dict(zip(doc_ids[starts].tolist(), lengths.tolist(), strict=True))
    heldout = [d for d in split.heldout_docs.tolist() if chunks_of.get(d, 0) >= 2]
    if not heldout:
        heldout = [d for d in first_chunk if chunks_of[d] >= 2] or list(first_chunk)
    texts = {d: db.chunk_text(first_chunk[d]) for d in heldout}
    prose = {d: prose_prompt(texts[d]) for d in heldout}
    if any(p is not None for p in prose.values()):
        heldout = [d for d in heldout if prose[d] is not None]
    rng = np.random.default_rng(opts.seed)
    picked = sorted(rng.choice(heldout, size=min(opts.num_prompts, len(heldout)), replace=False).tolist())
    prompts = []
    for doc in picked:
        text = prose[doc]
        if text is None:
            text = texts[doc]
            cut = text.rfind("\n")
            if cut >= len(text) // 2:
                text = text[: cut + 1]
        prompts.append({"doc_id": int(doc), "document": db.doc_name(int(doc)), "prompt": text})
    return prompts


def generate_samples(
    opts: DemoOptions, db: Any, model: Any, prompts: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Generate from each prompt and print it readably; the records of ``report.json``'s generations."""
    from retlm.generation import generate_text, print_neighbors

    source = (
        "the first chunk of a held-out document, to its last sentence end"
        if opts.prompt is None
        else "--prompt"
    )
    say(
        f"[5/6] generation: {len(prompts)} prompt(s), each {source}; {opts.max_new_tokens} new tokens "
        f"sampled (temperature {opts.temperature}, top-k {opts.top_k}, repetition penalty "
        f"{opts.repetition_penalty}, no repeated {opts.no_repeat_ngram_size}-gram), retrieving at every "
        f"{db.chunk_size}-token chunk boundary"
        + (", the prompt's own document excluded" if opts.prompt is None else "")
    )
    records = []
    for i, p in enumerate(prompts, 1):
        generated = generate_text(
            model,
            db,
            p["prompt"],
            max_new_tokens=opts.max_new_tokens,
            seed=opts.seed + i,
            do_sample=True,
            temperature=opts.temperature,
            top_k=opts.top_k,
            repetition_penalty=opts.repetition_penalty,
            no_repeat_ngram_size=opts.no_repeat_ngram_size,
            exclude_doc_id=p["doc_id"],
            eos_token_id=int(db.eos_id),
        )
        title, reading = f"prompt {i} of {len(prompts)}", "what the model read, chunk by chunk"
        show_continuation(title, p["document"], generated.prompt, generated.continuation, reading)
        print_neighbors(generated)
        records.append(
            {
                **p,
                "continuation": generated.continuation,
                "text": generated.text,
                "chunks": [
                    {"query": query, "neighbors": [n.__dict__ for n in ns]} for query, ns in generated.chunks
                ],
            }
        )
    say("")
    return records


def _scores_line(scores: dict[str, Any]) -> str:
    bpb = scores.get("bits_per_byte")
    return f"{scores['perplexity']:.2f}" + ("" if bpb is None else f" ({bpb:.4f} bits per byte)")


def run_demo(opts: DemoOptions) -> dict[str, Any]:
    """Run the six steps (see the module docstring); returns the report also written to report.json."""
    opts.validate()  # every option, before the first step
    opts.work_dir = Path(opts.work_dir)
    ensure_writable_dir(opts.work_dir, "work directory", "; pass --work-dir DIR with a writable folder")
    db = build_database(opts)
    prompts = held_out_prompts(opts, db)
    pretrained = None
    if opts.pretrained.lower() != "none":
        from retlm.demo.pretrained import run_pretrained

        pretrained = run_pretrained(opts, db, prompts, _cached)

    trained = train_model(opts, db, retrieval=True)
    control = None
    if opts.baseline:
        control = train_model(opts, db, retrieval=False, max_steps=trained.global_step)

    scores = evaluate_model(opts, db, trained)
    with_r, without_r = scores["with_retrieval"], scores["without_retrieval"]
    say(
        f"[4/6] held-out ({scores['documents']} documents, {scores['tokens']} tokens, {scores['bytes']} "
        f"bytes): perplexity {_scores_line(with_r)} with retrieval, {_scores_line(without_r)} without"
    )
    control_scores = evaluate_model(opts, db, control) if control is not None else None
    if control_scores is not None:
        say(
            f"      control trained without retrieval: perplexity "
            f"{_scores_line(control_scores['without_retrieval'])}"
        )

    from retlm.training import load_model, plot_loss_curves

    model = load_model(trained.model_dir)
    generations = generate_samples(opts, db, model, prompts)

    runs = {"RETRO": trained.metrics_file}
    if control is not None:
        runs["control, trained without retrieval"] = control.metrics_file
    png = plot_loss_curves(runs, opts.work_dir / "loss.png", title="retlm demo: RETRO with a RetNet decoder")
    report = {
        "database": {
            "path": str(db.path),
            "chunks": int(db.num_chunks),
            "chunk_size": int(db.chunk_size),
            "neighbors": int(db.num_neighbors),
            "tokenizer": db.tokenizer_name,
        },
        "training": {
            "steps": trained.global_step,
            "minutes": round(trained.elapsed_s / 60, 2),
            "budget_minutes": opts.minutes,
            "model_dir": str(trained.model_dir),
            "model_config": opts.model_config,
        },
        "heldout": scores,
        "control_no_retrieval_training": control_scores,
        "pretrained": pretrained,
        "generations": generations,
        "loss_png": str(png),
    }
    report_file = opts.work_dir / "report.json"
    atomic_write(report_file, lambda tmp: tmp.write_text(json.dumps(report, indent=2)))
    say(f"[6/6] loss curves -> {png}; report -> {report_file}")
    for line in side_by_side(opts, pretrained, trained, scores):
        say(line)
    return report


def side_by_side(
    opts: DemoOptions, pretrained: dict[str, Any] | None, trained: Any, scores: dict[str, Any]
) -> list[str]:
    """The demo's last lines: held-out bits per byte of both models, without and with retrieval (and, for
    the pretrained LM, with unrelated neighbors), then the RETRO's perplexities and their ratio."""

    def cell(value: float | None, base: float | None = None) -> str:
        if value is None:
            return "-"
        change = f" ({100 * (value / base - 1):+.1f}%)" if base else ""
        return f"{value:.4f}{change}"

    rows = [("held-out bits per byte", "without retrieval", "with retrieval", "unrelated neighbors")]
    if pretrained is not None:
        r = pretrained["heldout"]
        off, on, other = (
            r[v]["bits_per_byte"] for v in ("without_retrieval", "with_retrieval", "unrelated_neighbors")
        )
        rows.append((f"{opts.pretrained} (pretrained, frozen)", cell(off), cell(on, off), cell(other, off)))
    off, on = scores["without_retrieval"]["bits_per_byte"], scores["with_retrieval"]["bits_per_byte"]
    rows.append((f"RETRO trained here ({trained.global_step} steps)", cell(off), cell(on, off), "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(text.ljust(w) for text, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    with_r, without_r = scores["with_retrieval"], scores["without_retrieval"]
    lines.append(f"held-out perplexity with retrieval:    {_scores_line(with_r)}")
    lines.append(f"held-out perplexity without retrieval: {_scores_line(without_r)}")
    lines.append(f"ratio (without / with): {without_r['perplexity'] / with_r['perplexity']:.3f}")
    return lines
