"""``retlm demo``: the end-to-end demo on the bundled corpus (``run.py``), its option checks
(``checks.py``), the pretrained LM's part (``pretrained.py``) and the corpus it builds from the
documentation that ships with Python (``corpus.py``)."""

from retlm.demo.run import (
    DemoOptions,
    build_database,
    evaluate_model,
    generate_samples,
    held_out_prompts,
    prose_prompt,
    run_demo,
    side_by_side,
    train_model,
)

__all__ = [
    "DemoOptions",
    "build_database",
    "evaluate_model",
    "generate_samples",
    "held_out_prompts",
    "prose_prompt",
    "run_demo",
    "side_by_side",
    "train_model",
]
