"""The linear family's PyTorch forms held equal: chunked (reference) = recurrent (decode) = naive quadratic oracle.

Tolerance rule (as FlashAttention's tests): an implementation's max-abs error
against the fp64 naive oracle may be at most twice that of the naive oracle
computed in the same dtype, plus a floor scaled by the output's magnitude
(lightning's core is unnormalised). A masking, decay or state-carry bug is off
by O(1) and fails.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import FLOOR, max_err

from methods import Unsupported, build
from methods.base import Shape
from methods.linear_attention import (
    LIGHTNING_CAPS,
    alibi_slopes,
    linear_attention_chunked,
    linear_attention_step,
    naive_linear_attention,
)

LENGTHS = [(1, 1), (17, 17), (100, 100), (300, 300), (17, 300), (300, 17)]
IDS = [f"{a}x{b}" for a, b in LENGTHS]
# based is tested separately: its window half comes from the sparse family.
METHOD_PARAMS = {"linear": {}, "performer": {"nb_features": 64}, "cosformer": {}, "lightning": {}}


def qkv(n_q: int, n_k: int, d: int = 32, dtype: torch.dtype = torch.float32, b: int = 1, h: int = 2):
    return tuple(torch.randn(b, h, n, d).to(dtype) for n in (n_q, n_k, n_k))


def bound(same_dtype_err: float, exact: torch.Tensor, dtype: torch.dtype) -> float:
    scale = max(1.0, float(exact.detach().abs().max())) if exact.numel() else 1.0
    return 2 * same_dtype_err + FLOOR[dtype] * scale


def causal_patterns(name: str) -> list[bool]:
    return [True] if name == "lightning" else [False, True]


# --- the core: chunked = naive, for every flag combination -------------------------------------------------------


# (causal, decay, normalize): decay is a causal recurrence only.
FLAGS = [(False, False, True), (False, False, False), (True, False, True), (True, False, False), (True, True, False),
         (True, True, True)]  # fmt: skip


@pytest.mark.parametrize("chunk", [16, 64])
@pytest.mark.parametrize("causal,decay,normalize", FLAGS, ids=["full", "full-nonorm", "causal", "causal-nonorm",
                                                               "lightning", "decay-norm"])  # fmt: skip
@pytest.mark.parametrize("n_q,n_k", LENGTHS, ids=IDS)
def test_chunked_core_matches_naive(n_q, n_k, causal, decay, normalize, chunk):
    phi_q, phi_k, v = qkv(n_q, n_k, 24)
    phi_q, phi_k = torch.nn.functional.elu(phi_q) + 1, torch.nn.functional.elu(phi_k) + 1
    log_decay = torch.tensor([-0.3, -0.01]) if decay else None
    kw = dict(log_decay=log_decay, normalize=normalize)
    exact = naive_linear_attention(phi_q, phi_k, v, causal, **kw)
    same = naive_linear_attention(phi_q, phi_k, v, causal, dtype=torch.float32, **kw)
    out, _ = linear_attention_chunked(phi_q, phi_k, v, causal, chunk_size=chunk, **kw)
    assert out.shape == (1, 2, n_q, 24) and out.dtype == torch.float32
    assert max_err(out, exact) <= bound(max_err(same, exact), exact, torch.float32)
    if causal and n_q > n_k:
        assert torch.equal(out[:, :, : n_q - n_k], torch.zeros_like(out[:, :, : n_q - n_k]))


@pytest.mark.parametrize("causal,decay", [(False, False), (True, False), (True, True)], ids=["full", "causal", "decay"])
def test_state_carries_across_a_split(causal, decay):
    """chunked(first part) -> state -> chunked(second part, initial_state) equals one pass over the whole."""
    phi_q, phi_k, v = qkv(150, 150, 16)
    phi_q, phi_k = phi_q.exp(), phi_k.exp()
    kw = dict(log_decay=torch.tensor([-0.05, -0.2]) if decay else None, chunk_size=32)
    full, (s_full, z_full) = linear_attention_chunked(phi_q, phi_k, v, causal, output_final_state=True, **kw)
    split = 77  # not a multiple of the chunk: the final state of a short last chunk must be exact
    first, state = linear_attention_chunked(
        phi_q[:, :, :split], phi_k[:, :, :split], v[:, :, :split], causal, output_final_state=True, **kw
    )
    second, (s, z) = linear_attention_chunked(
        phi_q[:, :, split:], phi_k[:, :, split:], v[:, :, split:], causal, initial_state=state,
        output_final_state=True, **kw,
    )  # fmt: skip
    torch.testing.assert_close(s, s_full, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(z, z_full, rtol=1e-5, atol=1e-4)
    if causal:  # non-causal queries of the first part do not see the second part's keys
        torch.testing.assert_close(torch.cat([first, second], 2), full, rtol=1e-5, atol=1e-5)


def test_step_is_one_token_of_the_chunked_form():
    phi_q, phi_k, v = (t.exp() if i < 2 else t for i, t in enumerate(qkv(1, 1, 16)))
    state = (torch.randn(1, 2, 16, 16), torch.rand(1, 2, 16) * 5)
    decay = torch.tensor([-0.1, -1.0])
    out, (s, z) = linear_attention_step(phi_q, phi_k, v, state, log_decay=decay)
    ref, (s_ref, z_ref) = linear_attention_chunked(
        phi_q, phi_k, v, True, log_decay=decay, initial_state=state, output_final_state=True
    )
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(s, s_ref)
    torch.testing.assert_close(z, z_ref)


# --- the methods: reference = naive oracle --------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(METHOD_PARAMS))
@pytest.mark.parametrize("n_q,n_k", LENGTHS, ids=IDS)
def test_reference_fp32_matches_naive(name, n_q, n_k):
    q, k, v = qkv(n_q, n_k)
    attn = build(name, **METHOD_PARAMS[name])
    for causal in causal_patterns(name):
        out = attn(q, k, v, causal=causal)
        exact = attn.naive(q, k, v, causal)
        assert out.shape == q.shape and out.dtype == q.dtype
        assert max_err(out, exact) <= bound(max_err(attn.naive(q, k, v, causal, torch.float32), exact), exact, q.dtype)


@pytest.mark.parametrize("name", list(METHOD_PARAMS))
@pytest.mark.parametrize("n_q,n_k", [(17, 17), (300, 300), (17, 300)], ids=["17", "300", "17x300"])
def test_reference_fp16_within_twice_naive_fp16_error(name, n_q, n_k):
    q, k, v = qkv(n_q, n_k, 64, torch.float16)
    attn = build(name, **METHOD_PARAMS[name])
    for causal in causal_patterns(name):
        out = attn(q, k, v, causal=causal)
        exact = attn.naive(q, k, v, causal)
        same_dtype = attn.naive(q, k, v, causal, dtype=torch.float16)
        assert out.dtype == torch.float16
        assert max_err(out, exact) <= bound(max_err(same_dtype, exact), exact, torch.float16)


@pytest.mark.parametrize("name", list(METHOD_PARAMS))
def test_gradients_match_naive(name):
    q, k, v = (t.requires_grad_(True) for t in qkv(33, 47, 16))
    attn = build(name, chunk_size=16, **METHOD_PARAMS[name])
    for causal in causal_patterns(name):
        out = attn(q, k, v, causal=causal)
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
        ref = attn.naive(q64, k64, v64, causal)
        ref_grads = torch.autograd.grad(ref, (q64, k64, v64), torch.ones_like(ref))
        for g, r in zip(grads, ref_grads, strict=True):
            assert max_err(g, r) < 1e-4 * max(1.0, float(r.abs().max()))


# --- decode: recurrent = chunked, O(1) state, no mutation -----------------------------------------------------------


@pytest.mark.parametrize("name", list(METHOD_PARAMS))
def test_recurrent_decode_equals_causal_forward(name):
    """Prefill nothing, then decode token by token: every output is the causal forward's row."""
    n = 40
    params = dict(METHOD_PARAMS[name], **({"max_len": n} if name == "cosformer" else {}))
    attn = build(name, **params)
    q, k, v = qkv(n, n)
    full = attn(q, k, v, causal=True)
    state = attn.prefill(k[:, :, :0], v[:, :, :0])
    rows = []
    for t in range(n):
        out, state = attn.decode_step(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], state)
        rows.append(out)
    assert state.length == n
    assert max_err(torch.cat(rows, 2), full) < 1e-5


