"""Fixed sparse patterns (sliding_window, sink_window, strided, bigbird): references, decode, FLOPs, peers.

References are held to the fp64 oracle given the same pattern as an explicit
mask_mod; the mask_mods themselves are held to the patterns' definitions
written out independently here (and to SDPA with that boolean mask).
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from helpers import max_err

from methods import BadParam, Unsupported, build
from methods.base import Shape
from methods.masks import dense_mask
from methods.oracle import oracle_attention

LENGTHS = [(1, 1), (17, 17), (100, 100), (300, 300), (17, 300), (300, 17)]
PARAMS = {
    "sliding_window": {"window": 40},
    "sink_window": {"window": 40, "sinks": 3},
    "strided": {"stride": 32, "summary": 4},
    "bigbird": {"block": 16, "window_blocks": 3, "global_blocks": 1, "random_blocks": 2},
}
FIXED = list(PARAMS)


def inputs(n_q, n_k, d=16, dtype=torch.float32, b=1, h=2):
    return tuple(torch.randn(b, h, n, d).to(dtype) for n in (n_q, n_k, n_k))


def pattern_mask(attn, n_q, n_k, causal):
    return attn.mask_mod(n_q, n_k, causal)


def expected_mask(name: str, params: dict, n_q: int, n_k: int, causal: bool) -> torch.Tensor:
    """The pattern from its paper's definition, element by element (independent of methods/masks.py)."""
    mask = torch.zeros(n_q, n_k, dtype=torch.bool)
    for i in range(n_q):
        p = i + n_k - n_q
        for j in range(n_k):
            if causal and j > p:
                continue
            if name in ("sliding_window", "sink_window"):
                w = params["window"]
                ok = (p - w < j) if causal else (abs(p - j) <= w // 2)
                ok = ok or j < params.get("sinks", 0)
            elif name == "strided":
                stride, c = params["stride"], params["summary"]
                ok = (j // stride == p // stride) or (j % stride >= stride - c)  # Python's // floors, as the pattern
            else:
                raise ValueError(name)
            mask[i, j] = ok
    return mask


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("n_q,n_k", LENGTHS, ids=[f"{a}x{b}" for a, b in LENGTHS])
@pytest.mark.parametrize("name", FIXED)
def test_reference_matches_oracle_and_counts_its_pairs(name, n_q, n_k, causal):
    q, k, v = inputs(n_q, n_k)
    attn = build(name, **PARAMS[name])
    mask_mod = pattern_mask(attn, n_q, n_k, causal)
    out = attn(q, k, v, causal=causal)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert max_err(out, oracle_attention(q, k, v, causal=causal, mask_mod=mask_mod)) < 1e-5
    # FLOPs count exactly the elements inside the pattern.
    assert attn.computed_pairs(n_q, n_k, causal) == int(dense_mask(mask_mod, n_q, n_k, causal).sum())


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("n_q,n_k", [(70, 70), (20, 70), (70, 20)])
@pytest.mark.parametrize("name", ["sliding_window", "sink_window", "strided"])
def test_mask_mod_is_the_papers_pattern(name, n_q, n_k, causal):
    """mask_mod == the definition; reference == SDPA given that definition as a boolean mask."""
    params = {
        "sliding_window": {"window": 9},
        "sink_window": {"window": 9, "sinks": 3},
        "strided": {"stride": 8, "summary": 2},
    }[name]
    attn = build(name, **params)
    expected = expected_mask(name, params, n_q, n_k, causal)
    assert torch.equal(dense_mask(pattern_mask(attn, n_q, n_k, causal), n_q, n_k, causal)[0, 0], expected)
    q, k, v = inputs(n_q, n_k, dtype=torch.float64)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=expected).nan_to_num(0.0)  # empty rows: 0, as ours
    assert max_err(attn(q, k, v, causal=causal), sdpa) < 1e-10


def test_bigbird_blocks_follow_the_paper():
    """Global rows/columns, the window of blocks, and exactly r seeded random blocks per non-global query block."""
    block, g, w, r = 8, 1, 3, 2
    attn = build("bigbird", block=block, window_blocks=w, global_blocks=g, random_blocks=r)
    n = 96  # 12 blocks
    for causal in (False, True):
        blocks = dense_mask(attn.mask_mod(n, n, causal), n, n, causal=False)[0, 0, ::block, ::block]
        for qb in range(n // block):
            row = blocks[qb]
            if qb < g:
                assert row.all()  # a global query block sees everything (the causal cut comes on top)
                continue
            window = set(range(qb - w + 1, qb + 1)) if causal else set(range(qb - w // 2, qb + w // 2 + 1))
            window &= set(range(n // block))
            assert all(row[kb] for kb in window) and all(row[kb] for kb in range(g))
            extra = {int(kb) for kb in row.nonzero()} - window - set(range(g))
            candidates = [kb for kb in range(g, n // block) if kb not in window and (kb < qb or not causal)]
            assert len(extra) == min(r, len(candidates)) and extra <= set(candidates)
    # Causal picks depend on the query block only: a longer sequence keeps the same rows; a new seed moves them.
    short = dense_mask(attn.mask_mod(64, 64, True), 64, 64, True)[0, 0]
    long = dense_mask(attn.mask_mod(96, 96, True), 96, 96, True)[0, 0]
    assert torch.equal(short, long[:64, :64])
    other = build("bigbird", block=block, window_blocks=w, global_blocks=g, random_blocks=r, seed=1)
    assert not torch.equal(long, dense_mask(other.mask_mod(96, 96, True), 96, 96, True)[0, 0])


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("name", FIXED)
def test_reference_gradients_match_oracle(name, causal):
    q, k, v = (t.requires_grad_(True) for t in inputs(53, 67))
    attn = build(name, **PARAMS[name])
    out = attn(q, k, v, causal=causal)
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref = oracle_attention(q64, k64, v64, causal=causal, mask_mod=pattern_mask(attn, 53, 67, causal))
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), torch.ones_like(ref))
    for g, r in zip(grads, ref_grads, strict=True):
        assert max_err(g, r) < 1e-4


@pytest.mark.parametrize("name", FIXED)
def test_reference_fp16(name):
    q, k, v = inputs(100, 130, d=64, dtype=torch.float16)
    attn = build(name, **PARAMS[name])
    out = attn(q, k, v, causal=True)
    assert out.dtype == torch.float16
    assert max_err(out, oracle_attention(q, k, v, causal=True, mask_mod=pattern_mask(attn, 100, 130, True))) < 5e-3


def test_reference_cost_is_not_quadratic():
    """A 64k-token window reference: a masked N x N product would need 16 GiB of scores; ours needs a few MiB."""
    n, w = 65536, 32
    q, k, v = inputs(n, n, d=16, b=1, h=1)
    attn = build("sliding_window", window=w)
    start = time.perf_counter()
    out = attn(q, k, v, causal=True)
    assert time.perf_counter() - start < 20
    tail = oracle_attention(q[:, :, -5:], k, v, causal=True, mask_mod=pattern_mask(attn, 5, n, True))
    assert max_err(out[:, :, -5:], tail) < 1e-5


# --- decode -------------------------------------------------------------------------------------

DECODE_PARAMS = {
    "sliding_window": {"window": 8},
    "sink_window": {"window": 8, "sinks": 3},
    "strided": {"stride": 8, "summary": 2},
    "bigbird": {"block": 16, "window_blocks": 3, "global_blocks": 1, "random_blocks": 1},
}


@pytest.mark.parametrize("impl", ["reference", "kernel"])
@pytest.mark.parametrize("name", FIXED)
def test_decode_steps_are_the_causal_rows(name, impl):
    """Prefill, then steps across window wrap-arounds and block ends: each equals the forward's causal row."""
    n, n0 = 52, 40
    q, k, v = inputs(n, n)
    attn = build(name, impl=impl, **DECODE_PARAMS[name])
    full = oracle_attention(q, k, v, causal=True, mask_mod=pattern_mask(attn, n, n, True))
    state = attn.prefill(k[:, :, :n0], v[:, :, :n0], extra=n - n0)
    for p in range(n0, n):
        args = (q[:, :, p : p + 1], k[:, :, p : p + 1], v[:, :, p : p + 1])
        out, new_state = attn.decode_step(*args, state)
        again, _ = attn.decode_step(*args, state)  # the given state is not consumed: steps can be timed repeatedly
        assert torch.equal(out, again)
        assert max_err(out, full[:, :, p : p + 1]) < 1e-5, f"step {p}"
        state = new_state
    assert max_err(attn.decode(q[:, :, -1:], k, v), full[:, :, -1:]) < 1e-5  # the runner's one-step call


def test_state_bytes_follow_the_eviction_policy():
    fp16 = torch.float16
    window = build("sliding_window", window=256)
    assert window.state_bytes(1, 8, 100, 64, fp16) == 2 * 8 * 100 * 64 * 2
    assert window.state_bytes(1, 8, 4096, 64, fp16) == window.state_bytes(1, 8, 65536, 64, fp16) == 2 * 8 * 256 * 64 * 2
    sinks = build("sink_window", sinks=4, window=256)
    assert sinks.state_bytes(1, 1, 10**6, 64, fp16) == 2 * 260 * 64 * 2
    strided = build("strided", stride=128, summary=16)
    # columns + the current block's buffer, allocated whole
    assert strided.state_bytes(1, 1, 4096 + 5, 64, fp16) == 2 * (32 * 16 + 128) * 64 * 2
    bigbird = build("bigbird")
    assert bigbird.state_bytes(1, 1, 4096, 64, fp16) == 2 * 4096 * 64 * 2  # random blocks reach the whole past
    # The state that prefill builds is the size state_bytes reports.
    k = torch.randn(1, 1, 1000, 64, dtype=fp16)
    kept = build("sink_window", sinks=4, window=256).prefill(k, k).k_buf
    assert 2 * kept.numel() * 2 == sinks.state_bytes(1, 1, 1000, 64, fp16)


def test_flops_and_sparsity_from_the_computed_area():
    n, w, d = 4096, 256, 64
    attn = build("sliding_window", window=w)
    causal_pairs = sum(min(w, i + 1) for i in range(n))
    assert attn.flops(Shape(2, 4, n, n, d, True), "fwd") == 4 * 2 * 4 * causal_pairs * d
    assert attn.flops(Shape(1, 1, 1, n, d, True), "decode") == 4 * w * d
    full_pairs = sum(min(n - 1, i + w // 2) - max(0, i - w // 2) + 1 for i in range(n))
    assert attn.computed_pairs(n, n, False) == full_pairs
    # Long contexts are counted in closed form (no N x N mask), for every fixed pattern.
    for name in FIXED:
        start = time.perf_counter()
        pairs = build(name).computed_pairs(131072, 131072, True)
        assert 0 < pairs < 131072 * 131073 // 2 and time.perf_counter() - start < 5


@pytest.mark.parametrize(
    "name,params",
    [
        ("sliding_window", {"window": 0}),
        ("sink_window", {"sinks": -1}),
        ("strided", {"stride": 8, "summary": 9}),
        ("bigbird", {"window_blocks": 0}),
    ],
)
def test_bad_params_raise(name, params):
    with pytest.raises(BadParam, match=f"^method {name}: parameter .* must be"):
        build(name, **params)


def test_kernel_needs_a_power_of_two_block():
    """block 24 is a valid BigBird (the reference runs it) but not a kernel tile: `unsupported`, with the reason."""
    q, k, v = inputs(40, 40)
    assert build("bigbird", block=24)(q, k, v).isfinite().all()
    with pytest.raises(Unsupported, match="block to be a power of two >= 16, got 24"):
        build("bigbird", impl="kernel", block=24)(q, k, v)


# --- FlexAttention peers --------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_peers_match_oracle(monkeypatch):
    """bigbird through compiled FlexAttention (a captured block table); the others through eager FlexAttention.

    Compiling costs seconds per mask on a CPU, so only one pattern pays it;
    eager FlexAttention runs the same BlockMask and mask_mod our peers build.
    """
    from torch.nn.attention.flex_attention import flex_attention

    import methods.flex

    n_q, n_k = 200, 260
    q, k, v = inputs(n_q, n_k, d=32)

    def check(name, causal):
        attn = build(name, impl="flex", **PARAMS[name])
        oracle = oracle_attention(q, k, v, causal=causal, mask_mod=pattern_mask(attn, n_q, n_k, causal))
        assert max_err(attn(q, k, v, causal=causal), oracle) < 1e-5, (name, causal)

    with monkeypatch.context() as patch:
        patch.setattr(methods.flex, "compiled_flex", lambda: flex_attention)
        for name, causal in [
            ("sliding_window", False),
            ("sliding_window", True),
            ("sink_window", True),
            ("strided", True),
        ]:
            check(name, causal)
    check("bigbird", True)


def test_flex_refuses_backward_on_cpu_and_decode():
    q = torch.randn(1, 1, 64, 16, requires_grad=True)
    with pytest.raises(Unsupported, match="backward"):
        build("sliding_window", impl="flex")(q, q, q)
    assert not build("sliding_window", impl="flex").capabilities.decode
