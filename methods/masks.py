"""Sparse attention patterns as small composable attention-gym style `mask_mod`s.

A `mask_mod(b, h, q_idx, kv_idx) -> bool tensor` says whether query `q_idx`
may see key `kv_idx` (True = visible); it is evaluated on broadcast index
tensors. The same functions serve three users, so a pattern is written once:

* the fp64 oracle in tests (`oracle_attention(..., mask_mod=...)`) and
  `dense_mask` (a boolean matrix for SDPA),
* FlexAttention peers (`create_block_mask(mask_mod, ...)`),
* documentation of what the block-sparse kernel's parametric element masks
  compute (`methods/kernels/block_sparse.py` implements the same predicates).

Positions are bottom-right aligned, as causal masking is everywhere in
attnbench (see `methods/base.causal_visible_keys`): query `i` is the token at
position `i + offset` with `offset = n_keys - n_queries`. Every factory takes
that `offset`, so a pattern means the same thing for a full sequence, a cross
shape, and the one query of a decode step.

The mask_mods here never include causality: callers AND it in
(`oracle_attention(causal=True)`, `with_causal`), which keeps a pattern
reusable for both directions.
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import or_masks

from methods.kernels.layout import TokenTerms
from methods.oracle import MaskMod, with_causal

__all__ = [
    "MaskMod",
    "band",
    "block_table",
    "dense_mask",
    "local_blocks",
    "sinks",
    "sliding_window",
    "summary_columns",
    "terms_mask_mod",
    "window_extent",
    "with_causal",
]


def window_extent(window: int, causal: bool) -> tuple[int, int]:
    """(left, right) reach of a window of `window` keys.

    Causal: the query and the `window - 1` keys before it (Mistral's SWA,
    StreamingLLM's recent window). Non-causal: `window // 2` keys on each
    side, as Longformer's local attention and 1-D neighbourhood attention do.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    return (window - 1, 0) if causal else (window // 2, window // 2)


def band(left: int, right: int, offset: int = 0) -> MaskMod:
    """Keys within `left` before and `right` after the query's position."""

    def mask_mod(b, h, q_idx, kv_idx):
        pos = q_idx + offset
        return (kv_idx >= pos - left) & (kv_idx <= pos + right)

    return mask_mod


def sliding_window(window: int, causal: bool, offset: int = 0) -> MaskMod:
    """Longformer / Mistral local attention: `band` with the reach of `window_extent`."""
    left, right = window_extent(window, causal)
    return band(left, right, offset)


def sinks(n_sinks: int) -> MaskMod:
    """The first `n_sinks` keys, visible to every query (StreamingLLM sinks, BigBird global columns)."""

    def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx < n_sinks

    return mask_mod


def local_blocks(size: int, offset: int = 0) -> MaskMod:
    """Keys in the query's own aligned block of `size` positions (Sparse Transformer's fixed pattern A1)."""

    def mask_mod(b, h, q_idx, kv_idx):
        return torch.div(q_idx + offset, size, rounding_mode="floor") == torch.div(kv_idx, size, rounding_mode="floor")

    return mask_mod


def summary_columns(stride: int, summary: int) -> MaskMod:
    """The last `summary` positions of every block of `stride` (Sparse Transformer's fixed pattern A2)."""

    def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx % stride >= stride - summary

    return mask_mod


def terms_mask_mod(terms: TokenTerms, offset: int) -> MaskMod | None:
    """The union of a pattern's token terms as one mask_mod (None when no term is set): what the
    block-sparse kernel evaluates in its partial blocks, for the oracle and FlexAttention."""
    mods = []
    if terms.band is not None:
        mods.append(band(*terms.band, offset=offset))
    if terms.sinks > 0:
        mods.append(sinks(terms.sinks))
    if terms.local > 0:
        mods.append(local_blocks(terms.local, offset=offset))
    if terms.columns:
        mods.append(summary_columns(*terms.columns))
    if len(mods) < 2:
        return mods[0] if mods else None
    return or_masks(*mods)


def block_table(table: torch.Tensor, block: int, first_block: int, offset: int = 0) -> MaskMod:
    """Visibility looked up per (query block, key block) in a boolean `table`.

    `table` is `(n_query_blocks, n_key_blocks)`, or `(batch, heads, ...)` for
    data-dependent selections; row `r` holds absolute query block
    `first_block + r`, so negative positions (non-causal, more queries than
    keys) index it correctly.
    """

    def mask_mod(b, h, q_idx, kv_idx):
        row = torch.div(q_idx + offset, block, rounding_mode="floor") - first_block
        col = torch.div(kv_idx, block, rounding_mode="floor")
        if table.dim() == 4:
            return table[b, h, row, col]
        return table[row, col]

    return mask_mod


def dense_mask(
    mask_mod: MaskMod | None,
    n_queries: int,
    n_keys: int,
    causal: bool,
    batch: int = 1,
    heads: int = 1,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The pattern as a `(batch, heads, n_queries, n_keys)` boolean matrix (True = visible), for SDPA and tests."""
    full = with_causal(mask_mod, n_queries, n_keys, causal)
    shape = (batch, heads, n_queries, n_keys)
    if full is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    b = torch.arange(batch, device=device).view(-1, 1, 1, 1)
    h = torch.arange(heads, device=device).view(1, -1, 1, 1)
    q = torch.arange(n_queries, device=device).view(1, 1, -1, 1)
    kv = torch.arange(n_keys, device=device).view(1, 1, 1, -1)
    return full(b, h, q, kv).expand(shape).clone()
