"""What a pretrained name costs: the first conversion of a GGUF into retlm's cache, and every later open,
against loading the GGUF directly with transformers (the peer: what a user does without the cache).

In a fresh cache folder (``--home``; default: a temporary one, deleted at the end), for ``--name``
(default ``smollm2-135m``):

- ``first pretrained_path``: the conversion (read and dequantize the GGUF, build the tokenizer, save the
  float32 folder, hash it), once;
- ``later pretrained_path``: what every later call does (compare every file with its sha256), median of
  ``--repeat``;
- ``later load_causal_lm``: the same plus loading the model and the tokenizer, median of ``--repeat``;
- ``direct GGUF load``: ``AutoModelForCausalLM`` and ``AutoTokenizer.from_pretrained(folder,
  gguf_file=...)``, once;

then the logits of both models on one prompt (their maximum difference) and the ratio of the direct load
to a later ``load_causal_lm``.

    python bench/pretrained.py [--name smollm2-135m] [--home DIR] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    return value, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default="smollm2-135m")
    parser.add_argument(
        "--home", type=Path, default=None, help="cache folder (default: a fresh temporary one)"
    )
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    home = args.home or Path(tempfile.mkdtemp(prefix="retlm-bench-home-"))
    os.environ["RETLM_HOME"] = str(home)
    try:
        run(args, home)
    finally:
        if args.home is None:
            shutil.rmtree(home, ignore_errors=True)  # 538 MB for SmolLM2


def run(args: argparse.Namespace, home: Path) -> None:

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import retlm
    from retlm.models.pretrained import KNOWN

    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    print(f"RETLM_HOME={home}")
    folder, first = timed(retlm.pretrained_path, args.name)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    size = sum(f.stat().st_size for f in folder.iterdir())
    print(f"first pretrained_path:  {first:6.1f} s  (peak RSS {peak:,.0f} MiB; folder {size / 1e6:,.0f} MB)")
    later = [timed(retlm.pretrained_path, args.name)[1] for _ in range(args.repeat)]
    print(f"later pretrained_path:  {statistics.median(later):6.2f} s  (median of {args.repeat})")
    loads = []
    for _ in range(args.repeat):
        (model, tokenizer), seconds = timed(retlm.load_causal_lm, args.name)
        loads.append(seconds)
    print(f"later load_causal_lm:   {statistics.median(loads):6.2f} s  (median of {args.repeat})")

    gguf_file = KNOWN[args.name].file()
    start = time.perf_counter()
    direct = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    direct_seconds = time.perf_counter() - start
    print(f"direct GGUF load:       {direct_seconds:6.1f} s  (transformers, model + tokenizer)")

    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        difference = (model(ids).logits - direct(ids).logits).abs().max().item()
    print(f"max |logits difference|: {difference:g}")
    print(f"direct GGUF load / later load_causal_lm: {direct_seconds / statistics.median(loads):.1f}x")


if __name__ == "__main__":
    main()
