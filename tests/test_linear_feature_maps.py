"""Each feature map against the identity it exists for: phi(q).phi(k) is the kernel its paper promises."""

from __future__ import annotations

import math

import pytest
import torch

from methods import build
from methods.feature_maps import (
    CosformerFeatureMap,
    EluFeatureMap,
    PerformerFeatureMap,
    SiluFeatureMap,
    TaylorFeatureMap,
    orthogonal_random_features,
)
from methods.oracle import oracle_attention


def test_elu_and_silu_maps():
    x = torch.randn(2, 3, 50, 16)
    phi = EluFeatureMap()(x, is_query=True)
    assert phi.shape == x.shape and bool((phi > 0).all())
    torch.testing.assert_close(phi, torch.where(x > 0, x + 1, x.exp()))
    torch.testing.assert_close(SiluFeatureMap()(x, is_query=False), x * torch.sigmoid(x))
    assert EluFeatureMap()(x.half(), is_query=True).dtype == torch.float32  # maps compute in fp32
    assert EluFeatureMap()(x.double(), is_query=True).dtype == torch.float64  # and keep fp64 for the oracle


def test_cosformer_features_give_cos_reweighted_relu_products():
    fmap = CosformerFeatureMap()
    n, m = 20, 25
    q, k = torch.randn(n, 8, dtype=torch.float64), torch.randn(n, 8, dtype=torch.float64)
    pos = torch.arange(n) + 3
    phi_q, phi_k = fmap(q, True, pos, m), fmap(k, False, pos, m)
    assert phi_q.shape == (n, 16) and bool((phi_q >= 0).all())
    expected = (q.relu() @ k.relu().T) * torch.cos(math.pi / 2 * (pos[:, None] - pos[None, :]) / m)
    torch.testing.assert_close(phi_q @ phi_k.T, expected)
    with pytest.raises(ValueError, match="max_len"):
        fmap(q, True, pos, 10)


def test_orthogonal_random_features_are_seeded_and_orthogonal():
    w = orthogonal_random_features(80, 32, seed=3)
    assert w.shape == (80, 32)
    assert torch.equal(w, orthogonal_random_features(80, 32, seed=3))
    assert not torch.equal(w, orthogonal_random_features(80, 32, seed=4))
    block = w[:32] / w[:32].norm(dim=1, keepdim=True)  # rows of one block are orthonormal directions
    torch.testing.assert_close(block @ block.T, torch.eye(32), atol=1e-5, rtol=0)
    # Row norms are chi(32)-distributed, as a Gaussian row's: mean ~ sqrt(32 - 1/2).
    assert abs(float(w.norm(dim=1).mean()) - math.sqrt(31.5)) < 0.6


def test_performer_features_estimate_the_softmax_kernel():
    """E[phi(q).phi(k)] = exp(q.k / sqrt(d)); with many features the estimate is close (keys: no stabiliser)."""
    torch.manual_seed(0)
    d = 16
    fmap = PerformerFeatureMap(nb_features=8192, seed=1)
    q, k = 0.5 * torch.randn(40, d, dtype=torch.float64), 0.5 * torch.randn(40, d, dtype=torch.float64)
    estimate = fmap(q, is_query=False) @ fmap(k, is_query=False).T
    exact = torch.exp(q @ k.T / math.sqrt(d))
    assert float(((estimate - exact) / exact).abs().mean()) < 0.04  # ~0.02 at 8192 features
    # Queries subtract their own row max: a per-row constant, which cancels in the normalisation.
    ratio = (fmap(q, is_query=True) @ fmap(k, is_query=False).T) / estimate
    torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio))


def test_performer_attention_approximates_softmax():
    q, k, v = 0.5 * torch.randn(1, 2, 64, 16), 0.5 * torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16)
    approx = build("performer", nb_features=4096, seed=0)(q, k, v, causal=True)
    exact = oracle_attention(q, k, v, causal=True)
    rel = float(torch.linalg.vector_norm(approx.double() - exact) / torch.linalg.vector_norm(exact))
    assert rel < 0.05
    few = build("performer", nb_features=4, seed=0)(q, k, v, causal=True)  # the test can tell good from bad
    assert float(torch.linalg.vector_norm(few.double() - exact) / torch.linalg.vector_norm(exact)) > 2 * rel


def test_performer_projection_lazy_equals_eager_and_follows_the_seed():
    x = torch.randn(1, 2, 10, 32)
    eager = PerformerFeatureMap(64, seed=7, head_dim=32)
    lazy = PerformerFeatureMap(64, seed=7)
    assert lazy.projection is None
    torch.testing.assert_close(lazy(x, is_query=True), eager(x, is_query=True), rtol=0, atol=0)
    assert lazy.projection.shape == (64, 32) and "projection" in dict(lazy.named_buffers())
    other = PerformerFeatureMap(64, seed=8)
    assert not torch.equal(other(x, is_query=True), eager(x, is_query=True))


def test_taylor_features_give_second_order_exp():
    """phi(a).phi(b) = 1 + s/sqrt(f) + s^2/(2f), s the projected dot product; dim 1 + f + f(f+1)/2."""
    fmap = TaylorFeatureMap(feature_dim=16, seed=0, head_dim=32)
    assert fmap.feature_dim(32) == 153
    a, b = torch.randn(30, 32, dtype=torch.float64), torch.randn(30, 32, dtype=torch.float64)
    phi_a, phi_b = fmap(a, is_query=True), fmap(b, is_query=False)
    assert phi_a.shape == (30, 153)
    s = fmap.project(a) @ fmap.project(b).T
    torch.testing.assert_close(phi_a @ phi_b.T, 1 + s / 4 + s**2 / 32)
    assert bool((phi_a @ phi_b.T > 0).all())  # 1 + x + x^2/2 > 0: the normaliser cannot vanish


def test_taylor_projection_is_a_seeded_trainable_parameter():
    eager = TaylorFeatureMap(feature_dim=8, seed=5, head_dim=24)
    assert isinstance(eager.projection, torch.nn.Parameter) and eager.projection.requires_grad
    assert [name for name, _ in eager.named_parameters()] == ["projection"]
    bound = 1 / math.sqrt(24)  # nn.Linear's default init, as Based's projection
    largest = float(eager.projection.detach().abs().max())
    assert 0.8 * bound < largest <= bound
    lazy = TaylorFeatureMap(feature_dim=8, seed=5)
    x = torch.randn(4, 24)
    torch.testing.assert_close(lazy(x, is_query=True), eager(x, is_query=True), rtol=0, atol=0)
    assert not torch.equal(TaylorFeatureMap(8, seed=6, head_dim=24).projection, eager.projection)
    # It trains: gradients reach the projection through a method's forward.
    based = build("based", feature_dim=8, head_dim=24)
    q = torch.randn(1, 1, 10, 24)
    based.linear_part(q, q, q, causal=True).sum().backward()
    assert based.feature_map.projection.grad is not None
