"""Exact softmax attention: our reference and kernel next to the implementations users would pick instead."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from methods.base import Attention, Capabilities, Unsupported, default_scale
from methods.oracle import oracle_attention
from methods.registry import all_guards, cuda_guard, method, package_guard, register, triton_guard

method(
    "softmax",
    family="exact",
    description="exact scaled dot-product attention",
    source="Vaswani et al. 2017; FlashAttention-2 (Dao 2023) for the kernel",
)

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
    Capabilities(decode=True, backward=False, note="the Triton kernel is forward-only for now"),
    guard=triton_guard,
    description="Triton FlashAttention-2-style forward (online softmax, fp32 accumulation)",
)
class SoftmaxKernel(Attention):
    def forward(self, q, k, v, causal=False):
        from methods.kernels.flash_fwd import flash_attention_forward

        return flash_attention_forward(q, k, v, causal=causal)


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
    from torch.nn.attention.bias import causal_lower_right

    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(n_q, n_k))


@register("softmax", "sdpa", "peer", FULL, description="torch.nn.functional.scaled_dot_product_attention, default dispatch")
class SoftmaxSDPA(Attention):
    def forward(self, q, k, v, causal=False):
        return _sdpa(q, k, v, causal)


@register("softmax", "sdpa_math", "peer", FULL, description="SDPA forced to its math (unfused) backend")
class SoftmaxSDPAMath(Attention):
    def forward(self, q, k, v, causal=False):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):
            return _sdpa(q, k, v, causal)


@functools.cache
def _compiled_flex():
    import torch._dynamo.config as dynamo_config
    from torch.nn.attention.flex_attention import flex_attention

    # A sweep compiles one graph per shape and mask; past dynamo's default limit (8) it would
    # silently fall back to eager FlexAttention and time something users never run.
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 256)
    dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 4096)
    return torch.compile(flex_attention, dynamic=False)


@functools.lru_cache(maxsize=64)
def _flex_causal_block_mask(n_q: int, n_k: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    offset = n_k - n_q

    def causal(b, h, q_idx, kv_idx):
        return q_idx + offset >= kv_idx

    return create_block_mask(causal, None, None, n_q, n_k, device=device)


@register(
    "softmax",
    "flex",
    "peer",
    Capabilities(decode=False, note="FlexAttention is compiled per shape; decode is not wired"),
    guard=package_guard("torch.nn.attention.flex_attention", "torch>=2.5"),
    description="FlexAttention (torch.compile'd), causal via a BlockMask",
)
class SoftmaxFlex(Attention):
    def forward(self, q, k, v, causal=False):
        if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            raise Unsupported("FlexAttention has no backward on CPU (torch raises NotImplementedError)")
        block_mask = _flex_causal_block_mask(q.shape[-2], k.shape[-2], str(q.device)) if causal else None
        return _compiled_flex()(q, k, v, block_mask=block_mask)


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
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal, softmax_scale=default_scale(q.shape[-1])
        )
        return out.transpose(1, 2)