@pytest.mark.parametrize("name", list(METHOD_PARAMS))
def test_decode_is_last_row_and_does_not_mutate_state(name):
    attn = build(name, **METHOD_PARAMS[name])  # cosformer with max_len None: prefill fixes M = context + 1
    q, k, v = qkv(50, 50)
    full = attn(q, k, v, causal=True)
    assert max_err(attn.decode(q[:, :, -1:], k, v), full[:, :, -1:]) < 1e-5
    state = attn.prefill(k[:, :, :-1], v[:, :, :-1])
    before = (state.s.clone(), None if state.z is None else state.z.clone(), state.length)
    step = (q[:, :, -1:], k[:, :, -1:], v[:, :, -1:])
    first, _ = attn.decode_step(*step, state)
    second, _ = attn.decode_step(*step, state)
    assert torch.equal(first, second)
    assert torch.equal(state.s, before[0]) and state.length == before[2]
    assert (state.z is None) == (before[1] is None) and (state.z is None or torch.equal(state.z, before[1]))


def test_cosformer_refuses_positions_past_max_len():
    attn = build("cosformer", max_len=8)
    q, k, v = qkv(10, 10)  # positions 0..9: theta = pi/2 * 9/8 > pi/2
    with pytest.raises(ValueError, match="max_len"):
        attn(q, k, v, causal=True)


