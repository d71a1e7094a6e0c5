"""The demo model's training step before and after the vocabulary grew from 30,522 (MiniLM's WordPiece) to
50,257 (GPT-2's byte-level BPE), and with the LM head tied to the token embedding.

    .venv/bin/python bench/lm_step.py                  # ~3 minutes on 2 CPU cores
    .venv/bin/python bench/lm_step.py --threads 2 --repeats 5

The model is `retro-tiny` (the config `retlm demo` trains) at the demo's shape: batches of 8 sequences of
256 tokens, 2 neighbors of 128 tokens per 64-token chunk. One step is forward, cross-entropy, backward
and an AdamW step, exactly what the trainer runs. Three variants, the same random batch each:

- ``wordpiece-30522``: the vocabulary before this change (``--tokenizer bert``), untied head;
- ``gpt2-50257``: GPT-2's vocabulary, untied head;
- ``gpt2-50257-tied``: GPT-2's vocabulary, head weight = token embedding (``tie_word_embeddings``).

Steps are interleaved (one of each variant per repetition) after a warm-up step each, and medians are
reported: wall time, and process CPU time, which with one thread is the work done and hardly moves when
other jobs compete for the cores. It also prints the UTF-8 bytes of the bundled corpus per token of each
tokenizer, so that a step's tokens can be read as text: per step, GPT-2 tokens cover fewer raw bytes than
WordPiece ones, which drops whitespace and case.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from importlib import resources

import torch
import yaml

from retlm.models.retro import RetroConfig, RetroForCausalLM
from retlm.training.evaluation import causal_lm_loss

VARIANTS = {"wordpiece-30522": (30522, False), "gpt2-50257": (50257, False), "gpt2-50257-tied": (50257, True)}


def make_step(vocab: int, tie: bool, *, batch: int, seq_len: int, chunk: int, k: int, seed: int = 0):
    config = yaml.safe_load((resources.files("retlm.training") / "configs" / "retro-tiny.yaml").read_text())
    config.pop("tie_word_embeddings", None)
    torch.manual_seed(seed)
    model = RetroForCausalLM(
        RetroConfig(
            **config,
            num_tokens=vocab,
            chunk_size=chunk,
            max_seq_len=seq_len,
            pad_id=0,
            tie_word_embeddings=tie,
        )
    ).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(1, vocab, (batch, seq_len + 1), generator=g)
    retrieved = torch.randint(1, vocab, (batch, seq_len // chunk, k, 2 * chunk), generator=g)

    def step() -> None:
        loss = causal_lm_loss(model(input_ids=seq[:, :-1], retrieved=retrieved).logits, seq[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in model.parameters())


def corpus_bytes_per_token() -> dict[str, float]:
    from retlm.demo.corpus import pydoc_topics, stdlib_docstrings
    from retlm.tokenization import load_tokenizer

    docs = [text for _, text in [*pydoc_topics(), *stdlib_docstrings()]]
    n_bytes = sum(len(text.encode("utf-8")) for text in docs)
    out = {}
    for name in ("bert", "gpt2"):
        ids = load_tokenizer(name)(docs, add_special_tokens=False, verbose=False)["input_ids"]
        out[name] = n_bytes / sum(map(len, ids))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per variant (interleaved)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steps, params = {}, {}
    for name, (vocab, tie) in VARIANTS.items():
        steps[name], params[name] = make_step(
            vocab, tie, batch=args.batch_size, seq_len=args.seq_len, chunk=64, k=2
        )
        steps[name]()  # warm-up
    wall = {name: [] for name in VARIANTS}
    cpu = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):
        for name, step in steps.items():
            w, c = time.perf_counter(), time.process_time()
            step()
            wall[name].append(time.perf_counter() - w)
            cpu[name].append(time.process_time() - c)
    per_token = corpus_bytes_per_token()
    tokens = args.batch_size * args.seq_len
    base = statistics.median(cpu["wordpiece-30522"])
    print(
        f"retro-tiny training step, batch {args.batch_size} x {args.seq_len} tokens, "
        f"{args.threads} thread(s), "
        f"{args.repeats} interleaved repeats; {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, {datetime.date.today()}"
    )
    print()
    print(
        "| variant | parameters | step wall s (median) | step CPU s (median) | CPU time vs 30522 "
        "| corpus bytes per step |"
    )
    print("|---|---|---|---|---|---|")
    for name in VARIANTS:
        med_cpu = statistics.median(cpu[name])
        bpt = per_token["gpt2" if name.startswith("gpt2") else "bert"]
        print(
            f"| {name} | {params[name] / 1e6:.2f}M | {statistics.median(wall[name]):.3f} | {med_cpu:.3f} "
            f"| {med_cpu / base:.3f} | {tokens * bpt / 1e3:.1f} kB |"
        )
    print()
    print(
        "bytes per token on the bundled corpus: "
        f"WordPiece {per_token['bert']:.3f}, GPT-2 {per_token['gpt2']:.3f}"
    )


if __name__ == "__main__":
    main()
