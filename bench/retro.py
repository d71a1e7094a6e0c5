"""RETRO speed: training steps against retro-pytorch 0.3.9, and generation with the two decoders.

    .venv/bin/python bench/retro.py                         # small size, a few minutes on 2 CPU cores
    .venv/bin/python bench/retro.py --size seed --device cuda   # the seed README's model (a GPU box)
    .venv/bin/python bench/retro.py --profile               # also: top ops of one training step each
    .venv/bin/python bench/retro.py --seq-len 2048 --skip-generate   # longer training sequences

Two parts, each run in this one process and printed as markdown tables with ratios:

1. train: tokens/s of a full training step (forward, loss, backward, AdamW step) on the same batch and
   the same `retrieved` tensor:
   - retro-pytorch 0.3.9's RETRO (loaded from site-packages without its package __init__, which needs
     autofaiss);
   - ours, transformer decoder, imported from that model's weights with `from_retro_pytorch` (so it
     computes the same function; checked before timing);
   - ours, RetNet decoder (same widths, depth and CCA layers; its retention layers have more weights
     than attention, since the value width is 2 * dec_dim), in parallel and chunkwise retention.
   Steps are interleaved (peer, ours, ... per repetition) after warm-up, and medians are reported.
2. generate: `generate_with_retrieval` for 2,048 new tokens (greedy, batch 1) after a one-chunk
   prompt, transformer decoder (KV cache) vs RetNet decoder (recurrent state), retrieving at every
   chunk boundary from a synthetic database whose `search` is embedding-free (neighbor tokens are a
   cheap function of the query chunk), so retrieval costs microseconds and the model's time dominates.
   Each model call is timed through a thin wrapper, which gives per-token latencies at the start and
   at the end of the 2,048 tokens.

Time: wall-clock medians are the headline. On CPU the bench runs torch with ONE intra-op thread by default
(on a box shared with other jobs, OpenMP threads spin-waiting for a busy core made steps 10-30x slower)
and also reports process CPU time, which with one thread is the work done and hardly moves when other
jobs compete for the cores; its ratios are the steadier ones on a shared machine.

Memory on CPU: tracemalloc does not see torch's allocations, so we report (i) the exact bytes of the
tensors in the final cache and (ii) the growth of the process's peak resident memory during generation:
Linux's VmHWM, reset to the current RSS by writing "5" to /proc/self/clear_refs just before generation,
minus the RSS at that moment (after freeing and malloc_trim). Large tensors are mmap'ed and unmapped on
free, so RSS follows them. On CUDA the peak allocated memory is reported instead of RSS.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import platform
import statistics
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from _memory import proc_status_bytes, release_free_memory, reset_peak_rss

from retlm import RETRO
from retlm.compat import output_cache
from retlm.layers.attention import KVCache
from retlm.models.retrieval_generation import generate_with_retrieval
from retlm.models.retro.convert import from_retro_pytorch

MiB = 2**20

# retro-pytorch constructor arguments; "seed" is the seed README's usage example
SIZES = {
    "small": dict(
        num_tokens=8192,
        max_seq_len=512,
        enc_dim=256,
        enc_depth=2,
        dec_dim=256,
        dec_depth=6,
        dec_cross_attn_layers=(3, 6),
        heads=8,
        dim_head=32,
        chunk_size=64,
    ),
    "seed": dict(
        num_tokens=28996,
        max_seq_len=2048,
        enc_dim=896,
        enc_depth=2,
        dec_dim=796,
        dec_depth=12,
        dec_cross_attn_layers=(3, 6, 9, 12),
        heads=8,
        dim_head=64,
        dec_attn_dropout=0.25,
        dec_ff_dropout=0.25,
        chunk_size=64,
    ),
}
BATCH = {"small": 2, "seed": 2}
NUM_NEIGHBORS = 2


# ------------------------------------------------------------------------------------------------
# The peer
# ------------------------------------------------------------------------------------------------


def load_retro_pytorch() -> types.ModuleType:
    """retro-pytorch 0.3.9's model module, without its package __init__ (autofaiss, BERT via torch.hub)."""
    spec = importlib.util.find_spec("retro_pytorch")
    if spec is None or spec.submodule_search_locations is None:
        raise SystemExit("retro-pytorch is not installed: pip install --no-deps retro-pytorch==0.3.9")
    path = Path(next(iter(spec.submodule_search_locations))) / "retro_pytorch.py"
    package = types.ModuleType("retro_pytorch")
    package.__path__ = []
    retrieval = types.ModuleType("retro_pytorch.retrieval")
    retrieval.BERT_VOCAB_SIZE = 28996
    sys.modules.update({"retro_pytorch": package, "retro_pytorch.retrieval": retrieval})
    module_spec = importlib.util.spec_from_file_location("retro_pytorch.retro_pytorch", path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules["retro_pytorch.retro_pytorch"] = module
    module_spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------------
# Measuring
# ------------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class PeakMemory:
    """Peak memory growth over a block: CUDA peak allocated, or on CPU the VmHWM above the RSS at entry."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.growth = device, 0

    def __enter__(self) -> PeakMemory:
        release_free_memory()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        else:
            reset_peak_rss()
            self.before = proc_status_bytes("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.growth = torch.cuda.max_memory_allocated(self.device) - self.before
        else:
            self.growth = proc_status_bytes("VmHWM") - self.before


# ------------------------------------------------------------------------------------------------
# 1: training steps
# ------------------------------------------------------------------------------------------------


def make_batch(kwargs: dict, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``seq (batch, n + 1)`` and ``retrieved (batch, n / c, k, 2c)`` of random non-pad tokens."""
    generator = torch.Generator().manual_seed(0)
    n, c, vocab = kwargs["max_seq_len"], kwargs["chunk_size"], kwargs["num_tokens"]
    seq = torch.randint(1, vocab, (batch, n + 1), generator=generator)
    retrieved = torch.randint(1, vocab, (batch, n // c, NUM_NEIGHBORS, 2 * c), generator=generator)
    return seq.to(device), retrieved.to(device)


def training_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, seq, retrieved) -> Callable:
    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = model(seq, retrieved, return_loss=True)
        loss.backward()
        optimizer.step()

    return step


def check_same_function(peer: torch.nn.Module, ours: torch.nn.Module, seq, retrieved) -> float:
    """Largest logit difference between the peer and its import (eval mode, no dropout)."""
    peer.eval(), ours.eval()
    with torch.no_grad():
        diff = (peer(seq[:, :-1], retrieved) - ours(seq[:, :-1], retrieved)).abs().max().item()
    peer.train(), ours.train()
    return diff


def build_training_models(peer_module, kwargs: dict, device: torch.device) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    peer = peer_module.RETRO(**kwargs)
    models = {"retro-pytorch 0.3.9": peer, "ours, transformer": from_retro_pytorch(kwargs, peer.state_dict())}
    for mode in ("parallel", "chunkwise"):
        torch.manual_seed(0)
        models[f"ours, RetNet ({mode})"] = RETRO(**kwargs, decoder="retnet", retention_mode=mode)
    return {name: model.to(device).train() for name, model in models.items()}


def bench_train(peer_module, kwargs: dict, batch: int, device: torch.device, warmup: int, repeats: int):
    models = build_training_models(peer_module, kwargs, device)
    seq, retrieved = make_batch(kwargs, batch, device)
    names = list(models)
    diff = check_same_function(models[names[0]], models[names[1]], seq, retrieved)
    print(f"\nimported transformer vs retro-pytorch: max |logit difference| = {diff:.2e} (eval mode)")
    if diff > 1e-3:
        raise SystemExit("the import does not reproduce retro-pytorch; the comparison would be meaningless")

    steps = {
        name: training_step(model, torch.optim.AdamW(model.parameters(), lr=1e-4), seq, retrieved)
        for name, model in models.items()
    }
    times: dict[str, list[float]] = {name: [] for name in names}
    cpu_times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(warmup + repeats):
        for name in names if rep % 2 == 0 else reversed(names):  # alternate the order: no one goes first
            sync(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            steps[name]()
            sync(device)
            if rep >= warmup:
                times[name].append(time.perf_counter() - start)
                cpu_times[name].append(time.process_time() - cpu_start)

    tokens = batch * kwargs["max_seq_len"]
    peer_median = statistics.median(times[names[0]])
    peer_cpu = statistics.median(cpu_times[names[0]])
    print(
        f"\n### train: forward + backward + AdamW step, batch {batch} x seq {kwargs['max_seq_len']}, "
        f"{NUM_NEIGHBORS} neighbors x {2 * kwargs['chunk_size']} tokens, medians of {repeats} "
        f"interleaved steps after {warmup} warm-up\n"
    )
    print(
        "| model | params | median step (s) | min..max (s) | tokens/s | vs retro-pytorch "
        "| median CPU s/step | CPU-time ratio |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        median, cpu = statistics.median(times[name]), statistics.median(cpu_times[name])
        print(
            f"| {name} | {parameter_count(models[name]) / 1e6:.2f}M | {median:.3f} "
            f"| {min(times[name]):.3f}..{max(times[name]):.3f} | {tokens / median:,.0f} "
            f"| **{peer_median / median:.2f}x** | {cpu:.3f} | {peer_cpu / cpu:.2f}x |",
            flush=True,
        )
    return models, seq, retrieved


def profile_step(models: dict, seq, retrieved, rows: int) -> None:
    """Top ops by self CPU time of one training step per model (after the timed runs: warm)."""
    from torch.profiler import ProfilerActivity, profile

    for name, model in models.items():
        step = training_step(model, torch.optim.AdamW(model.parameters(), lr=1e-4), seq, retrieved)
        step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        print(f"\n#### profile: {name}\n")
        print("```")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
        print("```", flush=True)


# ------------------------------------------------------------------------------------------------
# 2: generation with retrieval
# ------------------------------------------------------------------------------------------------


class SyntheticDatabase:
    """A duck-typed retrieval database without embeddings: the k neighbors (+ continuations) of a query
    chunk are a deterministic function of the chunk's token sum (a few microseconds per search)."""

    pad_id = 0

    def __init__(self, chunk_size: int, vocab: int, num_neighbors: int = NUM_NEIGHBORS) -> None:
        self.chunk_size, self.vocab, self.num_neighbors = chunk_size, vocab, num_neighbors
        self.searches = 0

    def search(self, queries, k: int) -> SimpleNamespace:
        self.searches += 1
        queries = np.asarray(queries)
        lead, c = queries.shape[:-1], self.chunk_size
        base = (queries.sum(-1) % 997)[..., None, None]
        tokens = (base * 31 + 7 * np.arange(k)[:, None] + np.arange(2 * c)) % (self.vocab - 1) + 1
        ids = np.broadcast_to(base[..., 0] * k + np.arange(k), (*lead, k)).copy()
        return SimpleNamespace(
            tokens=np.broadcast_to(tokens, (*lead, k, 2 * c)).copy(),
            chunk_ids=ids,
            doc_ids=ids,
            scores=np.ones((*lead, k), np.float32),
        )


class TimedModel:
    """Stands in for the model inside the generation loop and records each call's wall time and CPU
    time (with one intra-op thread, CPU time is the work done, nearly blind to other jobs on the box)."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.model, self.config, self.device = model, model.config, device
        self.seconds: list[float] = []
        self.cpu_seconds: list[float] = []
        self.cache = None

    def __call__(self, **kwargs):
        sync(self.device)
        start, cpu_start = time.perf_counter(), time.process_time()
        out = self.model(**kwargs)
        sync(self.device)
        self.seconds.append(time.perf_counter() - start)
        self.cpu_seconds.append(time.process_time() - cpu_start)
        self.cache = output_cache(out)
        return out


def cache_bytes(cache) -> int:
    """Bytes of every tensor a RetroCache holds (per-layer KV or retention state, chunk context,
    encoded neighbors and their mask)."""
    tensors = []

    def collect(value) -> None:
        if isinstance(value, torch.Tensor):
            tensors.append(value)
        elif isinstance(value, (tuple, list)):
            for v in value:
                collect(v)
        elif isinstance(value, KVCache):  # count the allocated buffers, not only the filled part
            collect([value.keys, value.values])

    collect([[layer.state for layer in cache.layers], cache.context, cache.neighbors, cache.neighbor_mask])
    return sum(t.numel() * t.element_size() for t in tensors)


def generate_once(model, database, prompt, new_tokens: int, mode: str | None, device) -> dict:
    timed = TimedModel(model, device)
    with PeakMemory(device) as peak:
        start = time.perf_counter()
        out = generate_with_retrieval(timed, database, prompt, max_new_tokens=new_tokens, retention_mode=mode)
        total = time.perf_counter() - start
    assert out.sequences.shape[1] == prompt.shape[1] + new_tokens
    steps = timed.seconds[1:]  # the first call is the prompt; then one call per new token but the last
    cpu_steps = timed.cpu_seconds[1:]
    window = min(128, len(steps) // 4)
    return dict(
        tokens_per_s=new_tokens / total,
        prompt_s=timed.seconds[0],
        first_ms=1e3 * statistics.median(steps[:window]),
        last_ms=1e3 * statistics.median(steps[-window:]),
        first_cpu_ms=1e3 * statistics.median(cpu_steps[:window]),
        last_cpu_ms=1e3 * statistics.median(cpu_steps[-window:]),
        window=window,
        cache=cache_bytes(timed.cache),
        peak=peak.growth,
    )


def bench_generate(kwargs: dict, new_tokens: int, device: torch.device, rounds: int) -> None:
    c = kwargs["chunk_size"]
    config = dict(kwargs, max_seq_len=c + new_tokens)
    models = {}
    for decoder in ("transformer", "retnet"):
        torch.manual_seed(0)
        models[decoder] = RETRO(**config, decoder=decoder).to(device).eval()
    modes = {"transformer": None, "retnet": "recurrent"}
    database = SyntheticDatabase(c, kwargs["num_tokens"])
    prompt = torch.randint(1, kwargs["num_tokens"], (1, c), generator=torch.Generator().manual_seed(1))
    prompt = prompt.to(device)
    for name, model in models.items():  # warm-up
        generate_with_retrieval(model, database, prompt, max_new_tokens=4 * c, retention_mode=modes[name])

    results: dict[str, list[dict]] = {name: [] for name in models}
    for rnd in range(rounds):  # interleaved rounds; the round with the median tokens/s is reported
        for name in models if rnd % 2 == 0 else reversed(list(models)):
            run = generate_once(models[name], database, prompt, new_tokens, modes[name], device)
            results[name].append(run)
    best = {
        name: sorted(runs, key=lambda r: r["tokens_per_s"])[len(runs) // 2] for name, runs in results.items()
    }
    memory = "peak allocated growth" if device.type == "cuda" else "peak RSS growth"
    window = best["transformer"]["window"]
    print(
        f"\n### generate: {new_tokens} new tokens (greedy, batch 1) after a {c}-token prompt, retrieving "
        f"{NUM_NEIGHBORS} neighbors at each of the {new_tokens // c} chunk boundaries from a synthetic "
        f"database; median of {rounds} interleaved rounds; ms/token = median over the first / last "
        f"{window} steps\n"
    )
    print(
        f"| decoder | params | tokens/s | prompt (s) | wall ms/token first / last {window} "
        f"| CPU ms/token first / last {window} | CPU last / first | cache MiB | {memory} MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in best.items():
        print(
            f"| {name} | {parameter_count(models[name]) / 1e6:.2f}M | {r['tokens_per_s']:.1f} "
            f"| {r['prompt_s']:.3f} | {r['first_ms']:.2f} / {r['last_ms']:.2f} "
            f"| {r['first_cpu_ms']:.2f} / {r['last_cpu_ms']:.2f} "
            f"| {r['last_cpu_ms'] / r['first_cpu_ms']:.2f}x "
            f"| {r['cache'] / MiB:.2f} | {r['peak'] / MiB:.1f} |"
        )
    t, rn = best["transformer"], best["retnet"]
    print(
        f"\nRetNet / transformer: {rn['tokens_per_s'] / t['tokens_per_s']:.2f}x tokens/s, cache "
        f"{t['cache'] / max(rn['cache'], 1):.0f}x smaller, {memory} {t['peak'] / MiB:.1f} vs "
        f"{rn['peak'] / MiB:.1f} MiB",
        flush=True,
    )


# ------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small", help="model size (default small)")
    parser.add_argument("--seq-len", type=int, default=0, help="override the size's max_seq_len (training)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads on CPU (default 1: on a box shared with other jobs, OpenMP threads that "
        "spin-wait for a busy core made every step 10-30x slower; 0 keeps torch's default)",
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7, help="timed training steps per model")
    parser.add_argument("--new-tokens", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=3, help="generation rounds per decoder")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-generate", action="store_true")
    parser.add_argument("--profile", action="store_true", help="print the top ops of one training step")
    args = parser.parse_args()

    device = torch.device(args.device)
    if args.threads and device.type == "cpu":
        torch.set_num_threads(args.threads)
    kwargs = dict(SIZES[args.size], **({"max_seq_len": args.seq_len} if args.seq_len else {}))
    print(f"# bench/retro.py --size {args.size} ({datetime.date.today()})")
    print(
        f"{platform.processor() or platform.machine()}, {platform.system()}, torch {torch.__version__}, "
        f"retro-pytorch {importlib.metadata.version('retro-pytorch')}, device {device}, "
        f"{torch.get_num_threads()} threads; config {kwargs}"
    )
    if device.type == "cuda":
        print(torch.cuda.get_device_name(device))
    if not args.skip_train:
        peer_module = load_retro_pytorch()
        models, seq, retrieved = bench_train(
            peer_module, kwargs, BATCH[args.size], device, args.warmup, args.repeats
        )
        if args.profile:
            profile_step(models, seq, retrieved, rows=15)
        del models
    if not args.skip_generate:
        bench_generate(kwargs, args.new_tokens, device, args.rounds)


if __name__ == "__main__":
    main()