# --- method specifics -----------------------------------------------------------------------------------------------


def test_lightning_slopes_and_output_norm():
    assert torch.allclose(alibi_slopes(8), torch.tensor([2.0**-i for i in range(1, 9)]))
    assert alibi_slopes(6).shape == (6,) and bool((alibi_slopes(6) > 0).all())
    attn = build("lightning")
    q, k, v = qkv(64, 64, h=8)
    decay = attn.log_decay(8, q.device)
    torch.testing.assert_close(decay, -alibi_slopes(8))
    out = attn(q, k, v, causal=True)
    rms = out.pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), rtol=1e-3, atol=1e-3)  # RMSNorm over the head dim
    # decay_scale = 0 is TransNormer's NormAttention without decay
    flat = build("lightning", decay_scale=0.0)
    phi_q, phi_k = flat.featurize(q.double(), k.double(), True, dtype=torch.float64)
    plain = flat._post(naive_linear_attention(phi_q, phi_k, v, True, normalize=False))
    assert max_err(flat(q, k, v, causal=True), plain) < 1e-5
    assert max_err(out, plain) > 0.1  # the decay changes the result


def test_lightning_is_causal_only():
    with pytest.raises(Unsupported, match="causal recurrence"):
        LIGHTNING_CAPS.check(causal=False, cross=False, mode="fwd", dtype="float32")
    for impl in ("reference", "kernel"):
        with pytest.raises(Unsupported, match="causal recurrence"):
            build("lightning", impl=impl)(*qkv(8, 8), causal=False)


def test_based_linear_half_matches_naive():
    """Based's Taylor half needs no window method: it is held to the naive oracle on its own."""
    attn = build("based", feature_dim=8)
    for n_q, n_k in [(17, 17), (100, 300)]:
        q, k, v = qkv(n_q, n_k)
        for causal in (False, True):
            phi_q, phi_k = attn.featurize(q.double(), k.double(), causal, dtype=torch.float64)
            exact = naive_linear_attention(phi_q, phi_k, v, causal)
            assert max_err(attn.linear_part(q, k, v, causal), exact) < 1e-5


@pytest.mark.parametrize("n_q,n_k", [(17, 17), (300, 300), (17, 300)], ids=["17", "300", "17x300"])
def test_based_is_linear_half_plus_window(n_q, n_k):
    attn = build("based", window=16)
    window = build("sliding_window", impl="reference", window=16)
    q, k, v = qkv(n_q, n_k)
    for causal in (False, True):
        out = attn(q, k, v, causal=causal)
        expected = attn.linear_part(q, k, v, causal) + window(q, k, v, causal=causal)
        assert max_err(out, expected) < 1e-5
        exact = attn.naive(q, k, v, causal)
        assert max_err(out, exact) <= bound(max_err(attn.naive(q, k, v, causal, torch.float32), exact), exact, q.dtype)


