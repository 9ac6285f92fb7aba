"""Exact softmax attention in chunks with O(N) memory (Rabe & Staats 2021, "Self-attention does not need O(n^2) memory").

The reference walks query chunks and, inside each, key chunks, keeping per
row the running max, the running sum of exponentials and the un-normalised
output (the same online softmax FlashAttention fuses into one kernel), so
the largest temporary is one query-chunk x key-chunk score block instead of
N x N. Under autograd each chunk's summary is recomputed in the backward pass
(`torch.utils.checkpoint`, as the paper uses `jax.checkpoint`), so the
backward keeps O(N) memory too. Key chunks entirely above the causal
diagonal are skipped.

It is exact: it is held to the oracle's tolerance. Its kernel is simply our
dense FlashAttention forward (`methods/kernels/flash_fwd.py`), the fused
version of the same algorithm.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from methods.base import Attention, Capabilities, compute_dtype, default_scale
from methods.registry import Impl, Param, method, register_impls, triton_guard
from methods.softmax import SoftmaxKernel

MEMORY_EFFICIENT_PARAMS = (
    Param("query_chunk", int, 1024, "queries per chunk (the paper's 1024)", min=1),
    Param("key_chunk", int, 4096, "keys per chunk (the paper's 4096)", min=1),
)

method("memory_efficient", family="exact", exact=True, params=MEMORY_EFFICIENT_PARAMS,
       description="exact softmax in query x key chunks with an online softmax: O(N) memory",
       source="Rabe & Staats 2021, Self-attention Does Not Need O(n^2) Memory")  # fmt: skip


def _chunk_summary(q, k, v, q_pos, k_pos, causal: bool, scale: float):
    """(row max, row sum of exp, un-normalised output) of one query chunk against one key chunk."""
    scores = (q @ k.transpose(-1, -2)) * scale
    if causal:
        scores = scores.masked_fill(k_pos.view(1, -1) > q_pos.view(-1, 1), float("-inf"))
    row_max = scores.amax(-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    weights = torch.exp(scores - row_max)
    return row_max, weights.sum(-1, keepdim=True), weights @ v


class MemoryEfficient(Attention):
    """The reference: query x key chunks with a running max and sum (the online softmax), each chunk's
    summary recomputed in backward (`torch.utils.checkpoint`), so neither pass holds an N x N block."""

    def __init__(self, query_chunk: int, key_chunk: int):
        super().__init__()
        self.query_chunk, self.key_chunk = query_chunk, key_chunk

    def forward(self, q, k, v, causal=False):
        batch, heads, n_q, d = q.shape
        n_k = k.shape[-2]
        ct = compute_dtype(q.dtype)
        scale = default_scale(d)
        q_, k_, v_ = q.to(ct), k.to(ct), v.to(ct)
        offset = n_k - n_q
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        outs = []
        for q_lo in range(0, n_q, self.query_chunk):
            q_hi = min(n_q, q_lo + self.query_chunk)
            q_pos = torch.arange(q_lo, q_hi, device=q.device) + offset
            # Keys past the chunk's last query are invisible to all of it under causality.
            k_end = max(0, min(n_k, q_hi + offset)) if causal else n_k
            acc = torch.zeros(batch, heads, q_hi - q_lo, v.shape[-1], dtype=ct, device=q.device)
            m = torch.full((batch, heads, q_hi - q_lo, 1), float("-inf"), dtype=ct, device=q.device)
            s = torch.zeros_like(m)
            for k_lo in range(0, k_end, self.key_chunk):
                k_hi = min(k_end, k_lo + self.key_chunk)
                k_pos = torch.arange(k_lo, k_hi, device=q.device)
                args = (q_[:, :, q_lo:q_hi], k_[:, :, k_lo:k_hi], v_[:, :, k_lo:k_hi], q_pos, k_pos, causal, scale)
                if grad:
                    cm, cs, co = checkpoint(_chunk_summary, *args, use_reentrant=False)
                else:
                    cm, cs, co = _chunk_summary(*args)
                # A chunk row with no visible key has max -inf; shifting by 0 then keeps exp at 0, never NaN.
                cm = torch.where(cs > 0, cm, torch.full_like(cm, float("-inf")))
                new_m = torch.maximum(m, cm)
                shift = torch.where(torch.isfinite(new_m), new_m, torch.zeros_like(new_m))
                a_old, a_new = torch.exp(m - shift), torch.exp(cm - shift)
                acc = acc * a_old + co * a_new
                s = s * a_old + cs * a_new
                m = new_m
            # s >= 1 where a key is visible (the running max contributes exp(0)); 0 for an empty row, which
            # divides by 1 so that its gradients are 0, not NaN.
            outs.append(acc / s.clamp_min(1.0))
        if not outs:
            return q.new_zeros(batch, heads, 0, v.shape[-1])
        return torch.cat(outs, dim=2).to(q.dtype)


register_impls(
    "memory_efficient",
    MemoryEfficient,
    Impl(
        "reference",
        "reference",
        Capabilities(decode=True),
        description="query x key chunks with running max/sum, checkpointed chunks for O(N) backward memory",
    ),
    # The fused form of the same online softmax is exactly softmax's kernel (forward and FA2 backward), with this
    # method's parameters.
    Impl(
        "kernel",
        "kernel",
        Capabilities(decode=True),
        guard=triton_guard,
        description="the same online softmax fused: our Triton FlashAttention-2 forward and backward",
        mixins=(SoftmaxKernel,),
    ),
)
