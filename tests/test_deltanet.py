"""DeltaNet reference: chunked (WY/UT) forward = recurrent decode = a naive token-by-token oracle.

The oracle (`helpers.naive_deltanet`) restates the paper's form, `S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T` (the
transpose of its eq. with row vectors), in fp64 with the whole preparation (normalisation, beta) written
out again, so it shares no code with `methods/deltanet.py`.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import FLOOR, max_err, naive_deltanet
from helpers import deltanet_inputs as inputs

from methods import Unsupported, build, get_method
from methods.base import Shape
from methods.deltanet import DeltaState, delta_rule_chunked, delta_rule_recurrent

LENGTHS = [1, 17, 100, 300]


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("chunk_size", [64, 16])
def test_chunked_recurrent_naive_agree_fp32(n, chunk_size):
    q, k, v = inputs(n)
    attn = build("deltanet", chunk_size=chunk_size)
    out = attn(q, k, v, causal=True)
    assert out.shape == q.shape and out.dtype == torch.float32
    oracle = naive_deltanet(q, k, v, attn.w_beta)
    assert max_err(out, oracle) < 1e-5
    q_n, k_n, v_c, beta = attn.prepare(q, k, v)
    recurrent, s_rec = delta_rule_recurrent(q_n, k_n, v_c, beta)
    assert max_err(recurrent, oracle) < 1e-5
    _, s_chunk = delta_rule_chunked(q_n, k_n, v_c, beta, chunk_size)
    assert max_err(s_chunk, s_rec) < 1e-5
    assert oracle.abs().amax() > 1e-2  # the outputs are not trivially zero


def test_chunked_equals_naive_in_fp64_to_rounding():
    """In fp64 the chunked form is the recurrence to 1e-12: the WY algebra is exact, not an approximation."""
    q, k, v = inputs(300, dtype=torch.float64)
    attn = build("deltanet")
    assert max_err(attn(q, k, v, causal=True), naive_deltanet(q, k, v, attn.w_beta)) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [17, 300])
def test_half_precision_within_twice_recurrent_error(dtype, n):
    """Chunked error vs the fp64 oracle <= 2 x the same-dtype recurrent form's error + floor."""
    q, k, v = inputs(n, dtype=dtype)
    attn = build("deltanet")
    out = attn(q, k, v, causal=True)
    assert out.dtype == dtype
    oracle = naive_deltanet(q, k, v, attn.w_beta)
    q_n, k_n, v_c, beta = attn.prepare(q, k, v)
    recurrent = delta_rule_recurrent(q_n, k_n, v_c, beta)[0].to(dtype)
    assert max_err(out, oracle) <= 2 * max_err(recurrent, oracle) + FLOOR[dtype]


def test_distinct_value_dim_and_silu_and_scale():
    q, k, v = inputs(70, d_k=16, d_v=24, b=2)
    attn = build("deltanet", qk_activation="silu", scale=0.5, chunk_size=32)
    out = attn(q, k, v, causal=True)
    assert out.shape == (2, 2, 70, 24)
    assert max_err(out, naive_deltanet(q, k, v, attn.w_beta, scale=0.5, activation="silu")) < 1e-5


def test_decode_is_the_next_row_and_leaves_the_state_alone():
    q, k, v = inputs(90)
    attn = build("deltanet")
    full = attn(q, k, v, causal=True)
    state = attn.prefill(k[:, :, :80], v[:, :, :80])
    assert isinstance(state, DeltaState) and state.length == 80
    for t in range(80, 90):  # several steps in a row: each one's state feeds the next
        before = state.S.clone()
        out, new_state = attn.decode_step(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], state)
        assert torch.equal(state.S, before), "decode_step mutated its input state"
        assert max_err(out, full[:, :, t : t + 1].double()) < 1e-5
        assert new_state.length == t + 1
        state = new_state
    # The base API: the last cache entry is the query's own token.
    assert max_err(attn.decode(q[:, :, -1:], k, v), full[:, :, -1:].double()) < 1e-5


def test_decode_state_does_not_grow_with_context():
    attn = build("deltanet")
    shapes = {tuple(attn.prefill(*inputs(n)[1:]).S.shape) for n in (1, 10, 500)}
    assert shapes == {(1, 2, 32, 32)}
    assert attn.state_bytes(1, 8, 100, 64, torch.float16) == attn.state_bytes(1, 8, 100_000, 64, torch.float16)
    assert attn.state_bytes(2, 8, 4096, 64, torch.float16) == 2 * 8 * 64 * 64 * 4  # fp32 state


