"""RetNet speed and memory on CPU: chunkwise vs parallel training, recurrent decoding vs a Llama KV cache.

    .venv/bin/python bench/retnet.py                 # everything (a few minutes on 2 cores)
    .venv/bin/python bench/retnet.py --quick         # shorter lengths and contexts, for a smoke run

Three parts, each run in this one process and printed as markdown tables with ratios:

1. ops:    retlm.ops.retention chunkwise vs parallel, forward + backward, T = 512 .. 4096.
2. train:  the same, end to end through RetNetForCausalLM (loss.backward()), same model and weights.
3. decode: RetNetForCausalLM in recurrent mode vs transformers' LlamaForCausalLM with its KV cache
           (same width, depth and heads; Llama's FFN widened so both have the same parameter count),
           after a prompt of 1k / 4k / 8k tokens: tokens/s (fastest of 3 runs of 32 tokens) and memory.
4. curve:  ms per decoding step against the context length, 1k .. 32k, both models (Llama's KV cache is
           filled with random keys and values of the right size: a step's cost depends on the cache's
           size, not its contents, and a real 32k prefill would take minutes of quadratic attention).
5. profile: cProfile of RetNet decoding steps at 8k context, the top entries by own time.
6. floor:  the matrix-vector products of one decoding step alone, over each model's own weight
           matrices (RetNet's and Llama's, batch 1, fastest of 30): the time no step made of those
           products can go below, and the speed ratio that bound allows; RetNet's also as
           compile_decoding() runs them (frozen, packed weights, inductor's CPU GEMM kernels).

Memory on CPU: tracemalloc does not see torch's allocations, so we report (i) the exact bytes of the
cache tensors and (ii) the process's peak resident memory during the decoding steps above its level
before the prompt: Linux's VmHWM, reset to the current RSS by writing "5" to /proc/self/clear_refs
just before decoding starts. Large tensors are mmap'ed and unmapped on free, so RSS tracks them.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable

import torch
from _memory import proc_status_bytes, release_free_memory, reset_peak_rss
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from retlm import RetNetConfig, RetNetForCausalLM
from retlm.compat import cache_kwargs, output_cache
from retlm.models.retnet.decoding import FrozenWeightsStep
from retlm.ops.retention import decay_gammas, retention

MiB = 2**20


# ------------------------------------------------------------------------------------------------
# Measuring
# ------------------------------------------------------------------------------------------------


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Fastest of ``repeats`` runs after one warm-up (the box is shared: the minimum is the least noisy)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def relative_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||: the two modes must compute the same function."""
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def cache_tensors(cache) -> list[torch.Tensor]:
    """The tensors a decoding cache holds: Llama's keys/values, or RetNet's (kv, z) per layer."""
    tensors = []
    for layer in cache.layers:
        if hasattr(layer, "state"):
            tensors.extend(layer.state)
        else:
            tensors.extend([layer.keys, layer.values])
    return tensors


# ------------------------------------------------------------------------------------------------
# Models of the same shape
# ------------------------------------------------------------------------------------------------


def make_models(
    hidden: int, layers: int, heads: int, vocab: int
) -> tuple[RetNetForCausalLM, LlamaForCausalLM]:
    """RetNet (v_dim = ffn = 2d, GLU) and Llama with equal width/depth/heads. Per layer RetNet has 8d^2
    retention + 6d^2 FFN weights; Llama 4d^2 attention, so its SwiGLU width is 10d/3 to match."""
    torch.manual_seed(0)
    retnet = RetNetForCausalLM(
        RetNetConfig(vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads)
    ).eval()
    llama_ffn = 32 * round(10 * hidden / 3 / 32)
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=llama_ffn,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=65536,
            attn_implementation="sdpa",
        )
    ).eval()
    return retnet, llama


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------
# 1 + 2: chunkwise vs parallel, forward + backward
# ------------------------------------------------------------------------------------------------


