"""How readable the demo's generations are under each decoding setting, from a finished demo's model.

    .venv/bin/python bench/demo_decoding.py demo-work                       # the demo's setting and none
    .venv/bin/python bench/demo_decoding.py demo-work --num-prompts 2 --settings \\
        '[{"temperature": 0.8, "top_k": 40}, {"temperature": 0.8, "top_k": 40, "repetition_penalty": 1.3}]'

It opens ``WORK/db`` and ``WORK/run/model`` (what ``retlm demo --work-dir WORK`` leaves), takes the demo's
own prompts (``retlm.demo.held_out_prompts``, the same seed), and generates with the demo's call
(``generate_text``: 128 new tokens, retrieval at chunk boundaries, the prompt's document excluded, seed
``i`` for prompt ``i``) once per setting. Per setting it prints each continuation and two crude measures of
readability: the share of its characters that are whitespace, and how many words (runs of ASCII letters)
it holds. Generation is the work, so a run is minutes on a 2-core box.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
from pathlib import Path
from typing import Any

DEFAULT_SETTINGS = [
    {"temperature": 0.8, "top_k": 40},
    {"temperature": 0.8, "top_k": 40, "repetition_penalty": 1.3, "no_repeat_ngram_size": 3},
]


def readability(text: str) -> tuple[float, int]:
    """(share of ``text``'s characters that are whitespace, number of words in it)."""
    spaces = sum(ch.isspace() for ch in text) / max(len(text), 1)
    return spaces, len(re.findall(r"[A-Za-z]+", text))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("work_dir", type=Path, help="a finished `retlm demo` work directory")
    parser.add_argument("--num-prompts", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--settings", type=json.loads, default=DEFAULT_SETTINGS, help="JSON list of dicts")
    args = parser.parse_args()

    import torch

    from retlm.demo import DemoOptions, held_out_prompts
    from retlm.generation import generate_text
    from retlm.retrieval import RetrievalDatabase
    from retlm.training import load_model

    print(
        f"# {datetime.date.today()}, {platform.processor() or platform.machine()}, torch {torch.__version__}"
    )
    db = RetrievalDatabase.open(args.work_dir / "db")
    model = load_model(args.work_dir / "run" / "model")
    prompts = held_out_prompts(DemoOptions(work_dir=args.work_dir, num_prompts=args.num_prompts), db, model)
    summary: list[tuple[dict[str, Any], float, float]] = []
    for setting in args.settings:
        print(f"\n######## {setting}")
        measures = []
        for i, p in enumerate(prompts, 1):
            generated = generate_text(
                model,
                db,
                p["prompt"],
                max_new_tokens=args.max_new_tokens,
                seed=i,
                exclude_doc_id=p["doc_id"],
                eos_token_id=int(db.eos_id),
                **{"do_sample": True, **setting},
            )
            print(f"--- {p['document']}: ...{p['prompt'][-60:]!r}")
            print(generated.continuation)
            measures.append(readability(generated.continuation))
        spaces = sum(m[0] for m in measures) / len(measures)
        words = sum(m[1] for m in measures) / len(measures)
        summary.append((setting, spaces, words))
    print("\n| setting | whitespace share | words per continuation |\n|---|---|---|")
    for setting, spaces, words in summary:
        print(f"| {json.dumps(setting)} | {spaces:.3f} | {words:.1f} |")


if __name__ == "__main__":
    main()
