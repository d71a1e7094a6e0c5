"""The ``README.md`` of a run's ``model/`` folder: a model card in the Hugging Face Hub's format.

YAML front matter (``huggingface_hub.ModelCardData``: ``library_name``, ``pipeline_tag``, ``tags``,
``base_model`` for a RETRO-fit of a Hub model, ``datasets`` for a database built from Hub datasets), then
what a reader of the card needs: the architecture and its size, the retrieval database (documents,
chunks, tokenizer, embedder, where the documents came from), the training figures, the held-out
evaluation with and without retrieval, and how to load the model. ``push_to_hub`` of the folder then
publishes it as it is.

Written by ``retlm.training.run_files`` into the staging folder, before the folder is sealed and
committed, from the run's own files (``retlm_run.json``, ``metrics.jsonl``) and the model's config.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from retlm.training import checkpoint as ckpt
from retlm.training.callbacks import read_metrics

CARD_FILE = "README.md"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def database_summary(db: Any) -> dict[str, Any]:
    """What the card says of the database a run trains on (from its manifest)."""
    manifest = getattr(db, "manifest", None) or {}
    tokenizer = manifest.get("tokenizer") or {}
    return {
        "path": str(getattr(db, "path", "")),
        "documents": manifest.get("num_docs"),
        "chunks": manifest.get("num_chunks"),
        "chunk_size": manifest.get("chunk_size"),
        "neighbors": manifest.get("num_neighbors"),
        "tokenizer": tokenizer.get("name") if isinstance(tokenizer, dict) else tokenizer,
        "vocab_size": tokenizer.get("vocab_size") if isinstance(tokenizer, dict) else None,
        "embedder": manifest.get("embedder"),
        "index_type": manifest.get("index_type"),
        "sources": [
            {key: entry.get(key) for key in ("source", "format", "documents", "text_field")}
            for entry in manifest.get("sources", [])
        ],
    }


def is_hub_id(name: Any) -> bool:
    """``owner/name`` that is not a local path: what the Hub accepts as ``base_model``."""
    return isinstance(name, str) and bool(_HUB_ID.fullmatch(name)) and not os.path.exists(name)


def write_model_card(
    model_dir: Path, run_dir: Path, config: Any, *, global_step: int, num_parameters: int | None = None
) -> Path:
    """Write ``model_dir/README.md`` for the model of ``run_dir`` trained ``global_step`` steps."""
    from huggingface_hub import ModelCard, ModelCardData

    run_file = Path(run_dir) / ckpt.RUN_FILE
    run = ckpt.read_json(run_file) if run_file.is_file() else {}
    metrics_file = Path(run_dir) / ckpt.METRICS_FILE
    records = (
        [r for r in read_metrics(metrics_file) if r.get("step", 0) <= global_step]
        if (metrics_file.is_file())
        else []
    )
    database = run.get("database_summary") or {}
    base = getattr(config, "base_model_name_or_path", None)
    model_type = str(getattr(config, "model_type", "model"))
    data = ModelCardData(
        library_name="retlm",
        pipeline_tag="text-generation",
        tags=_tags(config),
        base_model=base if is_hub_id(base) else None,
        datasets=[s["source"] for s in database.get("sources", []) if s.get("format") == "hf-hub"] or None,
    )
    sections = [
        f"# {model_type} trained with retlm",
        _architecture(config, num_parameters, base),
        _database_section(database),
        _training_section(run, records, global_step),
        _evaluation_section(records),
        _usage_section(model_type),
    ]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(s for s in sections if s) + "\n")
    path = Path(model_dir) / CARD_FILE
    card.save(path)
    return path


def _tags(config: Any) -> list[str]:
    tags = ["retlm", str(getattr(config, "model_type", ""))]
    if getattr(config, "model_type", "") in ("retro", "retrofit"):
        tags.append("retrieval-augmented-generation")
    if getattr(config, "decoder_type", None) == "retnet" or getattr(config, "model_type", "") == "retnet":
        tags.append("retnet")
    return list(dict.fromkeys(t for t in tags if t))


def _architecture(config: Any, num_parameters: int | None, base: Any) -> str:
    lines = ["## Model", "", f"- architecture: `{', '.join(getattr(config, 'architectures', None) or [])}`"]
    if num_parameters:
        lines.append(f"- parameters: {num_parameters:,}")
    if base:
        lines.append(f"- base model (frozen; only the retrieval adapter was trained): `{base}`")
    for name, what in (("decoder_type", "decoder"), ("chunk_size", "retrieval chunk size (tokens)")):
        if getattr(config, name, None) is not None:
            lines.append(f"- {what}: {getattr(config, name)}")
    return "\n".join(lines)


def _database_section(database: dict[str, Any]) -> str:
    if not database:
        return ""
    d = database
    lines = [
        "## Retrieval database",
        "",
        "| documents | chunks | chunk size | neighbors | tokenizer | embedder | index |",
        "|---|---|---|---|---|---|---|",
        f"| {d.get('documents')} | {d.get('chunks')} | {d.get('chunk_size')} | {d.get('neighbors')} "
        f"| {d.get('tokenizer')} ({d.get('vocab_size')} tokens) | {d.get('embedder')} "
        f"| {d.get('index_type')} |",
    ]
    for source in database.get("sources", []):
        field = f", text field `{source['text_field']}`" if source.get("text_field") else ""
        lines.append(
            f"- source: `{source['source']}` ({source['format']}{field}): {source['documents']} documents"
        )
    return "\n".join(lines)


_DATABASE_KEYS = (
    "documents",
    "chunks",
    "chunk_size",
    "neighbors",
    "tokenizer",
    "vocab_size",
    "embedder",
    "index_type",
)


def _training_section(run: dict[str, Any], records: list[dict[str, Any]], global_step: int) -> str:
    options = run.get("options", {})
    losses = [r["loss"] for r in records if "loss" in r]
    rows = [
        ("steps", f"{global_step} (planned {run.get('max_steps', '?')})"),
        ("training sequences", run.get("train_sequences")),
        ("held-out sequences", run.get("heldout_sequences")),
        ("sequence length", (run.get("fixed") or {}).get("seq_len")),
        ("batch size x accumulation", f"{options.get('batch_size')} x {options.get('grad_accum', 1)}"),
        ("learning rate", options.get("lr")),
        ("precision", options.get("precision")),
        ("processes", (run.get("fixed") or {}).get("world_size")),
        ("retrieval while training", options.get("retrieval")),
        ("last training loss", f"{losses[-1]:.4f}" if losses else None),
    ]
    elapsed = [r["elapsed_s"] for r in records if "elapsed_s" in r]
    if elapsed:
        rows.append(("training time", f"{elapsed[-1] / 60:.1f} min"))
    table = "\n".join(f"| {name} | {value} |" for name, value in rows if value is not None)
    return f"## Training\n\n| | |\n|---|---|\n{table}"


def _evaluation_section(records: list[dict[str, Any]]) -> str:
    evals = [r for r in records if "eval_loss" in r]
    if not evals:
        return "## Evaluation\n\nNo held-out evaluation was run during training (`retlm eval RUN --db DB`)."
    last = evals[-1]
    rows = [("with retrieval", last["eval_loss"], last.get("eval_perplexity"))]
    if "eval_loss_no_retrieval" in last:
        rows.append(
            ("without retrieval", last["eval_loss_no_retrieval"], last.get("eval_perplexity_no_retrieval"))
        )
    body = "\n".join(f"| {name} | {loss:.4f} | {ppl:.2f} |" for name, loss, ppl in rows)
    return (
        f"## Evaluation\n\nHeld-out documents, at step {last.get('step')} (token-level):\n\n"
        f"| | loss | perplexity |\n|---|---|---|\n{body}"
    )


def _usage_section(model_type: str) -> str:
    retrieval = (
        'Generation with retrieval needs the database: `retlm generate RUN --db DB "prompt"`.'
        if model_type in ("retro", "retrofit")
        else ""
    )
    return (
        "## Use\n\n```python\nimport retlm  # registers retlm's model types with the Auto classes\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")\n```\n\n' + retrieval
    ).rstrip()
