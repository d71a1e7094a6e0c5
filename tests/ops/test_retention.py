"""retlm.ops.retention against a naive float64 reference built straight from the definition.

The reference materialises the full T x T decay matrix from absolute position 0 with literal powers
gamma^(n-m) and literal row sums S_n (no closed forms, no recurrences), so it shares no code path with
the implementation. Errors are norm-wise relative: ``rel_err(a, b) = ||a - b|| / ||b||`` over the whole
tensor. Tolerances: 1e-10 in float64, 1e-5 in float32, for outputs and for states.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retlm.ops.retention import (
    RETENTION_MODES,
    chunkwise_retention,
    decay_gammas,
    parallel_retention,
    recurrent_retention,
    retention,
)

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp(min=1e-300)).item()


# ------------------------------------------------------------------------------------------------
# The naive reference
# ------------------------------------------------------------------------------------------------


def naive_retention(q, k, v, gammas, clamp=True):
    """Definition from position 0: ``q, k (b, h, N, dk)``, ``v (b, h, N, dv)``, ``gammas (h,)``, all
    float64. Returns ``(out (b, h, N, dv), (kv, z) after the last token)``. ``clamp=False`` leaves out
    the division by max(|sum_m R[n,m]|, 1) (only to show that it matters)."""
    n = torch.arange(q.shape[2], dtype=torch.float64)
    distance = n[:, None] - n[None, :]
    powers = gammas[:, None, None] ** distance.clamp(min=0)
    decay = torch.where(distance >= 0, powers, torch.zeros(()))  # (h, N, N): gamma^(n-m), m <= n
    rowsum = decay.sum(-1, keepdim=True)  # S_n, summed literally
    scores = (q @ k.transpose(-1, -2)) * decay / rowsum.sqrt()
    denominator = scores.sum(-1, keepdim=True).abs().clamp(min=1)
    out = scores @ v / denominator if clamp else scores @ v
    last = decay[:, -1]  # gamma^(N-1-m)
    kv = torch.einsum("hm,bhmk,bhmv->bhkv", last, k, v)
    z = torch.einsum("hm,bhmk->bhk", last, k)
    return out, (kv, z)


# ------------------------------------------------------------------------------------------------
# Random problems
# ------------------------------------------------------------------------------------------------

# Mostly short sequences, sometimes medium ones; the long ones get their own explicit test.
LENGTHS = st.one_of(st.integers(1, 40), st.integers(41, 160), st.integers(161, 400))
CHUNK_SIZES = st.one_of(st.integers(1, 16), st.integers(17, 300))
DTYPES = st.sampled_from([torch.float64, torch.float32])


def random_gammas(kind: str, heads: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "default":
        return decay_gammas(heads)
    if kind == "paper":
        return decay_gammas(heads, use_default_gamma=False)
    exponent = -0.3 - 3.0 * torch.rand(heads, generator=gen, dtype=torch.float64)  # 1-gamma in 5e-4..0.5
    return 1 - 10**exponent


@st.composite
def problems(draw, lengths=LENGTHS):
    """Batch, heads, dims, length, decays, per-row prefix lengths (the offsets) and an input scale.

    The scale spans inputs whose |sum R| stays below 1 (clamp inactive) and far above it (active).
    """
    batch, heads = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    return dict(
        batch=batch,
        heads=heads,
        key_dim=draw(st.sampled_from([1, 2, 4, 8, 16])),
        value_dim=draw(st.integers(1, 12)),
        seq_len=draw(lengths),
        gamma_kind=draw(st.sampled_from(["default", "paper", "random"])),
        offset_kind=draw(st.sampled_from(["zero", "int", "tensor"])),
        max_prefix=draw(st.sampled_from([0, 5, 60, 300])),
        scale=draw(st.sampled_from([0.05, 1.0, 4.0])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def make_inputs(p, extra_len=0):
    """Tokens for ``max_prefix + seq_len + extra_len`` positions and each row's prefix length."""
    gen = torch.Generator().manual_seed(p["seed"])
    b, h, total = p["batch"], p["heads"], p["max_prefix"] + p["seq_len"] + extra_len

    def draw(dim):
        return p["scale"] * torch.randn(b, h, total, dim, generator=gen, dtype=torch.float64)

    q, k, v = draw(p["key_dim"]), draw(p["key_dim"]), draw(p["value_dim"])
    if p["offset_kind"] == "zero" or p["max_prefix"] == 0:
        prefix = [0] * b
    elif p["offset_kind"] == "int":
        prefix = [p["max_prefix"]] * b
    else:
        prefix = torch.randint(0, p["max_prefix"] + 1, (b,), generator=gen).tolist()
    return q, k, v, random_gammas(p["gamma_kind"], h, gen), prefix