def bench_ops(lengths: list[int], heads: int, key_dim: int, value_dim: int, chunk_size: int, repeats: int):
    log_gamma = decay_gammas(heads).log()
    print(f"\n### ops: retention forward+backward, batch 1, {heads} heads, dk {key_dim}, dv {value_dim}\n")
    print(f"| T | parallel (s) | chunkwise, chunk {chunk_size} (s) | ratio | output rel. diff |")
    print("|---|---|---|---|---|")
    for seq_len in lengths:
        q, k = (torch.randn(1, heads, seq_len, key_dim, requires_grad=True) for _ in range(2))
        v = torch.randn(1, heads, seq_len, value_dim, requires_grad=True)
        outputs = {}

        def step(mode, q=q, k=k, v=v, outputs=outputs):
            out, _ = retention(q, k, v, log_gamma, retention_mode=mode, block_size=chunk_size)
            out.square().mean().backward()
            outputs[mode] = out.detach()

        parallel = best_time(lambda: step("parallel"), repeats)
        chunkwise = best_time(lambda: step("chunkwise"), repeats)
        diff = relative_difference(outputs["chunkwise"], outputs["parallel"])
        print(
            f"| {seq_len} | {parallel:.3f} | {chunkwise:.3f} | {parallel / chunkwise:.1f}x | {diff:.1e} |",
            flush=True,
        )


def bench_train(model: RetNetForCausalLM, lengths: list[int], chunk_size: int, repeats: int) -> None:
    model.train()
    vocab = model.config.vocab_size
    print(f"\n### train: RetNetForCausalLM forward+backward (loss.backward()), batch 1, chunk {chunk_size}\n")
    print("| T | parallel (s) | chunkwise (s) | ratio | loss rel. diff |")
    print("|---|---|---|---|---|")
    for seq_len in lengths:
        input_ids = torch.randint(0, vocab, (1, seq_len))
        losses = {}

        def step(mode, input_ids=input_ids, losses=losses):
            model.zero_grad(set_to_none=True)
            out = model(
                input_ids=input_ids,
                labels=input_ids,
                retention_mode=mode,
                retention_block_size=chunk_size,
                use_cache=False,
            )
            out.loss.backward()
            losses[mode] = out.loss.detach()

        parallel = best_time(lambda: step("parallel"), repeats)
        chunkwise = best_time(lambda: step("chunkwise"), repeats)
        diff = relative_difference(losses["chunkwise"], losses["parallel"])
        print(
            f"| {seq_len} | {parallel:.3f} | {chunkwise:.3f} | {parallel / chunkwise:.1f}x | {diff:.1e} |",
            flush=True,
        )
    model.zero_grad(set_to_none=True)
    model.eval()


# ------------------------------------------------------------------------------------------------
# 3: decoding after a long prompt
# ------------------------------------------------------------------------------------------------


@torch.inference_mode()
def prefill(model, prompt: torch.Tensor, is_retnet: bool, chunk: int = 1024):
    """Run the prompt and return the cache (RetNet: one chunkwise call; Llama: 1k-token pieces)."""
    if is_retnet:
        return output_cache(
            model(input_ids=prompt, retention_mode="chunkwise", retention_block_size=256, use_cache=True)
        )
    cache = DynamicCache()
    for start in range(0, prompt.shape[1], chunk):
        model(input_ids=prompt[:, start : start + chunk], use_cache=True, **cache_kwargs(cache))
    return cache


@torch.inference_mode()
def decode(model, cache, token: torch.Tensor, steps: int, is_retnet: bool) -> float:
    """Greedy decoding of ``steps`` tokens, one forward per token; returns the wall time."""
    extra = {"retention_mode": "recurrent"} if is_retnet else {}
    start = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=token, use_cache=True, **cache_kwargs(cache), **extra)
        cache = output_cache(out)
        token = out.logits[:, -1:].argmax(-1)
    return time.perf_counter() - start


