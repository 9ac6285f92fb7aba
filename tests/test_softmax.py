"""Exact softmax: reference against the fp64 oracle, peers and kernel against the reference."""

import pytest
import torch
from helpers import FLOOR, max_err

from methods import UnknownName, Unsupported, build
from methods.base import Shape
from methods.oracle import oracle_attention

LENGTHS = [(1, 1), (17, 17), (128, 128), (300, 300), (17, 300), (300, 17)]


def inputs(n_q, n_k, d, dtype, b=1, h=2):
    q, k, v = torch.randn(b, h, n_q, d), torch.randn(b, h, n_k, d), torch.randn(b, h, n_k, d)
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n_q,n_k", LENGTHS)
@pytest.mark.parametrize("d", [16, 64, 128])
def test_reference_fp32_matches_oracle(causal, n_q, n_k, d):
    q, k, v = inputs(n_q, n_k, d, torch.float32)
    out = build("softmax", impl="reference")(q, k, v, causal=causal)
    assert out.shape == q.shape and out.dtype == torch.float32
    assert max_err(out, oracle_attention(q, k, v, causal=causal)) < 1e-5


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n_q,n_k", [(17, 17), (128, 300)])
def test_reference_fp16_within_half_precision(causal, n_q, n_k):
    q, k, v = inputs(n_q, n_k, 64, torch.float16)
    out = build("softmax", impl="reference")(q, k, v, causal=causal)
    assert out.dtype == torch.float16
    assert max_err(out, oracle_attention(q, k, v, causal=causal)) < 5e-3


@pytest.mark.parametrize("impl", ["sdpa", "sdpa_math"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n_q,n_k", LENGTHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sdpa_peers_within_twice_reference_error(impl, causal, n_q, n_k, dtype):
    q, k, v = inputs(n_q, n_k, 64, dtype)
    oracle = oracle_attention(q, k, v, causal=causal)
    ref_err = max_err(build("softmax", impl="reference")(q, k, v, causal=causal), oracle)
    out = build("softmax", impl=impl)(q, k, v, causal=causal)
    assert out.dtype == dtype
    assert max_err(out, oracle) <= 2 * ref_err + FLOOR[dtype]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n_q,n_k", [(128, 128), (300, 300), (128, 300)])
def test_flex_peer_matches_oracle(causal, n_q, n_k):
    q, k, v = inputs(n_q, n_k, 64, torch.float32)
    oracle = oracle_attention(q, k, v, causal=causal)
    ref_err = max_err(build("softmax", impl="reference")(q, k, v, causal=causal), oracle)
    out = build("softmax", impl="flex")(q, k, v, causal=causal)
    assert max_err(out, oracle) <= 2 * ref_err + FLOOR[torch.float32]


def test_flex_refuses_backward_on_cpu():
    q = torch.randn(1, 1, 128, 16, requires_grad=True)
    with pytest.raises(Unsupported, match="backward"):
        build("softmax", impl="flex")(q, q, q)


@pytest.mark.parametrize("impl", ["reference", "sdpa", "sdpa_math"])
@pytest.mark.parametrize("causal", [False, True])
def test_gradients_match_oracle(impl, causal):
    q, k, v = (t.requires_grad_(True) for t in inputs(33, 47, 16, torch.float32))
    out = build("softmax", impl=impl)(q, k, v, causal=causal)
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref = oracle_attention(q64, k64, v64, causal=causal)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), torch.ones_like(ref))
    for g, r in zip(grads, ref_grads, strict=True):
        assert float((g.double() - r).abs().max()) < 1e-4


@pytest.mark.parametrize("impl", ["reference", "sdpa", "sdpa_math", "kernel"])
def test_decode_is_the_last_row_of_causal_attention(impl):
    q, k, v = inputs(40, 40, 32, torch.float32)
    attn = build("softmax", impl=impl)
    full = oracle_attention(q, k, v, causal=True)
    step = attn.decode(q[:, :, -1:], k, v)
    assert step.shape == (1, 2, 1, 32)
    assert max_err(step, full[:, :, -1:]) < 1e-5


def test_flops_count_exact_area():
    attn = build("softmax")
    square = Shape(batch=2, heads=3, seq_len=100, kv_len=100, head_dim=64, causal=True)
    assert attn.flops(square, "fwd") == 4 * 2 * 3 * (100 * 101 // 2) * 64
    dense = Shape(batch=1, heads=1, seq_len=100, kv_len=100, head_dim=64, causal=False)
    assert attn.flops(dense, "fwd") == 4 * 100 * 100 * 64
    assert attn.flops(dense, "fwd_bwd") == int(3.5 * 4 * 100 * 100 * 64)
    assert attn.flops(dense, "bwd") == int(2.5 * 4 * 100 * 100 * 64)
    rect = Shape(batch=1, heads=1, seq_len=10, kv_len=30, head_dim=8, causal=True)
    assert attn.flops(rect, "fwd") == 4 * sum(range(21, 31)) * 8  # queries are tokens 20..29
    assert attn.flops(rect, "decode") == 4 * 30 * 8
    # Decode keeps a full KV cache: 2 tensors x B x H x N x D x bytes.
    assert attn.state_bytes(1, 8, 4096, 64, torch.float16) == 2 * 8 * 4096 * 64 * 2


def test_unknown_names_list_choices():
    with pytest.raises(UnknownName, match="choose from: .*softmax"):
        build("sofmax")
    with pytest.raises(UnknownName, match="flex.*kernel.*reference.*sdpa"):
        build("softmax", impl="fast")


def test_flash_attn_peer_is_unsupported_without_gpu_or_package():
    with pytest.raises(Unsupported, match="CUDA|flash-attn"):
        build("softmax", impl="flash_attn", device="cpu")