def offset_argument(p, prefix):
    if p["offset_kind"] == "tensor":
        return torch.tensor(prefix, dtype=torch.long)
    return prefix[0]


def reference_per_row(q, k, v, gammas, prefix, call_start):
    """Naive outputs of the call tokens ``[call_start, end)``, the states before and after the call.

    Row b's sequence begins at ``call_start - prefix[b]`` (its position 0); earlier tokens are unused.
    """
    outs, before, after = [], [], []
    for row, row_prefix in enumerate(prefix):
        begin = call_start - row_prefix
        row_tokens = [x[row : row + 1, :, begin:] for x in (q, k, v)]
        out, state_after = naive_retention(*row_tokens, gammas)
        outs.append(out[:, :, row_prefix:])
        after.append(state_after)
        if row_prefix > 0:
            before.append(naive_retention(*(x[:, :, :row_prefix] for x in row_tokens), gammas)[1])
        else:
            before.append(tuple(torch.zeros_like(s) for s in state_after))
    stack = lambda states: tuple(torch.cat(parts) for parts in zip(*states, strict=True))  # noqa: E731
    return torch.cat(outs), stack(before), stack(after)


def run_mode(mode, q, k, v, log_gamma, chunk_size, **kwargs):
    return retention(q, k, v, log_gamma, retention_mode=mode, block_size=chunk_size, **kwargs)


def assert_close(actual, expected, dtype, what):
    err = rel_err(actual, expected)
    assert err <= TOLERANCE[dtype], f"{what}: relative error {err:.3e} > {TOLERANCE[dtype]:.0e}"


# ------------------------------------------------------------------------------------------------
# Every mode equals the definition
# ------------------------------------------------------------------------------------------------


@settings(max_examples=40, **SETTINGS)
@given(p=problems(), mode=st.sampled_from(RETENTION_MODES), chunk_size=CHUNK_SIZES, dtype=DTYPES)
@pytest.mark.heavy
def test_mode_matches_definition_with_offsets_and_incoming_state(p, mode, chunk_size, dtype):
    """Call tokens continue a per-row prefix: offset = prefix length, state = the prefix's state."""
    q, k, v, gammas, prefix = make_inputs(p)
    call_start = p["max_prefix"]
    expected, state_in, state_out = reference_per_row(q, k, v, gammas, prefix, call_start)

    call = [x[:, :, call_start:].to(dtype) for x in (q, k, v)]
    fresh_start = max(prefix) == 0 and p["seed"] % 2  # also exercise state=None
    state = None if fresh_start else tuple(s.to(dtype) for s in state_in)
    out, (kv, z) = run_mode(
        mode,
        *call,
        gammas.log(),
        chunk_size,
        position_offset=offset_argument(p, prefix),
        state=state,
        return_state=True,
    )
    assert out.dtype == dtype and out.shape == expected.shape
    assert_close(out, expected, dtype, f"{mode} output")
    assert_close(kv, state_out[0], dtype, f"{mode} kv state")
    assert_close(z, state_out[1], dtype, f"{mode} z state")


