"""The naive dense oracle every reference is held against.

It is the definition and nothing else: scores, mask, softmax, weighted sum, in
float64 by default. It walks query blocks so that an N x N score matrix never
has to fit at once, which keeps fidelity checks possible at long context.
Masks follow attention-gym's convention: `mask_mod(b, h, q_idx, kv_idx) -> bool`
(True = the query may see the key), evaluated on broadcast index tensors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn.attention.flex_attention import and_masks

from methods.base import default_scale

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def causal_mask_mod(n_queries: int, n_keys: int) -> MaskMod:
    """Bottom-right aligned causal mask: query i is token i + (n_keys - n_queries)."""
    offset = n_keys - n_queries

    def mask_mod(b, h, q_idx, kv_idx):
        return q_idx + offset >= kv_idx

    return mask_mod


def with_causal(mask_mod: MaskMod | None, n_queries: int, n_keys: int, causal: bool) -> MaskMod | None:
    """`mask_mod` AND bottom-right causal when `causal` (what FlexAttention must be given); None: no mask at all."""
    if not causal:
        return mask_mod
    causal_mod = causal_mask_mod(n_queries, n_keys)
    return causal_mod if mask_mod is None else and_masks(causal_mod, mask_mod)


def oracle_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    mask_mod: MaskMod | None = None,
    scale: float | None = None,
    dtype: torch.dtype = torch.float64,
    block_q: int = 1024,
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v in `dtype`; rows that see no key are zero (as FlashAttention).

    K and V may have fewer heads than Q (grouped-query / multi-query attention): query head h reads K/V head
    h // (heads // kv_heads), as SDPA's `enable_gqa` and flash_attn do. The oracle simply repeats them.
    """
    batch, heads, n_q, _ = q.shape
    n_k = k.shape[-2]
    kv_heads = k.shape[1]
    if kv_heads != heads:
        if kv_heads < 1 or heads % kv_heads or v.shape[1] != kv_heads:
            raise ValueError(f"grouped-query attention needs heads % kv_heads == 0 and K, V with the same heads "
                             f"(q has {heads} heads, k {kv_heads}, v {v.shape[1]})")  # fmt: skip
        k, v = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
    scale = default_scale(q.shape[-1]) if scale is None else scale
    q, k, v = (t.to(dtype) for t in (q, k, v))
    mask_mod = with_causal(mask_mod, n_q, n_k, causal)
    b_idx = torch.arange(batch, device=q.device).view(-1, 1, 1, 1)
    h_idx = torch.arange(heads, device=q.device).view(1, -1, 1, 1)
    kv_idx = torch.arange(n_k, device=q.device).view(1, 1, 1, -1)
    blocks = []
    for start in range(0, max(n_q, 1), block_q):
        stop = min(start + block_q, n_q)
        scores = (q[:, :, start:stop] @ k.transpose(-1, -2)) * scale
        if mask_mod is not None:
            q_idx = torch.arange(start, stop, device=q.device).view(1, 1, -1, 1)
            allowed = mask_mod(b_idx, h_idx, q_idx, kv_idx).expand_as(scores)
            scores = scores.masked_fill(~allowed, float("-inf"))
        row_max = scores.amax(-1, keepdim=True)
        empty_row = torch.isinf(row_max) & (row_max < 0)
        weights = torch.exp(scores - row_max.masked_fill(empty_row, 0.0))
        # A non-empty row sums to >= 1 (its max contributes exp(0)); an empty row sums to 0 and divides by 1,
        # so its output and its gradients are 0 (dividing by `tiny` made the backward 0 * inf = NaN).
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1.0)
        blocks.append(weights @ v)
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=-2)


def fidelity(out: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(max abs error, relative Frobenius error) of `out` against a higher-precision `reference`."""
    diff = out.detach().to(reference.dtype) - reference.detach()
    max_abs = float(diff.abs().max()) if diff.numel() else 0.0
    denom = float(torch.linalg.vector_norm(reference))
    rel = float(torch.linalg.vector_norm(diff)) / denom if denom > 0 else float(torch.linalg.vector_norm(diff))
    return max_abs, rel
