"""A training process for the subprocess tests (kill and resume, torchrun). Not a test module.

    python tests/helpers/training_child.py DB RUN_DIR MAX_STEPS [--hang-at-step N | --hang-in-save N]

``--hang-at-step N`` blocks inside optimizer step N+1 (after step N was logged) and
``--hang-in-save N`` blocks after checkpoint N was written to staging but before it was committed;
either way a marker file ``RUN_DIR.hung`` appears so the test can kill the process at that point.
DB is a twin database of ``training_helpers``, opened with its stand-in database object.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def hang(marker: Path) -> None:
    marker.write_text("hung")
    while True:
        time.sleep(1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("db")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("max_steps", type=int)
    parser.add_argument("--hang-at-step", type=int)
    parser.add_argument("--hang-in-save", type=int)
    parser.add_argument("--eval-sequences", type=int, default=64)
    args = parser.parse_args()

    import training_helpers as th

    from retlm.training import trainer as trainer_module
    from retlm.training.trainer import RetroTrainer, train

    db = th.open_twin_database(Path(args.db))
    config = th.tiny_model_config(dropout=0.1)

    marker = Path(str(args.run_dir) + ".hung")
    if args.hang_at_step is not None:
        original_step = RetroTrainer.training_step

        def training_step(self, *a, **k):
            if self.state.global_step == args.hang_at_step:
                hang(marker)
            return original_step(self, *a, **k)

        RetroTrainer.training_step = training_step
    if args.hang_in_save is not None:
        original_commit = trainer_module.ckpt.commit_dir

        def commit_dir(staging, final):
            if final.name == f"checkpoint-{args.hang_in_save}":
                hang(marker)
            original_commit(staging, final)

        trainer_module.ckpt.commit_dir = commit_dir

    train(
        db,
        config,
        args.run_dir,
        max_steps=args.max_steps,
        save_every=4,
        eval_every=4,
        batch_size=4,
        lr=3e-3,
        log_every=1,
        eval_sequences=args.eval_sequences,
        progress=False,
    )


if __name__ == "__main__":
    main()