@settings(max_examples=30, **SETTINGS)
@given(
    p=problems(),
    first=st.sampled_from(RETENTION_MODES),
    second=st.sampled_from(RETENTION_MODES),
    chunk_sizes=st.tuples(CHUNK_SIZES, CHUNK_SIZES),
    split_fraction=st.floats(0, 1),
    dtype=DTYPES,
)
def test_state_handoff_between_modes(p, first, second, chunk_sizes, split_fraction, dtype):
    """Run [0, split) in one mode with return_state, continue [split, T) in another: equals one pass."""
    p = dict(p, offset_kind="zero", max_prefix=0, seq_len=p["seq_len"] + 1)
    q, k, v, gammas, prefix = make_inputs(p)
    seq_len = p["seq_len"]
    split = 1 + round(split_fraction * (seq_len - 2)) if seq_len > 2 else 1
    expected, (kv_ref, z_ref) = naive_retention(q, k, v, gammas)
    q, k, v, log_gamma = q.to(dtype), k.to(dtype), v.to(dtype), gammas.log()

    head, state = run_mode(
        first, q[:, :, :split], k[:, :, :split], v[:, :, :split], log_gamma, chunk_sizes[0], return_state=True
    )
    offset = split if p["seed"] % 2 else torch.full((p["batch"],), split)
    tail, (kv, z) = run_mode(
        second,
        q[:, :, split:],
        k[:, :, split:],
        v[:, :, split:],
        log_gamma,
        chunk_sizes[1],
        position_offset=offset,
        state=state,
        return_state=True,
    )
    assert_close(torch.cat([head, tail], dim=2), expected, dtype, f"{first} -> {second} output")
    assert_close(kv, kv_ref, dtype, f"{first} -> {second} kv state")
    assert_close(z, z_ref, dtype, f"{first} -> {second} z state")


@settings(max_examples=30, **SETTINGS)
@given(p=problems(), chunk_size=CHUNK_SIZES, offset=st.integers(-5, 10_000), dtype=DTYPES)
def test_modes_agree_with_arbitrary_state(p, chunk_size, offset, dtype):
    """Any incoming state (not necessarily one a prefix could produce) and any offset: the three modes
    give the same outputs and states; the float64 parallel pass is the reference."""
    gen = torch.Generator().manual_seed(p["seed"] + 1)
    q, k, v, gammas, _ = make_inputs(p)
    q, k, v = (x[:, :, : p["seq_len"]] for x in (q, k, v))
    shape = (p["batch"], p["heads"], p["key_dim"])
    state = (
        10 * torch.randn(*shape, p["value_dim"], generator=gen, dtype=torch.float64),
        10 * torch.randn(*shape, generator=gen, dtype=torch.float64),
    )
    expected, (kv_ref, z_ref) = parallel_retention(
        q, k, v, gammas.log(), position_offset=offset, state=state, return_state=True
    )
    cast = [x.to(dtype) for x in (q, k, v)]
    cast_state = tuple(s.to(dtype) for s in state)
    for mode in RETENTION_MODES:
        out, (kv, z) = run_mode(
            mode, *cast, gammas.log(), chunk_size, position_offset=offset, state=cast_state, return_state=True
        )
        assert_close(out, expected, dtype, f"{mode} output")
        assert_close(kv, kv_ref, dtype, f"{mode} kv state")
        assert_close(z, z_ref, dtype, f"{mode} z state")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    ("seq_len", "chunk_size", "gamma_kind"), [(1500, 97, "paper"), (1200, 256, "random")]
)
def test_long_sequences(seq_len, chunk_size, gamma_kind, dtype):
    """The long end of the length range (kept out of hypothesis to bound the runtime)."""
    p = dict(
        batch=1,
        heads=2,
        key_dim=8,
        value_dim=8,
        seq_len=seq_len,
        gamma_kind=gamma_kind,
        offset_kind="zero",
        max_prefix=0,
        scale=1.0,
        seed=seq_len,
    )
    q, k, v, gammas, _ = make_inputs(p)
    expected, (kv_ref, z_ref) = naive_retention(q, k, v, gammas)
    for mode in RETENTION_MODES:
        out, (kv, z) = run_mode(
            mode, q.to(dtype), k.to(dtype), v.to(dtype), gammas.log(), chunk_size, return_state=True
        )
        assert_close(out, expected, dtype, f"{mode} output")
        assert_close(kv, kv_ref, dtype, f"{mode} kv state")
        assert_close(z, z_ref, dtype, f"{mode} z state")