def measure_decoding(model, context: int, batch: int, steps: int, is_retnet: bool, repeats: int) -> dict:
    """Prefill one prompt, copy its cache to ``batch`` rows, then time ``repeats`` runs of ``steps`` greedy
    tokens each (every run continues the same cache) and keep the fastest run: the box is shared."""
    release_free_memory()
    before = proc_status_bytes("VmRSS")
    prompt = torch.randint(0, model.config.vocab_size, (1, context))
    cache = prefill(model, prompt, is_retnet)
    cache.batch_repeat_interleave(batch)
    token = prompt[:, -1:].repeat(batch, 1)
    decode(model, cache, token, 2, is_retnet)  # warm-up (the cache then holds context + 2 tokens)
    cache_size = tensor_bytes(cache_tensors(cache))
    release_free_memory()
    reset_peak_rss()
    seconds = min(decode(model, cache, token, steps, is_retnet) for _ in range(repeats))
    peak = proc_status_bytes("VmHWM") - before
    del cache
    release_free_memory()
    return dict(
        ms_per_step=1e3 * seconds / steps, tokens_per_s=batch * steps / seconds, cache=cache_size, peak=peak
    )


def bench_decode(
    retnet, llama, contexts: list[int], batch: int, steps: int, repeats: int, compiled: bool = False
) -> None:
    """The decode table; with ``compiled``, RetNet is measured twice per context, eager and with
    ``compile_decoding()`` (Llama is always eager), and the compilation time is printed."""
    print(f"\n### decode: {steps} greedy tokens after a prompt of `context` tokens, batch {batch}")
    print(f"(one prompt is prefilled, its cache copied to every row; fastest of {repeats} runs)\n")
    # An untimed round first, so that one-time costs (allocator growth, lazily built constants, the
    # compilation) are not charged to the first row of the table.
    for model, is_retnet in ((retnet, True), (llama, False)):
        measure_decoding(model, min(contexts), batch, 2, is_retnet, 1)
    variants = [("RetNet", False)]
    if compiled:
        retnet.model.compile_decoding()
        start = time.perf_counter()
        measure_decoding(retnet, min(contexts), batch, 2, True, 1)
        seconds = time.perf_counter() - start
        print(f"RetNet compile_decoding(): the first steps took {seconds:.1f} s (compilation)\n")
        retnet.model.compile_decoding(False)
        variants.append(("RetNet compiled", True))
    print(
        "| context | model | tok/s | Llama tok/s | speed ratio | ms/step | Llama ms/step "
        "| cache MiB | Llama cache MiB | peak MiB | Llama peak MiB | peak ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for context in contexts:
        results = []
        for label, use_compiled in variants:
            if use_compiled:
                retnet.model.compile_decoding()  # the compiled function is cached by torch: no new compile
            results.append((label, measure_decoding(retnet, context, batch, steps, True, repeats)))
            retnet.model.compile_decoding(False)
        theirs = measure_decoding(llama, context, batch, steps, is_retnet=False, repeats=repeats)
        for label, ours in results:
            print(
                f"| {context} | {label} | {ours['tokens_per_s']:.1f} | {theirs['tokens_per_s']:.1f} "
                f"| {ours['tokens_per_s'] / theirs['tokens_per_s']:.1f}x "
                f"| {ours['ms_per_step']:.2f} | {theirs['ms_per_step']:.2f} "
                f"| {ours['cache'] / MiB:.2f} | {theirs['cache'] / MiB:.1f} "
                f"| {ours['peak'] / MiB:.1f} | {theirs['peak'] / MiB:.1f} "
                f"| {theirs['peak'] / max(ours['peak'], 1):.1f}x |",
                flush=True,
            )


def random_kv_cache(llama: LlamaForCausalLM, context: int) -> DynamicCache:
    """A DynamicCache holding ``context`` random keys and values per layer, batch 1."""
    config = llama.config
    head_dim = config.hidden_size // config.num_attention_heads
    cache = DynamicCache()
    for layer in range(config.num_hidden_layers):
        shape = (1, config.num_key_value_heads, context, head_dim)
        cache.update(torch.randn(shape), torch.randn(shape), layer)
    return cache


def bench_curve(retnet, llama, contexts: list[int], steps: int, repeats: int, compiled: bool = False) -> None:
    """ms per step against the context; with ``compiled``, RetNet also with ``compile_decoding()``."""
    print(f"\n### decode cost against context length: {steps} greedy tokens, batch 1, fastest of {repeats}")
    print("(RetNet: a real chunkwise prefill; Llama: a KV cache of random keys and values)\n")
    variants = [("RetNet", False)] + ([("RetNet compiled", True)] if compiled else [])
    print("| context | " + " | ".join(f"{label} ms/step" for label, _ in variants) + " | Llama ms/step | "
          + " | ".join(f"{label} speed ratio" for label, _ in variants) + " |")  # fmt: skip
    print("|---" * (2 + 2 * len(variants)) + "|")
    token = torch.randint(0, retnet.config.vocab_size, (1, 1))

    def step_seconds(model, cache, is_retnet: bool) -> float:
        decode(model, cache, token, 2, is_retnet)  # warm-up (and the compilation, once per batch size)
        return min(decode(model, cache, token, steps, is_retnet) for _ in range(repeats)) / steps

    for context in contexts:
        release_free_memory()
        prompt = torch.randint(0, retnet.config.vocab_size, (1, context))
        ours = []
        for _, use_compiled in variants:
            retnet.model.compile_decoding(use_compiled)  # reuses the compiled step after the first context
            ours.append(step_seconds(retnet, prefill(retnet, prompt, True), True))
        retnet.model.compile_decoding(False)
        theirs = step_seconds(llama, random_kv_cache(llama, context), False)
        print(f"| {context} | " + " | ".join(f"{1e3 * t:.2f}" for t in ours) + f" | {1e3 * theirs:.2f} | "
              + " | ".join(f"{theirs / t:.1f}x" for t in ours) + " |", flush=True)  # fmt: skip


def profile_decode(retnet, context: int, steps: int, label: str = "", top: int = 15) -> None:
    """cProfile of ``steps`` decoding steps after a ``context``-token prompt; top entries by own time."""
    import cProfile
    import io
    import pstats

    cache = prefill(retnet, torch.randint(0, retnet.config.vocab_size, (1, context)), True)
    token = torch.randint(0, retnet.config.vocab_size, (1, 1))
    decode(retnet, cache, token, 4, True)
    profiler = cProfile.Profile()
    profiler.enable()
    seconds = decode(retnet, cache, token, steps, True)
    profiler.disable()
    print(f"\n### profile: {steps} {label}RetNet decoding steps at context {context} "
          f"({1e3 * seconds / steps:.2f} ms/step under the profiler)\n")  # fmt: skip
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
    print("```\n" + "\n".join(line for line in out.getvalue().splitlines() if line.strip()) + "\n```")


def weight_matrices(model: torch.nn.Module) -> list[torch.Tensor]:
    """Every weight a one-token step multiplies by (the LM head included; the embedding is a lookup)."""
    return [m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.Linear)]


