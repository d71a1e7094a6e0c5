"""In-Context RALM scoring: the fast path against the naive loop (one full forward pass per stride and
variant, Ram et al.'s ``eval_lm.py`` way), side by side on the same plan (the same windows, queries and
neighbors), in one process. Prints scored tokens/s of each, the ratio, the tokens the LM reads per scored
token, and the largest per-token difference between the two (they compute the same numbers).

    python bench/in_context.py --model /work/smollm2-hf --db /work/demo-work/db --stride 32 --context 256 \\
        --max-tokens 255

The retrieval (embedding the queries, searching) is the same for both and is timed apart.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="an HF causal LM folder")
    parser.add_argument("--db", required=True, help="a retrieval database")
    parser.add_argument("--stride", type=int, default=32)
    parser.add_argument("--query-tokens", type=int, default=32)
    parser.add_argument("--neighbors", type=int, default=2)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=255)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each, interleaved; medians")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from retlm.generation.in_context import context_limit
    from retlm.retrieval import RetrievalDatabase
    from retlm.training import in_context as ic
    from retlm.training.in_context_scoring import VARIANTS, InContextPlan, score_plan

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    db = RetrievalDatabase.open(args.db)
    start = time.perf_counter()
    docs = ic.split_documents(db, "heldout", 0.9, args.seed)
    texts = ic.document_texts(db, docs)
    windows = ic.make_windows(tokenizer, texts, docs, args.context, args.max_tokens, args.seed)
    segments = ic.make_segments(windows, args.stride, args.query_tokens, tokenizer)
    plan = InContextPlan(windows, segments, args.stride, context_limit(model))
    ic.attach_neighbors(plan, db, tokenizer, args.neighbors)
    retrieval_s = time.perf_counter() - start
    scored = sum(len(w.tokens) - 1 for w in windows)
    print(
        f"{args.model}: {scored} scored tokens in {len(windows)} windows of <= {args.context}, stride "
        f"{args.stride}, {sum(s.query is not None for s in segments)} retrievals ({retrieval_s:.1f} s); "
        f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}"
    )
    results, seconds = {}, {"fast": [], "naive": []}
    for _ in range(args.repeats):
        for name, fast in (("fast", True), ("naive", False)):
            start = time.perf_counter()
            results[name], read = score_plan(model, plan, fast=fast, batch_size=args.batch_size)
            seconds[name].append(time.perf_counter() - start)
            per = sum(read.values()) / scored
            print(
                f"{name:>5}: {seconds[name][-1]:7.1f} s, {scored / seconds[name][-1]:6.2f} scored tokens/s "
                f"(3 variants), {per:6.2f} LM tokens read per scored token "
                f"({', '.join(f'{v} {read[v]}' for v in VARIANTS)}); load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
    worst = max(
        float(np.abs(a - b).max())
        for v in VARIANTS
        for a, b in zip(results["fast"][v], results["naive"][v], strict=True)
    )
    fast_s, naive_s = (float(np.median(seconds[k])) for k in ("fast", "naive"))
    print(
        f"medians: fast {scored / fast_s:.2f}, naive {scored / naive_s:.2f} scored tokens/s; fast / naive "
        f"speed: {naive_s / fast_s:.2f}x; largest NLL difference {worst:.2e}"
    )
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