@settings(max_examples=25, **SETTINGS)
@given(
    p=problems(lengths=st.integers(1, 60)),
    chunk_size=CHUNK_SIZES,
    pads=st.lists(st.integers(0, 12), min_size=3, max_size=3),
)
def test_left_padding_then_decoding(p, chunk_size, pads):
    """Left-padded rows (negative offsets, zeroed pad keys/values) give each row its own unpadded result,
    and per-row offsets keep decoding each row correctly afterwards."""
    batch, seq_len, decode_steps = p["batch"], p["seq_len"], 3
    pads = pads[:batch]
    p = dict(p, offset_kind="zero", max_prefix=0, seq_len=max(pads) + seq_len)
    q, k, v, gammas, _ = make_inputs(p, extra_len=decode_steps)
    real = torch.ones(batch, 1, q.shape[2], 1, dtype=torch.float64)
    for row, pad in enumerate(pads):
        real[row, :, : max(pads) - pad] = 0
    k, v = k * real, v * real
    first_real = [max(pads) - pad for pad in pads]
    offsets = torch.tensor([-f for f in first_real])
    prompt = p["seq_len"]

    for mode in RETENTION_MODES:
        out, state = run_mode(
            mode,
            q[:, :, :prompt],
            k[:, :, :prompt],
            v[:, :, :prompt],
            gammas.log(),
            chunk_size,
            position_offset=offsets,
            state=None,
            return_state=True,
        )
        assert torch.isfinite(out).all()
        steps = []
        for t in range(prompt, prompt + decode_steps):
            step, state = recurrent_retention(
                q[:, :, t : t + 1],
                k[:, :, t : t + 1],
                v[:, :, t : t + 1],
                gammas.log(),
                position_offset=offsets + t,
                state=state,
                return_state=True,
            )
            steps.append(step)
        out = torch.cat([out, *steps], dim=2)
        for row, begin in enumerate(first_real):
            row_tokens = [x[row : row + 1, :, begin:] for x in (q, k, v)]
            expected, (kv_ref, z_ref) = naive_retention(*row_tokens, gammas)
            assert_close(out[row : row + 1, :, begin:], expected, torch.float64, f"{mode} row {row}")
            assert_close(state[0][row : row + 1], kv_ref, torch.float64, f"{mode} kv row {row}")
            assert_close(state[1][row : row + 1], z_ref, torch.float64, f"{mode} z row {row}")


