"""The Triton FlashAttention forward against the fp64 oracle, under Triton's interpreter on CPU.

Tolerance follows FlashAttention's own test rule: the kernel's max-abs error
against the fp64 oracle may be at most twice that of the PyTorch reference run
in the same dtype, plus a small floor. A kernel that is "as accurate as
PyTorch" passes; one with a masking or rescaling bug is off by O(1) and fails.
"""

from __future__ import annotations

import pytest
import torch
from helpers import FLOOR, max_err

from methods import build
from methods.kernels.flash_fwd import flash_attention_forward
from methods.oracle import oracle_attention

LENGTHS = [(1, 1), (17, 17), (128, 128), (300, 300), (17, 300), (300, 17)]


def _qkv(n_q: int, n_k: int, head_dim: int, dtype: torch.dtype, batch: int = 1, heads: int = 2):
    q = torch.randn(batch, heads, n_q, head_dim, dtype=dtype)
    k = torch.randn(batch, heads, n_k, head_dim, dtype=dtype)
    v = torch.randn(batch, heads, n_k, head_dim, dtype=dtype)
    return q, k, v


def _check_against_oracle(q, k, v, causal: bool) -> None:
    """Kernel error <= 2 x (same-dtype PyTorch reference error) + floor, both against fp64."""
    exact = oracle_attention(q, k, v, causal=causal, dtype=torch.float64)
    reference = build("softmax", impl="reference")(q, k, v, causal=causal)
    out = flash_attention_forward(q, k, v, causal=causal)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert not torch.isnan(out).any()
    kernel_err, ref_err = max_err(out, exact), max_err(reference, exact)
    bound = 2 * ref_err + FLOOR[q.dtype]
    assert kernel_err <= bound, f"kernel err {kernel_err:.3g} > bound {bound:.3g} (reference err {ref_err:.3g})"


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("n_q,n_k", LENGTHS, ids=[f"{a}x{b}" for a, b in LENGTHS])
def test_matches_oracle_fp32_d64(n_q: int, n_k: int, causal: bool) -> None:
    _check_against_oracle(*_qkv(n_q, n_k, 64, torch.float32, batch=2), causal=causal)


@pytest.mark.parametrize(
    "n_q,n_k,head_dim,dtype,causal",
    [
        # other head dims, including a non-power-of-two one (BLOCK_D padding masked along d)
        (128, 128, 16, torch.float32, True),
        (300, 300, 16, torch.float32, False),
        (300, 300, 128, torch.float32, True),
        (17, 300, 128, torch.float32, False),
        (300, 17, 80, torch.float32, True),
        (128, 128, 80, torch.float32, False),
        (1, 1, 80, torch.float32, True),
        # 16-bit inputs: fp32 accumulation, output in the input dtype
        (17, 17, 64, torch.float16, True),
        (300, 300, 64, torch.float16, True),
        (17, 300, 64, torch.float16, True),
        (300, 17, 64, torch.float16, False),
        (128, 128, 128, torch.float16, False),
        (300, 300, 80, torch.float16, True),
        (128, 300, 64, torch.bfloat16, True),
    ],
)
def test_matches_oracle_other_dims_dtypes(n_q: int, n_k: int, head_dim: int, dtype: torch.dtype, causal: bool) -> None:
    _check_against_oracle(*_qkv(n_q, n_k, head_dim, dtype), causal=causal)


def test_custom_scale() -> None:
    q, k, v = _qkv(33, 70, 32, torch.float32)
    exact = oracle_attention(q, k, v, causal=True, scale=0.3)
    out = flash_attention_forward(q, k, v, causal=True, scale=0.3)
    assert max_err(out, exact) < 1e-5


@pytest.mark.parametrize("n_q,n_k", [(300, 17), (70, 5), (5, 1)])
def test_rows_without_keys_are_zero(n_q: int, n_k: int) -> None:
    """Bottom-right causal with n_q > n_k: the first n_q - n_k queries see nothing and output exactly 0."""
    q, k, v = _qkv(n_q, n_k, 64, torch.float32)
    out = flash_attention_forward(q, k, v, causal=True)
    empty = n_q - n_k
    assert torch.equal(out[:, :, :empty], torch.zeros_like(out[:, :, :empty]))
    assert not torch.isnan(out).any()
    assert out[:, :, empty:].abs().amax() > 0
    assert max_err(out, oracle_attention(q, k, v, causal=True)) < 1e-5


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_non_contiguous_inputs(causal: bool) -> None:
    """A (B, N, H, D) tensor viewed as (B, H, N, D) runs through strides, with the same result as a copy."""
    batch, heads, n_q, n_k, head_dim = 2, 2, 100, 130, 64
    q = torch.randn(batch, n_q, heads, head_dim).transpose(1, 2)
    k = torch.randn(batch, n_k, heads, head_dim).transpose(1, 2)
    # v strided along d as well: every second column of a wider tensor
    v = torch.randn(batch, heads, n_k, 2 * head_dim)[..., ::2]
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    out = flash_attention_forward(q, k, v, causal=causal)
    ref = flash_attention_forward(q.contiguous(), k.contiguous(), v.contiguous(), causal=causal)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert max_err(out, oracle_attention(q, k, v, causal=causal)) < 1e-5


def test_no_keys_gives_zeros() -> None:
    q, k, v = _qkv(3, 0, 16, torch.float32)
    assert torch.equal(flash_attention_forward(q, k, v), torch.zeros_like(q))


def test_kernel_impl_via_registry() -> None:
    q, k, v = _qkv(40, 40, 32, torch.float32)
    out = build("softmax", impl="kernel")(q, k, v, causal=True)
    assert max_err(out, oracle_attention(q, k, v, causal=True)) < 1e-5


@pytest.mark.parametrize(
    "shapes,match",
    [
        (((1, 2, 8, 512), (1, 2, 8, 512), (1, 2, 8, 512)), "supported range is 1 to 256"),
        (((1, 2, 8, 64), (1, 2, 8, 32), (1, 2, 8, 32)), "head_dim mismatch"),
        (((2, 8, 64), (2, 8, 64), (2, 8, 64)), "must be 4-D"),
        (((1, 2, 8, 64), (2, 2, 8, 64), (2, 2, 8, 64)), "batch/heads mismatch"),
        (((1, 2, 8, 64), (1, 2, 8, 64), (1, 2, 9, 64)), "lengths differ"),
    ],
    ids=["head_dim_512", "head_dim_mismatch", "3d", "batch_mismatch", "kv_length_mismatch"],
)
def test_bad_input_raises(shapes, match: str) -> None:
    q, k, v = (torch.randn(*s) for s in shapes)
    with pytest.raises(ValueError, match=match):
        flash_attention_forward(q, k, v)
