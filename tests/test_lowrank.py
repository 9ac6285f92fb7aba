"""Nystromformer and Linformer: references against their own definitions restated plainly in fp64, the
approximations against exact softmax where they must be exact, and the kernel impls under the interpreter."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import FLOOR, max_err

from methods import BadParam, Unsupported, build, get_method
from methods.base import Shape
from methods.lowrank import iterative_pinv, segment_means
from methods.oracle import oracle_attention


def inputs(n_q, n_k=None, d=32, dtype=torch.float32, b=1, h=2):
    n_k = n_q if n_k is None else n_k
    return torch.randn(b, h, n_q, d).to(dtype), torch.randn(b, h, n_k, d).to(dtype), torch.randn(b, h, n_k, d).to(dtype)


# --- Nystromformer: its definition, plainly -------------------------------------------------------------------


def naive_nystrom(q, k, v, m, iters=6):
    """fp64: token t in segment floor(t m / N); explicit means, softmaxes and pinv; the paper's association."""
    q, k, v = q.double(), k.double(), v.double()
    m = min(m, q.shape[-2], k.shape[-2])

    def landmarks(x):
        n = x.shape[-2]
        groups = [[t for t in range(n) if t * m // n == j] for j in range(m)]
        return torch.stack([x[:, :, g].mean(dim=2) for g in groups], dim=2)

    def softmax(s):
        e = torch.exp(s - s.max(dim=-1, keepdim=True).values)
        return e / e.sum(dim=-1, keepdim=True)

    scale = 1 / math.sqrt(q.shape[-1])
    q_l, k_l = landmarks(q), landmarks(k)
    k1 = softmax(q @ k_l.transpose(-1, -2) * scale)
    k2 = softmax(q_l @ k_l.transpose(-1, -2) * scale)
    k3 = softmax(q_l @ k.transpose(-1, -2) * scale)
    eye = torch.eye(m, dtype=torch.float64)
    norm_1 = k2.abs().sum(dim=-2).max(dim=-1).values  # max column sum
    norm_inf = k2.abs().sum(dim=-1).max(dim=-1).values  # max row sum (1 for a softmax)
    z = k2.transpose(-1, -2) / (norm_1 * norm_inf)[..., None, None]
    for _ in range(iters):
        kz = k2 @ z
        z = 0.25 * z @ (13 * eye - kz @ (15 * eye - kz @ (7 * eye - kz)))
    return (k1 @ z) @ (k3 @ v)


@pytest.mark.parametrize("n_q,n_k", [(1, 1), (17, 17), (100, 100), (300, 300), (128, 128), (50, 300), (300, 7)])
def test_nystrom_reference_matches_its_definition(n_q, n_k):
    q, k, v = inputs(n_q, n_k)
    out = build("nystromformer")(q, k, v)
    assert out.shape == q.shape and out.dtype == torch.float32
    ref = naive_nystrom(q, k, v, 64)
    assert max_err(out, ref) < 1e-4
    assert ref.abs().max() > 1e-2


def test_nystrom_with_one_landmark_per_token_is_exact_softmax():
    """landmarks == N: every kernel is the full softmax matrix A and the output is A pinv(A) A V = A V."""
    q, k, v = inputs(96)
    exact = oracle_attention(q, k, v)
    converged = build("nystromformer", num_landmarks=96, pinv_iters=20)(q.double(), k.double(), v.double())
    assert max_err(converged, exact) < 1e-10
    assert max_err(build("nystromformer", num_landmarks=96, pinv_iters=20)(q, k, v), exact) < 1e-4
    # The paper's 6 iterations are an approximation of the pseudo-inverse, visibly so here.
    assert max_err(build("nystromformer", num_landmarks=96)(q.double(), k.double(), v.double()), exact) > 1e-4


def test_segment_means_uneven_and_even():
    x = torch.randn(1, 2, 10, 3)
    means = segment_means(x, 4)  # 10 tokens in 4 segments: sizes 3, 2, 3, 2 (token t -> floor(4t/10))
    bounds = [(0, 3), (3, 5), (5, 8), (8, 10)]
    assert torch.allclose(means, torch.stack([x[:, :, a:b].mean(2) for a, b in bounds], dim=2))
    assert torch.allclose(segment_means(x, 5), x.reshape(1, 2, 5, 2, 3).mean(3))
    assert torch.equal(segment_means(x, 10), x)


def test_iterative_pinv_converges_to_the_pseudo_inverse():
    a = torch.softmax(torch.randn(3, 16, 16, dtype=torch.float64) * 2, dim=-1)
    exact = torch.linalg.pinv(a)
    assert float((iterative_pinv(a, 30) - exact).abs().max()) < 1e-8
    assert float((iterative_pinv(a, 1) - exact).abs().max()) > 1e-3


def test_nystrom_half_precision_within_twice_fp32_error():
    q, k, v = inputs(200, dtype=torch.float16)
    out = build("nystromformer")(q, k, v)
    assert out.dtype == torch.float16
    ref = naive_nystrom(q, k, v, 64)
    fp32_err = max_err(build("nystromformer")(q.float(), k.float(), v.float()).half(), ref)
    assert max_err(out, ref) <= 2 * fp32_err + FLOOR[torch.float16]


def test_nystrom_conv_skip_adds_a_seeded_depthwise_conv_of_v():
    q, k, v = inputs(40, h=3)
    plain = build("nystromformer")(q, k, v)
    attn = build("nystromformer", conv_kernel=5, seed=1)
    assert list(attn.parameters()) == []  # sized on the first call
    out = attn(q, k, v)
    w = attn.conv_weight.detach()
    assert w.shape == (3, 1, 5, 1)
    vp = torch.nn.functional.pad(v, (0, 0, 2, 2))
    conv = sum(w[None, :, 0, j, 0, None, None] * vp[:, :, j : j + 40] for j in range(5))
    assert max_err(out, plain + conv) < 1e-5
    eager = build("nystromformer", conv_kernel=5, seed=1, heads=3)
    assert torch.equal(eager.conv_weight, attn.conv_weight)
    assert not torch.equal(eager.conv_weight, build("nystromformer", conv_kernel=5, seed=2, heads=3).conv_weight)
    with pytest.raises(Unsupported, match="n_q == n_k"):
        attn(*inputs(10, 20, h=3))


def test_nystrom_is_non_causal_only():
    attn = build("nystromformer")
    with pytest.raises(Unsupported, match="landmarks are means over the whole sequence"):
        attn(*inputs(8), causal=True)
    for mode, causal in (("fwd", True), ("decode", True)):
        with pytest.raises(Unsupported):
            attn.capabilities.check(causal=causal, cross=False, mode=mode, dtype="float32")
    attn.capabilities.check(causal=False, cross=True, mode="fwd_bwd", dtype="float16")


def test_nystrom_cost_model():
    attn = build("nystromformer")
    assert get_method("nystromformer").exact is False and attn.family == "low-rank"
    n, d, m = 1000, 64, 64
    shape = Shape(batch=2, heads=3, seq_len=n, kv_len=n, head_dim=d, causal=False)
    per_head = 4 * n * m * d + 4 * m * n * d + 4 * m * m * d + 8 * m**3 * 6
    assert attn.flops(shape, "fwd") == 6 * per_head
    assert attn.computed_pairs(n, n, False) == 2 * n * m + m * m
    assert attn.state_bytes(1, 8, 4096, 64, torch.float16) == 2 * 8 * 64 * 64 * 2
    assert attn.state_bytes(1, 8, 10, 64, torch.float16) == 2 * 8 * 10 * 64 * 2  # fewer tokens than landmarks


@pytest.mark.parametrize(
    "n_q,n_k,dtype",
    [(17, 17, torch.float32), (300, 300, torch.float32), (100, 260, torch.float32), (200, 200, torch.float16)],
)
def test_nystrom_kernel_within_twice_reference_error(n_q, n_k, dtype):
    q, k, v = inputs(n_q, n_k, d=64, dtype=dtype)
    kernel = build("nystromformer", impl="kernel")
    out = kernel(q, k, v)
    assert out.shape == q.shape and out.dtype == dtype
    ref = naive_nystrom(q, k, v, 64)
    bound = 2 * max_err(build("nystromformer")(q, k, v), ref) + FLOOR[dtype]
    assert max_err(out, ref) <= bound
    assert not kernel.capabilities.backward


# --- Linformer: its definition, plainly -------------------------------------------------------------------------


def naive_linformer(q, k, v, e, f):
    """fp64 einsums: project keys and values along the sequence with E, F[:, :n], then softmax attention."""
    q, k, v, e, f = (t.detach().double() for t in (q, k, v, e, f))
    n = k.shape[-2]
    k_p = torch.einsum("rn,bhnd->bhrd", e[:, :n], k)
    v_p = torch.einsum("rn,bhnd->bhrd", f[:, :n], v)
    scores = torch.einsum("bhid,bhrd->bhir", q, k_p) / math.sqrt(q.shape[-1])
    return torch.einsum("bhir,bhrd->bhid", torch.softmax(scores, dim=-1), v_p)


@pytest.mark.parametrize("n_q,n_k", [(1, 1), (17, 17), (100, 100), (300, 300), (40, 300)])
def test_linformer_reference_matches_its_definition(n_q, n_k):
    q, k, v = inputs(n_q, n_k)
    attn = build("linformer", k=64, max_seq_len=512)
    out = attn(q, k, v)
    assert out.shape == q.shape
    ref = naive_linformer(q, k, v, attn.E, attn.F)
    assert max_err(out, ref) < 1e-5 and ref.abs().max() > 1e-3


def test_linformer_with_identity_projections_and_k_equal_n_is_exact_softmax():
    q, k, v = inputs(64, d=16)
    exact = oracle_attention(q, k, v)
    attn = build("linformer", k=64, max_seq_len=200, init="identity")
    assert max_err(attn(q, k, v), exact) < 1e-5
    assert max_err(build("linformer", impl="kernel", k=64, max_seq_len=200, init="identity")(q, k, v), exact) < 1e-5
    assert max_err(build("linformer", k=64, max_seq_len=200)(q, k, v), exact) > 1e-2  # a real projection is lossy


def test_linformer_projections_are_seeded_parameters():
    attn = build("linformer", k=32, max_seq_len=128, seed=5)
    assert {name: tuple(p.shape) for name, p in attn.named_parameters()} == {"E": (32, 128), "F": (32, 128)}
    assert torch.equal(attn.E, build("linformer", k=32, max_seq_len=128, seed=5).E)
    assert not torch.equal(attn.E, build("linformer", k=32, max_seq_len=128, seed=6).E)
    assert not torch.equal(attn.E, attn.F)
    bound = math.sqrt(6 / (32 + 128)) / math.sqrt(2)  # xavier_uniform, gain 1/sqrt(2), as the paper's code
    assert bound / 2 < float(attn.E.detach().abs().max()) <= bound
    q, k, v = (t.requires_grad_(True) for t in inputs(50))
    attn(q, k, v).sum().backward()
    assert attn.E.grad[:, :50].abs().sum() > 0 and torch.equal(attn.E.grad[:, 50:], torch.zeros(32, 78))


def test_linformer_refuses_causal_and_too_long_inputs():
    attn = build("linformer", k=16, max_seq_len=64)
    with pytest.raises(Unsupported, match="Linformer's sequence projection mixes future tokens"):
        attn(*inputs(8), causal=True)
    with pytest.raises(Unsupported, match="65 keys exceed the projection's max_seq_len 64"):
        attn(*inputs(65))
    with pytest.raises(Unsupported, match="decode"):
        attn.capabilities.check(causal=False, cross=False, mode="decode", dtype="float32")
    with pytest.raises(BadParam, match="parameter init must be one of 'xavier', 'identity', got 'orthogonal'"):
        build("linformer", init="orthogonal")


def test_linformer_cost_model():
    attn = build("linformer")
    assert get_method("linformer").exact is False and attn.family == "low-rank"
    shape = Shape(batch=1, heads=8, seq_len=1024, kv_len=1024, head_dim=64, causal=False)
    assert attn.flops(shape, "fwd") == 8 * (4 * 256 * 1024 * 64 + 4 * 1024 * 256 * 64)
    assert attn.computed_pairs(1024, 1024, False) == 1024 * 256
    assert attn.state_bytes(1, 8, 4096, 64, torch.float32) == 2 * 8 * 256 * 64 * 4


@pytest.mark.parametrize(
    "n_q,n_k,dtype", [(17, 17, torch.float32), (300, 300, torch.float32), (100, 200, torch.float16)]
)
def test_linformer_kernel_within_twice_reference_error(n_q, n_k, dtype):
    q, k, v = inputs(n_q, n_k, d=64, dtype=dtype)
    kernel = build("linformer", impl="kernel", k=64, max_seq_len=512)
    out = kernel(q, k, v)
    assert out.shape == q.shape and out.dtype == dtype
    ref = naive_linformer(q, k, v, kernel.E, kernel.F)
    bound = 2 * max_err(build("linformer", k=64, max_seq_len=512)(q, k, v), ref) + FLOOR[dtype]
    assert max_err(out, ref) <= bound
    with pytest.raises(Unsupported, match="mixes future tokens"):
        kernel(q, k, v, causal=True)