# ------------------------------------------------------------------------------------------------
# The clamp is exercised, gradients agree, half precision stays finite
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", RETENTION_MODES)
def test_denominator_clamp_is_active_and_exact(mode):
    """Positive queries and keys make |sum_m R[n,m]| >> 1, so the clamp divides; the result must match
    the definition and differ clearly from the same formula without that division (so the tests above are not
    passing only because the clamp is 1 everywhere). A tiny input scale checks the other branch."""
    gen = torch.Generator().manual_seed(0)
    b, h, t, d = 2, 3, 200, 8
    gammas = decay_gammas(h)
    q, k = (torch.rand(b, h, t, d, generator=gen, dtype=torch.float64) + 0.5 for _ in range(2))
    v = torch.randn(b, h, t, d, generator=gen, dtype=torch.float64)

    expected, _ = naive_retention(q, k, v, gammas)
    unclamped, _ = naive_retention(q, k, v, gammas, clamp=False)
    out, _ = run_mode(mode, q, k, v, gammas.log(), 37)
    assert rel_err(out, expected) <= 1e-10
    assert rel_err(out, unclamped) > 0.1  # the clamp changes the answer by far more than rounding

    q_small = q * 1e-3  # |sum R| < 1 everywhere: the clamp must leave the scores undivided
    expected_small, _ = naive_retention(q_small, k, v, gammas)
    out_small, _ = run_mode(mode, q_small, k, v, gammas.log(), 37)
    assert rel_err(out_small, expected_small) <= 1e-10
    unclamped_small, _ = naive_retention(q_small, k, v, gammas, clamp=False)
    assert torch.equal(expected_small, unclamped_small)  # the divisor was exactly 1 everywhere


def test_gradients_agree_between_modes():
    """Training may use any mode: gradients wrt q, k, v and the incoming state match (float64)."""
    gen = torch.Generator().manual_seed(1)
    b, h, t, dk, dv = 2, 3, 45, 4, 5
    inputs = [torch.randn(b, h, t, d, generator=gen, dtype=torch.float64) for d in (dk, dk, dv)]
    state = [
        torch.randn(b, h, dk, dv, generator=gen, dtype=torch.float64),
        torch.randn(b, h, dk, generator=gen, dtype=torch.float64),
    ]
    weights = torch.randn(b, h, t, dv, generator=gen, dtype=torch.float64)
    log_gamma = decay_gammas(h, use_default_gamma=False).log()

    def gradients(mode):
        leaves = [x.clone().requires_grad_() for x in inputs + state]
        out, (kv, z) = run_mode(
            mode, *leaves[:3], log_gamma, 8, position_offset=17, state=tuple(leaves[3:]), return_state=True
        )
        ((out * weights).sum() + kv.square().sum() + z.sum()).backward()
        return [leaf.grad for leaf in leaves]

    reference = gradients("parallel")
    for mode in ("chunkwise", "recurrent"):
        for got, want in zip(gradients(mode), reference, strict=True):
            assert rel_err(got, want) <= 1e-10


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", RETENTION_MODES)
def test_half_precision_4096_tokens(mode, dtype):
    """4096 tokens in fp16/bf16 with a state beyond the fp16 range (> 65504): no NaN/inf, and close to
    float32 on the same (rounded) inputs. Only the final cast should differ: tolerance 2e-3 for fp16
    (unit roundoff 4.9e-4), 1e-2 for bf16 (3.9e-3)."""
    gen = torch.Generator().manual_seed(2)
    b, h, t, d = 1, 2, 4096, 16
    q, k, v = (16 * torch.randn(b, h, t, d, generator=gen) for _ in range(3))
    k, v = k.abs(), v.abs()  # coherent keys and values make the running sums large
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    log_gamma = decay_gammas(h, use_default_gamma=False).log()

    out, (kv, z) = run_mode(mode, q, k, v, log_gamma, 256, return_state=True)
    expected, (kv_ref, z_ref) = chunkwise_retention(
        q.float(), k.float(), v.float(), log_gamma, block_size=256, return_state=True
    )
    assert out.dtype == dtype and kv.dtype == torch.float32 and z.dtype == torch.float32
    assert torch.isfinite(out).all() and torch.isfinite(kv).all() and torch.isfinite(z).all()
    assert kv_ref.abs().max() > 65504  # a half-precision state would have overflowed
    tolerance = 2e-3 if dtype == torch.float16 else 1e-2
    assert rel_err(out, expected) <= tolerance
    assert rel_err(kv, kv_ref) <= 1e-5 and rel_err(z, z_ref) <= 1e-5


# ------------------------------------------------------------------------------------------------
# Decays and bad input
# ------------------------------------------------------------------------------------------------