def test_based_fp16_within_twice_naive_fp16_error():
    attn = build("based", window=32)
    q, k, v = qkv(200, 200, 64, torch.float16)
    for causal in (False, True):
        out = attn(q, k, v, causal=causal)
        exact = attn.naive(q, k, v, causal)
        assert out.dtype == torch.float16
        same_dtype = attn.naive(q, k, v, causal, dtype=torch.float16)
        assert max_err(out, exact) <= bound(max_err(same_dtype, exact), exact, torch.float16)


def test_based_decode_equals_causal_forward():
    attn = build("based", window=8)
    q, k, v = qkv(30, 30)
    full = attn(q, k, v, causal=True)
    assert max_err(attn.decode(q[:, :, -1:], k, v), full[:, :, -1:]) < 1e-5


# --- cost model -----------------------------------------------------------------------------------------------------


def test_state_bytes_are_constant_in_context():
    for name, feat, per_head_z in [("linear", 64, 64), ("cosformer", 128, 128), ("lightning", 64, 0)]:
        attn = build(name)
        small, large = (attn.state_bytes(2, 8, n, 64, torch.float16) for n in (1024, 65536))
        assert small == large == 2 * 8 * (feat * 64 + per_head_z) * 4, name  # fp32 state
    performer = build("performer", nb_features=256)
    assert performer.state_bytes(1, 1, 10**6, 64, torch.bfloat16) == (256 * 64 + 256) * 4
    # Based: the Taylor state (1 + 16 + 136 features) plus at most `window` tokens of KV cache.
    based = build("based", feature_dim=16, window=64)
    linear_part = (153 * 64 + 153) * 4
    window_kv = 2 * 64 * 64 * 2
    assert based.state_bytes(1, 1, 65536, 64, torch.float16) == based.state_bytes(1, 1, 4096, 64, torch.float16)
    assert based.state_bytes(1, 1, 65536, 64, torch.float16) >= linear_part + window_kv


def test_flops_count_the_chunked_algorithm():
    attn = build("linear")  # elu+1: 3 flops per element of the feature map
    n, d, c = 4096, 64, 64
    dense = Shape(batch=1, heads=1, seq_len=n, kv_len=n, head_dim=d, causal=False)
    assert attn.flops(dense, "fwd") == 3 * 2 * n * d + 4 * n * d * d + (n * d + 2 * n * d + n * d)
    causal = Shape(batch=2, heads=4, seq_len=n, kv_len=n, head_dim=d, causal=True)
    per_head = 3 * 2 * n * d + 2 * n * c * 2 * d + 4 * n * d * d + (n * c + 3 * n * d + n * d)
    assert attn.flops(causal, "fwd") == 8 * per_head
    assert attn.flops(causal, "fwd_bwd") == int(3 * 8 * per_head)
    # Linear in N, far below the dense 4 N^2 D of exact attention at long context.
    doubled = Shape(batch=2, heads=4, seq_len=2 * n, kv_len=2 * n, head_dim=d, causal=True)
    assert attn.flops(doubled, "fwd") == 2 * attn.flops(causal, "fwd")
    assert attn.flops(causal, "fwd") < 4 * 8 * (n * (n + 1) // 2) * d
    # Decode: one step, whatever the context.
    short, long = (Shape(1, 8, 1, kv, d, True) for kv in (1024, 65536))
    assert attn.flops(short, "decode") == attn.flops(long, "decode") == 8 * (3 * 2 * d + 4 * d * d + 3 * d + d)


def test_performer_flops_grow_with_features():
    shape = Shape(1, 1, 1024, 1024, 64, True)
    assert build("performer", nb_features=512).flops(shape, "fwd") > build("performer", nb_features=128).flops(
        shape, "fwd"
    )
    assert math.isclose(
        build("lightning").flops(shape, "fwd") / build("lightning").flops(Shape(1, 1, 2048, 2048, 64, True), "fwd"),
        0.5,
    )
