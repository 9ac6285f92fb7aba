"""The Triton FlashAttention backward against autograd through the fp64 oracle, under Triton's interpreter on CPU.

Tolerance is the forward tests' rule (FlashAttention's own), applied to each of dq, dk and dv: the
kernel's max-abs error against the fp64 oracle's gradient may be at most twice that of autograd through
the PyTorch reference run in the same dtype, plus a small floor. A masking, rescaling or lse bug is off
by O(1) and fails; rounding the reference itself makes does not.

Lengths are chosen around the 64-wide tiles (1, 37, 64 + 7) so that single, partial and several blocks,
and the causal diagonal inside a block, are all exercised while the interpreter stays fast.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from helpers import FLOOR, max_err

from methods import build
from methods.kernels.flash_bwd import flash_attention, flash_attention_backward
from methods.kernels.flash_fwd import flash_attention_forward
from methods.oracle import oracle_attention

Grads = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _qkv(n_q: int, n_k: int, head_dim: int, dtype: torch.dtype, batch: int = 1, heads: int = 2):
    """Random inputs drawn in fp32 and cast, so the fp64 oracle sees exactly the kernel's numbers."""
    shapes = ((batch, heads, n_q, head_dim), (batch, heads, n_k, head_dim), (batch, heads, n_k, head_dim))
    return tuple(torch.randn(*s).to(dtype) for s in shapes)


def _grads(attention, q, k, v, grad_out, dtype: torch.dtype | None = None) -> Grads:
    """`(dq, dk, dv)` of `attention(q, k, v)` for `grad_out`, with fresh leaves (cast to `dtype` if given)."""
    leaves = [(t if dtype is None else t.to(dtype)).detach().requires_grad_() for t in (q, k, v)]
    out = attention(*leaves)
    return torch.autograd.grad(out, leaves, grad_out.to(out.dtype))


def _check_grads_against_oracle(q, k, v, causal: bool, scale: float | None = None) -> Grads:
    """Each kernel gradient's error <= 2 x (same-dtype reference gradient's error) + floor, both against fp64."""
    grad_out = torch.randn(q.shape).to(q.dtype)
    kernel = _grads(partial(flash_attention, causal=causal, scale=scale), q, k, v, grad_out)
    exact = _grads(partial(oracle_attention, causal=causal, scale=scale), q, k, v, grad_out, torch.float64)
    if scale is None:
        reference = _grads(partial(build("softmax", impl="reference"), causal=causal), q, k, v, grad_out)
    else:  # the registered reference has no scale argument; it is the oracle run in the input dtype
        reference = _grads(partial(oracle_attention, causal=causal, scale=scale, dtype=q.dtype), q, k, v, grad_out)
    for name, g, e, r, x in zip("qkv", kernel, exact, reference, (q, k, v), strict=True):
        assert g.shape == x.shape and g.dtype == x.dtype, name
        assert g.isfinite().all(), f"d{name} has non-finite entries"
        kernel_err, ref_err = max_err(g, e), max_err(r, e)
        bound = 2 * ref_err + FLOOR[q.dtype]
        assert kernel_err <= bound, f"d{name}: kernel err {kernel_err:.3g} > bound {bound:.3g} (ref err {ref_err:.3g})"
    return kernel


CASES = [
    # (n_q, n_k, head_dim, dtype, causal): self at 1, 37 (one partial tile), 71 (64 + 7: a full and a partial tile)
    (1, 1, 64, torch.float32, True),
    (1, 1, 24, torch.float32, False),
    (37, 37, 24, torch.float32, True),
    (37, 37, 64, torch.float32, False),
    (71, 71, 64, torch.float32, True),
    (71, 71, 24, torch.float32, False),
    # cross: fewer queries than keys (decode-like) and more (the first rows see no key when causal)
    (37, 71, 24, torch.float32, True),
    (37, 71, 64, torch.float32, False),
    (71, 37, 64, torch.float32, True),
    (71, 37, 24, torch.float32, False),
    (1, 71, 64, torch.float32, True),
    # 16-bit inputs: fp32 accumulation, gradients in the input dtype
    (37, 37, 64, torch.float16, True),
    (71, 71, 24, torch.float16, False),
    (71, 71, 64, torch.float16, True),
    (37, 71, 64, torch.float16, True),
    (71, 37, 24, torch.float16, True),
    (71, 71, 64, torch.bfloat16, True),
]


@pytest.mark.parametrize(
    "n_q,n_k,head_dim,dtype,causal",
    CASES,
    ids=[f"{a}x{b}-d{d}-{str(t).split('.')[-1]}-{'causal' if c else 'full'}" for a, b, d, t, c in CASES],
)
def test_grads_match_oracle(n_q: int, n_k: int, head_dim: int, dtype: torch.dtype, causal: bool) -> None:
    _check_grads_against_oracle(*_qkv(n_q, n_k, head_dim, dtype), causal=causal)


def test_custom_scale() -> None:
    _check_grads_against_oracle(*_qkv(37, 71, 24, torch.float32), causal=True, scale=0.3)