def test_decay_gammas():
    default = decay_gammas(4, use_default_gamma=True)
    assert default.dtype == torch.float64
    assert torch.equal(
        default, torch.tensor([1 - 1 / 32, 1 - 1 / 64, 1 - 1 / 128, 1 - 1 / 256], dtype=torch.float64)
    )
    paper = decay_gammas(5, use_default_gamma=False)
    assert torch.equal(paper, decay_gammas(5))  # the paper's schedule is the default everywhere
    assert abs(paper[0].item() - (1 - 1 / 32)) < 1e-7 and abs(paper[-1].item() - (1 - 1 / 512)) < 1e-7
    assert torch.all(paper[1:] > paper[:-1])
    with pytest.raises(ValueError, match="num_heads"):
        decay_gammas(0)


def _good_inputs():
    q = torch.randn(2, 3, 5, 4)
    return q, torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 6), decay_gammas(3).log()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(retention_mode="sideways"), "unknown retention mode 'sideways'; expected one of"),
        (dict(retention_mode="chunkwise", block_size=0), "block_size must be a positive integer"),
        (dict(retention_mode="chunkwise", block_size=-3), "block_size must be a positive integer"),
        (dict(retention_mode="chunkwise", block_size=None), "block_size must be a positive integer"),
        (dict(retention_mode="chunkwise", block_size=2.5), "block_size must be a positive integer"),
        (dict(k=torch.randn(2, 3, 5, 5)), "same shape"),
        (dict(v=torch.randn(2, 3, 4, 6)), "same shape"),
        (dict(q=torch.randn(3, 5, 4)), "must be 4-D"),
        (
            dict(q=torch.randn(2, 3, 0, 4), k=torch.randn(2, 3, 0, 4), v=torch.randn(2, 3, 0, 6)),
            "must be >= 1",
        ),
        (dict(log_gamma=torch.full((2,), -0.1)), r"log_gamma must have shape \(heads,\)"),
        (dict(log_gamma=torch.zeros(3)), "log_gamma must be negative"),
        (dict(position_offset=torch.tensor([1.0, 2.0])), "integer tensor of shape"),
        (dict(position_offset=torch.tensor([1, 2, 3])), "integer tensor of shape"),
        (dict(position_offset=1.5), "position_offset must be an int"),
        (dict(state=(torch.zeros(2, 3, 4, 5), torch.zeros(2, 3, 4))), "state shapes must be kv"),
        (dict(state=(torch.zeros(2, 3, 4, 6), torch.zeros(2, 3))), "state shapes must be kv"),
        (dict(state=torch.zeros(2, 3, 4, 6)), r"state must be a pair \(kv, z\)"),
    ],
)
@pytest.mark.parametrize("mode", RETENTION_MODES)
def test_bad_input_raises_value_error(change, message, mode):
    q, k, v, log_gamma = _good_inputs()
    args = dict(q=q, k=k, v=v, log_gamma=log_gamma, retention_mode=mode, block_size=2)
    args.update(change)
    with pytest.raises(ValueError, match=message):
        retention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("log_gamma"), **args)


# ------------------------------------------------------------------------------------------------
# The optional fla (GPU) path: its glue is checked on CPU against an emulated kernel
# ------------------------------------------------------------------------------------------------


def emulated_fla_chunk_retention(
    q, k, v, scale=None, initial_state=None, output_final_state=False, wrong=False
):
    """fla's contract, token by token: h_t = gamma_h h_(t-1) + k_t v_t^T, o_t = scale q_t h_t, with
    gamma_h = 1 - 2^(-5-h), layouts (batch, seq, heads, dim) and state (batch, heads, K, V)."""
    gammas = decay_gammas(q.shape[2], use_default_gamma=True).to(q.dtype)[:, None, None]
    scale = q.shape[-1] ** -0.5 if scale is None or wrong else scale
    state = initial_state.to(q.dtype)
    outs = []
    for t in range(q.shape[1]):
        state = gammas * state + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(scale * (q[:, t, :, None, :] @ state).squeeze(-2))
    return torch.stack(outs, dim=1), state


