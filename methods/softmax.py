"""Exact softmax attention: our reference and kernel next to the implementations users would pick instead."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from methods.base import Attention, Capabilities, default_scale
from methods.flex import flex_forward
from methods.oracle import oracle_attention
from methods.registry import all_guards, cuda_guard, method, package_guard, register, triton_guard

method("softmax", family="exact",
       description="exact scaled dot-product attention",
       source="Vaswani et al. 2017; FlashAttention-2 (Dao 2023) for the kernel")  # fmt: skip

FULL = Capabilities(decode=True)


@register("softmax", "reference", "reference", FULL, description="the plain definition: scores, mask, softmax, sum")
class SoftmaxReference(Attention):
    """Materialises the N x N score matrix on purpose: this is the cost FlashAttention removes."""

    def forward(self, q, k, v, causal=False):
        return oracle_attention(q, k, v, causal=causal, dtype=q.dtype, block_q=max(q.shape[-2], 1))


@register(
    "softmax",
    "kernel",
    "kernel",
    Capabilities(decode=True, backward=True),
    guard=triton_guard,
    description="Triton FlashAttention-2-style forward and backward (online softmax, fp32 accumulation; "
    "the backward recomputes P from the saved log-sum-exp)",
)
class SoftmaxKernel(Attention):
    """Our FA2 kernels through `flash_attention`: the forward kernel alone when no gradient is needed
    (no_grad, decode), the autograd node with the Triton backward otherwise."""

    def forward(self, q, k, v, causal=False):
        from methods.kernels.flash_bwd import flash_attention

        return flash_attention(q, k, v, causal=causal)


def _sdpa(q, k, v, causal: bool) -> torch.Tensor:
    """SDPA aligns `is_causal` top-left; we align bottom-right (as decoding does) whenever lengths differ."""
    n_q, n_k = q.shape[-2], k.shape[-2]
    if not causal:
        return F.scaled_dot_product_attention(q, k, v)
    if n_q == n_k:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if n_q > n_k:
        # Rows that see no key: SDPA's lower-right bias warns but returns zeros, as we define them.
        mask = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(diagonal=n_k - n_q)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).nan_to_num(0.0)
    # Imported on first use: torch.nn.attention.bias pulls in dynamo (1.5-2.5 s), which the report, compare and
    # the registry never need; once imported, the statement is a dictionary lookup.
    from torch.nn.attention.bias import causal_lower_right

    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(n_q, n_k))


@register(
    "softmax", "sdpa", "peer", FULL, description="torch.nn.functional.scaled_dot_product_attention, default dispatch"
)
class SoftmaxSDPA(Attention):
    def forward(self, q, k, v, causal=False):
        return _sdpa(q, k, v, causal)


@register("softmax", "sdpa_math", "peer", FULL, description="SDPA forced to its math (unfused) backend")
class SoftmaxSDPAMath(Attention):
    def forward(self, q, k, v, causal=False):
        with sdpa_kernel(SDPBackend.MATH):
            return _sdpa(q, k, v, causal)


@register(
    "softmax",
    "flex",
    "peer",
    Capabilities(decode=False, note="FlexAttention is compiled per shape; decode is not wired"),
    description="FlexAttention (torch.compile'd), causal via a BlockMask",
)
class SoftmaxFlex(Attention):
    def forward(self, q, k, v, causal=False):
        return flex_forward(q, k, v, causal, ("softmax",), None)


@register(
    "softmax",
    "flash_attn",
    "peer",
    Capabilities(decode=True, dtypes=("float16", "bfloat16"), note="flash-attn runs fp16/bf16 on CUDA only"),
    guard=all_guards(cuda_guard, package_guard("flash_attn", "flash-attn")),
    description="Dao-AILab flash-attn (flash_attn_func); bottom-right causal since 2.1",
)
class SoftmaxFlashAttn(Attention):
    def forward(self, q, k, v, causal=False):
        from flash_attn import flash_attn_func

        out = flash_attn_func(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            causal=causal,
            softmax_scale=default_scale(q.shape[-1]),
        )
        return out.transpose(1, 2)
