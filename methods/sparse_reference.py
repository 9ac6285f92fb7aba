"""PyTorch references for sparse softmax attention that pay only for the keys the pattern keeps.

`gathered_attention` is the one reference every block-structured method
uses: the queries are cut into position-aligned tiles, each tile gathers its
own list of key blocks (and, optionally, a small set of keys shared by every
tile, such as attention sinks or summary columns), and one softmax runs over
exactly those keys. Its cost is O(N * keys per tile), e.g. O(N * W) for a
window, never a masked N x N product, and it is differentiable by autograd
(gathers backpropagate as scatter-adds), so the same code can train models.

Accumulation is float32 for 16-bit inputs (float64 stays float64), as the
kernels accumulate in float32; outputs come back in the input dtype.
"""

from __future__ import annotations

import torch

from methods.base import compute_dtype, default_scale
from methods.kernels.layout import TileGrid
from methods.masks import MaskMod

__all__ = ["attend", "gathered_attention", "merge_partials"]

# Bound on one chunk's score tensor; tiles are processed in chunks that fit it.
CHUNK_BYTES = 256 * 2**20


def _softmax_parts(scores: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """exp-weights, the divisor of each row and log-sum-exp of masked scores; rows with no visible key get
    weights 0 and lse -inf.

    The divisor is the row sum clamped at 1: a row that sees a key sums to >= 1 (its largest term is exp(0)),
    and an empty row sums to 0 with weights 0, so 1 gives it output 0 *and* finite gradients. (Clamping at
    the dtype's `tiny` instead scales an empty row's gradient to inf, and inf * 0 weights is NaN.)
    """
    scores = scores.masked_fill(~keep, float("-inf"))
    row_max = scores.amax(-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    weights = torch.exp(scores - row_max)
    denom = weights.sum(-1, keepdim=True)
    lse = (row_max + torch.log(denom)).squeeze(-1)  # log(0) = -inf for empty rows
    return weights, denom.clamp_min(1.0), lse


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
):
    """Dense softmax attention over a small, already-selected key set (decode steps, global rows).

    `keep` broadcasts against the (..., n_q, n_k) scores; rows that keep no key are 0.
    """
    scale = default_scale(q.shape[-1]) if scale is None else scale
    ct = compute_dtype(q.dtype)
    scores = (q.to(ct) @ k.to(ct).transpose(-1, -2)) * scale
    if keep is None:
        keep = torch.ones((), dtype=torch.bool, device=q.device)
    weights, denom, lse = _softmax_parts(scores, keep.expand_as(scores))
    out = (weights @ v.to(ct)) / denom
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


def merge_partials(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor):
    """Combine two softmax attentions over disjoint key sets from their outputs and log-sum-exps."""
    m = torch.maximum(lse1, lse2)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w1, w2 = torch.exp(lse1 - m), torch.exp(lse2 - m)
    total = w1 + w2
    ct = compute_dtype(o1.dtype)
    out = (w1.unsqueeze(-1) * o1.to(ct) + w2.unsqueeze(-1) * o2.to(ct)) / total.clamp_min(1e-30).unsqueeze(-1)
    return out.to(o1.dtype), m + torch.log(total)


def gathered_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block: int,
    kv_blocks: torch.Tensor,
    causal: bool,
    mask_mod: MaskMod | None = None,
    shared_keys: torch.Tensor | None = None,
    q_start: int | None = None,
    scale: float | None = None,
    return_lse: bool = False,
):
    """Softmax attention of each query tile over its own key blocks plus a shared key set.

    Args:
        q: (batch, heads, n_q, d); query `i` sits at position `q_start + i`.
        k, v: (batch, heads, n_k, d).
        block: tile size for queries and key blocks alike.
        kv_blocks: (Bb, Hb, n_tiles, L) key-block indices per tile of `TileGrid(n_q, n_k, block, block, q_start)`,
            -1 for padding; Bb/Hb may be 1 (shared by every batch / head).
        causal: key j is visible to position p only when j <= p.
        mask_mod: element mask applied on top (`mask_mod(b, h, q_idx, kv_idx)`, q_idx = position - q_start);
            None keeps the gathered blocks whole.
        shared_keys: (C,) key positions every tile also sees (minus those already in its blocks).
        q_start: position of the first query; bottom-right (n_k - n_q) by default.
        return_lse: also return the natural log-sum-exp of the scaled scores per query (-inf for empty rows).
    """
    batch, heads, n_q, d = q.shape
    n_k = k.shape[-2]
    q_start = n_k - n_q if q_start is None else q_start
    scale = default_scale(d) if scale is None else scale
    grid = TileGrid(n_q, n_k, block, block, q_start)
    n_tiles, n_kb = grid.n_tiles, grid.n_key_blocks
    ct = compute_dtype(q.dtype)
    dev = q.device
    if n_q == 0 or n_k == 0:
        out = q.new_zeros(batch, heads, n_q, v.shape[-1])
        lse = torch.full((batch, heads, n_q), float("-inf"), device=dev, dtype=ct)
        return (out, lse) if return_lse else out

    back = n_tiles * block - grid.pad_front - n_q
    q_t = torch.nn.functional.pad(q.to(ct), (0, 0, grid.pad_front, back)).view(batch, heads, n_tiles, block, d)
    k_b = torch.nn.functional.pad(k.to(ct), (0, 0, 0, n_kb * block - n_k)).view(batch, heads, n_kb, block, d)
    v_b = torch.nn.functional.pad(v.to(ct), (0, 0, 0, n_kb * block - n_k)).view(batch, heads, n_kb, block, -1)
    blocks = kv_blocks.to(device=dev, dtype=torch.long).expand(batch, heads, n_tiles, -1)
    width = blocks.shape[-1]
    b_idx = torch.arange(batch, device=dev).view(-1, 1, 1, 1)
    h_idx = torch.arange(heads, device=dev).view(1, -1, 1, 1)
    offs = torch.arange(block, device=dev)

    if shared_keys is not None and shared_keys.numel():
        shared = shared_keys.to(device=dev, dtype=torch.long)
        k_s, v_s = k.to(ct)[:, :, shared], v.to(ct)[:, :, shared]
    else:
        shared, k_s, v_s = None, None, None
    n_shared = 0 if shared is None else shared.numel()

    per_tile = batch * heads * block * (width * block + n_shared) * q_t.element_size() * 4
    chunk = max(1, CHUNK_BYTES // max(per_tile, 1))
    outs, lses = [], []
    for t_lo in range(0, n_tiles, chunk):
        t_hi = min(n_tiles, t_lo + chunk)
        idx = blocks[:, :, t_lo:t_hi]  # (b, h, c, L)
        real = idx >= 0
        idx0 = idx.clamp_min(0)
        c = t_hi - t_lo
        k_g = k_b[b_idx, h_idx, idx0].reshape(batch, heads, c, width * block, d)
        v_g = v_b[b_idx, h_idx, idx0].reshape(batch, heads, c, width * block, -1)
        kv_pos = (idx0.unsqueeze(-1) * block + offs).reshape(batch, heads, c, 1, width * block)
        kv_real = (real.unsqueeze(-1) & (idx0.unsqueeze(-1) * block + offs < n_k)).reshape(batch, heads, c, 1, -1)
        pos = ((grid.first_tile + torch.arange(t_lo, t_hi, device=dev)).view(-1, 1) * block + offs).view(
            1, 1, c, block, 1
        )
        q_c = q_t[:, :, t_lo:t_hi]

        keep = kv_real
        if causal:
            keep = keep & (kv_pos <= pos)
        if mask_mod is not None:
            keep = keep & mask_mod(b_idx.unsqueeze(-1), h_idx.unsqueeze(-1), pos - q_start, kv_pos)
        scores = (q_c @ k_g.transpose(-1, -2)) * scale
        if shared is not None:
            s_pos = shared.view(1, 1, 1, 1, -1)
            dup = (torch.div(shared, block, rounding_mode="floor").view(1, 1, 1, 1, -1) == idx.unsqueeze(-1)).any(-2)
            keep_s = ~dup.unsqueeze(-2)
            if causal:
                keep_s = keep_s & (s_pos <= pos)
            if mask_mod is not None:
                keep_s = keep_s & mask_mod(b_idx.unsqueeze(-1), h_idx.unsqueeze(-1), pos - q_start, s_pos)
            s_shared = (q_c @ k_s.unsqueeze(2).transpose(-1, -2)) * scale  # (b, h, c, block, C)
            scores = torch.cat([scores, s_shared], dim=-1)
            keep = torch.cat([keep.expand(*keep.shape[:3], block, -1), keep_s.expand(batch, heads, c, block, -1)], -1)
        weights, denom, lse = _softmax_parts(scores, keep.expand_as(scores))
        out = weights[..., : width * block] @ v_g
        if shared is not None:
            out = out + weights[..., width * block :] @ v_s.unsqueeze(2)
        outs.append(out / denom)
        lses.append(lse)

    out = torch.cat(outs, dim=2).reshape(batch, heads, n_tiles * block, -1)[:, :, grid.pad_front : grid.pad_front + n_q]
    out = out.to(q.dtype)
    if not return_lse:
        return out
    lse = torch.cat(lses, dim=2).reshape(batch, heads, -1)[:, :, grid.pad_front : grid.pad_front + n_q]
    return out, lse