def test_fla_path_glue_with_emulated_kernel(monkeypatch):
    """The ones-channel trick, layouts and normalisation around fla's kernel give our retention; the
    one-time self-check accepts a faithful kernel and refuses one that scales differently; CPU tensors
    never take the path."""
    import retlm.ops.retention.fla as ops

    gen = torch.Generator().manual_seed(3)
    b, h, t, dk, dv = 2, 3, 70, 8, 6
    q, k, v = (torch.randn(b, h, t, d, generator=gen) for d in (dk, dk, dv))
    state = (torch.randn(b, h, dk, dv, generator=gen), torch.randn(b, h, dk, generator=gen))
    log_gamma = decay_gammas(h, use_default_gamma=True).log()  # fla's fixed schedule
    offset = torch.tensor([5, 300])

    monkeypatch.setattr(ops, "_fla_kernel", lambda: emulated_fla_chunk_retention)
    assert not ops.fla_available(q, log_gamma)  # CPU: never
    assert ops._fla_self_check(torch.device("cpu"), torch.float32)
    out, (kv, z) = ops.fla_chunkwise_retention(q, k, v, log_gamma, offset, state, True)
    expected, (kv_ref, z_ref) = parallel_retention(
        q, k, v, log_gamma, position_offset=offset, state=state, return_state=True
    )
    assert rel_err(out, expected) <= 1e-5 and rel_err(kv, kv_ref) <= 1e-5 and rel_err(z, z_ref) <= 1e-5

    wrong_scale = lambda *args, **kwargs: emulated_fla_chunk_retention(*args, **kwargs, wrong=True)  # noqa: E731
    monkeypatch.setattr(ops, "_fla_kernel", lambda: wrong_scale)
    assert not ops._fla_self_check(torch.device("cpu"), torch.float32)


@pytest.mark.parametrize(
    "call",
    [
        lambda q, k, v, g, **kw: parallel_retention(q, k, v, g, **kw),
        lambda q, k, v, g, **kw: chunkwise_retention(q, k, v, g, block_size=2, **kw),
        lambda q, k, v, g, **kw: recurrent_retention(q, k, v, g, **kw),
    ],
    ids=RETENTION_MODES,
)
def test_each_public_mode_function_checks_its_inputs(call):
    """The checks run at every public entry, not only in the dispatcher."""
    q, k, v, log_gamma = _good_inputs()
    with pytest.raises(ValueError, match="state shapes must be kv"):
        call(q, k, v, log_gamma, state=(torch.zeros(2, 3, 4, 5), torch.zeros(2, 3, 4)))
    with pytest.raises(ValueError, match="log_gamma must be negative"):
        call(q, k, v, torch.zeros(3))


def test_old_argument_names_still_work_with_a_deprecation_warning():
    """``mode`` and ``chunk_size`` (the names before ``retention_mode`` and ``block_size``) give the same
    result for one release, with a DeprecationWarning; passing both names is an error."""
    q, k, v, log_gamma = _good_inputs()
    expected, _ = retention(q, k, v, log_gamma, retention_mode="chunkwise", block_size=2)
    with pytest.warns(DeprecationWarning, match="mode= is deprecated; use retention_mode="):
        old, _ = retention(q, k, v, log_gamma, mode="chunkwise", block_size=2)
    assert torch.equal(old, expected)
    with pytest.warns(DeprecationWarning, match="chunk_size= is deprecated; use block_size="):
        old, _ = chunkwise_retention(q, k, v, log_gamma, chunk_size=2)
    assert torch.equal(old, expected)
    with pytest.raises(TypeError, match="pass block_size= only"):
        retention(q, k, v, log_gamma, retention_mode="chunkwise", block_size=2, chunk_size=2)