class Products(torch.nn.Module):
    """One matrix-vector product per weight, in order: the floor's "step", as a module to compile."""

    def __init__(self, weights: list[torch.Tensor]) -> None:
        super().__init__()
        self.weights = torch.nn.ParameterList(torch.nn.Parameter(w, requires_grad=False) for w in weights)

    def forward(self, inputs: dict[int, torch.Tensor]) -> list[torch.Tensor]:
        return [torch.nn.functional.linear(inputs[w.shape[1]], w) for w in self.weights]


def products_ms(weights: list[torch.Tensor], repeats: int = 30, frozen: bool = False) -> float:
    """Fastest time (ms) of one matrix-vector product per weight, in order, batch 1; ``frozen``: compiled
    as ``compile_decoding()`` compiles a step (weights frozen and packed, the GEMM kernels autotuned)."""
    inputs = {w.shape[1]: torch.randn(1, w.shape[1], dtype=w.dtype) for w in weights}
    module = Products(weights)
    run = FrozenWeightsStep(module.forward, module) if frozen else module
    with torch.no_grad():
        run(inputs)  # the compilation, when frozen
        return best_time(lambda: run(inputs), repeats) * 1e3


def bench_floor(retnet: RetNetForCausalLM, llama: LlamaForCausalLM) -> None:
    print("\n### floor: one step's matrix-vector products alone (batch 1, fastest of 30)\n")
    print("| model | products | weight MB | products ms | GB/s |")
    print("|---|---|---|---|---|")
    rows = (("RetNet", retnet, False), ("RetNet", retnet, True), ("Llama", llama, False))
    for name, model, frozen in rows:
        weights = weight_matrices(model)
        mb = tensor_bytes(weights) / 1e6
        ms = products_ms(weights, frozen=frozen)
        kind = "frozen, packed (compile_decoding's)" if frozen else "eager (ATen/MKL)"
        print(f"| {name} | {kind} | {mb:.1f} | {ms:.2f} | {mb / ms:.1f} |")
    print(
        "\nA RetNet step reads these weights (plus a 0.5 MiB state); dividing a measured Llama ms/step by"
        " RetNet's products ms gives the highest speed ratio a RetNet step with those products could reach."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short lengths and contexts (smoke run)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--chunk-size", type=int, default=128)
    parser.add_argument("--batches", default="1,8", help="decoding batch sizes, comma-separated")
    parser.add_argument("--steps", type=int, default=32, help="decoded tokens per timed run")
    parser.add_argument(
        "--decode-repeats", type=int, default=3, help="timed decoding runs per context; the fastest is kept"
    )
    parser.add_argument(
        "--parts",
        default="ops,train,decode",
        help="comma-separated subset of ops,train,decode,curve,profile,floor",
    )
    parser.add_argument("--contexts", default=None, help="decode contexts, comma-separated (1k,4k,8k)")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="decode, curve: also RetNet with compile_decoding() (torch.compile, inductor, frozen "
        "weights); Llama stays eager",
    )
    parser.add_argument("--curve-contexts", default="1024,2048,4096,8192,16384,32768")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lengths = [256, 512] if args.quick else [512, 1024, 2048, 4096]
    contexts = [256, 1024] if args.quick else [1024, 4096, 8192]
    if args.contexts:
        contexts = [int(c) for c in args.contexts.split(",")]
    repeats = 1 if args.quick else 2

    retnet, llama = make_models(args.hidden, args.layers, args.heads, args.vocab)
    print(
        f"# RetNet benchmark  ({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s))"
    )
    print(
        f"RetNet: d={args.hidden}, {args.layers} layers, {args.heads} heads, "
        f"{parameter_count(retnet):,} params; Llama: same d/layers/heads, "
        f"ffn {llama.config.intermediate_size}, {parameter_count(llama):,} params"
    )
    parts = set(args.parts.split(","))
    if "ops" in parts:
        head_key, head_value = args.hidden // args.heads, 2 * args.hidden // args.heads
        bench_ops(lengths, args.heads, head_key, head_value, args.chunk_size, repeats)
    if "train" in parts:
        bench_train(retnet, lengths, args.chunk_size, repeats)
    if "decode" in parts:
        for batch in map(int, args.batches.split(",")):
            repeats = 1 if args.quick else args.decode_repeats
            bench_decode(retnet, llama, contexts, batch, args.steps, repeats, args.compile)
    if "curve" in parts:
        curve = [int(c) for c in args.curve_contexts.split(",")]
        bench_curve(retnet, llama, curve, args.steps, 1 if args.quick else args.decode_repeats, args.compile)
    if "profile" in parts:
        for use_compiled in (False, True) if args.compile else (False,):
            retnet.model.compile_decoding(use_compiled)
            profile_decode(retnet, 8192, 4 * args.steps, "compiled " if use_compiled else "")
        retnet.model.compile_decoding(False)
    if "floor" in parts:
        bench_floor(retnet, llama)


if __name__ == "__main__":
    main()