@pytest.mark.parametrize("n_q,n_k", [(17, 100), (100, 17), (1, 300)])
def test_cross_lengths_are_bottom_right_aligned(n_q, n_k):
    """Query i is token i + n_k - n_q: the rows of a square call at those positions; queries before every key are 0."""
    q, k, v = inputs(max(n_q, n_k))
    q, k, v = q[:, :, :n_q], k[:, :, :n_k], v[:, :, :n_k]
    attn = build("deltanet")
    out = attn(q, k, v, causal=True)
    assert out.shape == (1, 2, n_q, 32)
    seen = min(n_q, n_k)
    q_square = torch.zeros(1, 2, n_k, 32)
    q_square[:, :, n_k - seen :] = q[:, :, n_q - seen :]
    square = attn(q_square, k, v, causal=True)
    assert max_err(out[:, :, n_q - seen :], square[:, :, n_k - seen :].double()) < 1e-6
    assert max_err(out, naive_deltanet(q, k, v, attn.w_beta)) < 1e-5
    assert torch.equal(out[:, :, : n_q - seen], torch.zeros_like(out[:, :, : n_q - seen]))


def test_non_causal_is_unsupported_with_a_reason():
    attn = build("deltanet")
    with pytest.raises(Unsupported, match="causal recurrence"):
        attn(*inputs(8), causal=False)
    with pytest.raises(Unsupported, match="non-causal.*causal recurrence"):
        attn.capabilities.check(causal=False, cross=False, mode="fwd", dtype="float32")
    attn.capabilities.check(causal=True, cross=False, mode="decode", dtype="float16")


def test_gradients_match_the_naive_oracle():
    """Autograd through the chunked form (triangular solve included) reaches q, k, v and w_beta correctly."""
    q, k, v = (t.requires_grad_(True) for t in inputs(40))
    attn = build("deltanet", chunk_size=16, head_dim=32)
    out = attn(q, k, v, causal=True)
    grads = torch.autograd.grad(out, (q, k, v, attn.w_beta), torch.ones_like(out))
    q64, k64, v64, w64 = (t.detach().double().requires_grad_(True) for t in (q, k, v, attn.w_beta))
    ref = naive_deltanet(q64, k64, v64, w64)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64, w64), torch.ones_like(ref))
    for g, r in zip(grads, ref_grads, strict=True):
        assert float((g.double() - r).abs().max()) < 1e-4
    assert float(grads[3].abs().max()) > 0


def test_beta_projection_is_a_seeded_parameter():
    lazy = build("deltanet", seed=3)
    assert lazy.w_beta is None and list(lazy.parameters()) == []
    lazy(*inputs(5), causal=True)
    eager = build("deltanet", seed=3, head_dim=32)
    assert [name for name, _ in eager.named_parameters()] == ["w_beta"]
    assert torch.equal(lazy.w_beta, eager.w_beta)
    assert not torch.equal(eager.w_beta, build("deltanet", seed=4, head_dim=32).w_beta)
    assert float(eager.w_beta.detach().abs().max()) <= 1 / math.sqrt(32)  # U(-1/sqrt(d), 1/sqrt(d)), as nn.Linear
    with pytest.raises(Unsupported, match="head_dim 32"):
        eager(*inputs(5, d_k=16), causal=True)


def test_cost_model():
    attn = build("deltanet")
    assert get_method("deltanet").exact is False and attn.family == "linear"
    shape = Shape(batch=2, heads=3, seq_len=100, kv_len=100, head_dim=64, causal=True)
    per_chunk = 64 * 64 * (5 * 64 + 3 * 64) + 6 * 64 * 64 * 64
    assert attn.flops(shape, "fwd") == 2 * 3 * 2 * per_chunk  # 100 tokens -> 2 chunks of 64
    assert attn.flops(shape, "fwd_bwd") == int(3.5 * attn.flops(shape, "fwd"))
    assert attn.flops(shape, "decode") == 2 * 3 * 6 * 64 * 64
    assert attn.computed_pairs(100, 100, True) == 64 * 65 // 2 + 36 * 37 // 2
    assert attn.computed_pairs(1, 130, True) == 2  # token 129 is the 2nd of its chunk
    assert attn.computed_pairs(3, 64, True) == 62 + 63 + 64