@pytest.mark.parametrize("n_q,n_k", [(71, 5), (70, 37), (5, 1)])
def test_rows_without_keys_get_zero_grads(n_q: int, n_k: int) -> None:
    """Bottom-right causal with n_q > n_k: the first n_q - n_k queries see nothing; their dq is exactly 0,
    they add nothing to dk, dv, and nothing is NaN (their lse is -inf)."""
    q, k, v = _qkv(n_q, n_k, 24, torch.float32)
    dq, dk, dv = _check_grads_against_oracle(q, k, v, causal=True)
    empty = n_q - n_k
    assert torch.equal(dq[:, :, :empty], torch.zeros_like(dq[:, :, :empty]))
    assert dv.abs().amax() > 0
    if n_k == 1:  # softmax over a single key is constant: its scores get no gradient at all
        assert torch.equal(dq, torch.zeros_like(dq)) and torch.equal(dk, torch.zeros_like(dk))
    else:
        assert dq[:, :, empty:].abs().amax() > 0 and dk.abs().amax() > 0
    # Gradients from the empty rows' output are ignored: only the rows that see keys matter to dk, dv.
    grad_out = torch.randn(q.shape)
    grad_out_masked = grad_out.clone()
    grad_out_masked[:, :, :empty] = 0
    full = _grads(partial(flash_attention, causal=True), q, k, v, grad_out)
    masked = _grads(partial(flash_attention, causal=True), q, k, v, grad_out_masked)
    for g, h in zip(full, masked, strict=True):
        torch.testing.assert_close(g, h, rtol=0, atol=0)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_non_contiguous_inputs(causal: bool) -> None:
    """(B, N, H, D) tensors viewed as (B, H, N, D), v strided along d, a transposed grad_out: same gradients as
    contiguous copies, bit for bit (only the addressing differs)."""
    batch, heads, n_q, n_k, head_dim = 1, 2, 37, 71, 24
    q = torch.randn(batch, n_q, heads, head_dim).transpose(1, 2)
    k = torch.randn(batch, n_k, heads, head_dim).transpose(1, 2)
    v = torch.randn(batch, heads, n_k, 2 * head_dim)[..., ::2]
    grad_out = torch.randn(batch, n_q, heads, head_dim).transpose(1, 2)
    assert not any(t.is_contiguous() for t in (q, k, v, grad_out))
    attention = partial(flash_attention, causal=causal)
    strided = _grads(attention, q, k, v, grad_out)
    copied = _grads(attention, q.contiguous(), k.contiguous(), v.contiguous(), grad_out.contiguous())
    for g, h in zip(strided, copied, strict=True):
        torch.testing.assert_close(g, h, rtol=0, atol=0)
    exact = _grads(partial(oracle_attention, causal=causal), q, k, v, grad_out, torch.float64)
    for g, e in zip(strided, exact, strict=True):
        assert max_err(g, e) < 1e-4


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_lse_is_the_scaled_scores_logsumexp(causal: bool) -> None:
    """The forward's extra output is what the backward recomputes P from: natural log, -inf for empty rows."""
    q, k, v = _qkv(71, 37, 24, torch.float32)
    out, lse = flash_attention_forward(q, k, v, causal=causal, scale=0.3, return_lse=True)
    assert torch.equal(out, flash_attention_forward(q, k, v, causal=causal, scale=0.3))
    scores = (q.double() @ k.double().transpose(-1, -2)) * 0.3
    if causal:
        seen = torch.ones(71, 37, dtype=torch.bool).tril(diagonal=37 - 71)
        scores = scores.masked_fill(~seen, float("-inf"))
    expected = torch.logsumexp(scores, dim=-1)
    assert lse.shape == (1, 2, 71) and lse.dtype == torch.float32
    assert torch.equal(torch.isinf(lse), torch.isinf(expected))
    finite = expected.isfinite()
    assert max_err(lse[finite], expected[finite]) < 1e-5


def test_no_keys_gives_zero_grads() -> None:
    q, k, v = _qkv(3, 0, 16, torch.float32)
    _, lse = flash_attention_forward(q, k, v, return_lse=True)
    assert torch.equal(lse, torch.full((1, 2, 3), float("-inf")))
    dq, dk, dv = flash_attention_backward(torch.ones_like(q), q, k, v, torch.zeros_like(q), lse)
    assert torch.equal(dq, torch.zeros_like(q)) and dk.shape == k.shape and dv.shape == v.shape


def test_without_grad_it_is_the_forward_kernel() -> None:
    """Under no_grad (or with no input requiring grad) nothing is saved and the output is the forward's."""
    q, k, v = (t.requires_grad_() for t in _qkv(37, 37, 24, torch.float32))
    with torch.no_grad():
        out = flash_attention(q, k, v, causal=True)
    assert out.grad_fn is None
    assert torch.equal(out, flash_attention_forward(q.detach(), k.detach(), v.detach(), causal=True))
    assert flash_attention(q, k, v, causal=True).grad_fn is not None


def test_kernel_impl_via_registry_has_backward() -> None:
    attn = build("softmax", impl="kernel")
    assert attn.capabilities.backward
    attn.capabilities.check(causal=True, cross=True, mode="fwd_bwd", dtype="float16")
    q, k, v = _qkv(37, 37, 24, torch.float32)
    grad_out = torch.randn(q.shape)
    got = _grads(partial(attn, causal=True), q, k, v, grad_out)
    exact = _grads(partial(oracle_attention, causal=True), q, k, v, grad_out, torch.float64)
    for g, e in zip(got, exact, strict=True):
        assert max_err(g, e) < 1e-4


def test_double_backward_is_refused() -> None:
    """The backward kernels are not differentiable themselves; asking for a second derivative must say so."""
    q, k, v = (t.requires_grad_() for t in _qkv(5, 5, 16, torch.float32))
    (dq,) = torch.autograd.grad(flash_attention(q, k, v).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward|once_differentiable|does not require grad"):
        dq.sum().backward()
