"""Query-dependent sparse softmax: estimated block masks (block_topk) and exact per-query top-k (topk).

Both spend some work choosing keys, then attend only to the chosen ones:

* `block_topk` scores pooled (mean) key blocks against the pooled query tile
  (Quest, MInference and SeerAttention estimate masks this way) and keeps the
  `top_blocks` best earlier blocks plus the tile's own (diagonal) block. The
  selection is one small (tiles x blocks) product, and the attention runs on
  the block-sparse kernel.
* `topk` keeps, per query, the exact `top_k` highest-scoring keys: the quality
  ceiling of any top-k selection (SEA, Loki, TokenSelect approximate it). It
  must score every key to find them, so it saves no score FLOPs; what it
  bounds is how well a budget of k keys can do.

Selection is not differentiable (indices), the attention over the chosen
keys is, as in the methods these come from.
"""

from __future__ import annotations

import math

import torch

from methods.base import Attention, Capabilities, KVCache, computed_pairs_dense, default_scale
from methods.kernels.layout import TileGrid, build_layout, expand_block_table, interval_count, pairs_in_blocks
from methods.masks import MaskMod, block_table
from methods.registry import Impl, Param, method, register_impls, require_dot_tile, triton_guard
from methods.sparse_decode import attend_positions
from methods.sparse_reference import gathered_attention

REFERENCE = Capabilities(decode=True)
# block_topk's attention runs on the block-sparse kernel, which has a Triton backward; topk's gather kernel has none.
BLOCK_KERNEL = Capabilities(decode=True)
GATHER_KERNEL = Capabilities(decode=True, backward=False, note="the gather kernel is forward-only")


def selection_impls(reference: str, kernel: str, kernel_caps: Capabilities) -> tuple[Impl, Impl]:
    return (
        Impl("reference", "reference", REFERENCE, description=reference),
        Impl("kernel", "kernel", kernel_caps, guard=triton_guard, description=kernel),
    )


# --- block_topk -------------------------------------------------------------------------------

BLOCK_TOPK_PARAMS = (
    Param("block", int, 64, "query and key block size (the kernel needs a power of two >= 16)", min=1),
    Param("top_blocks", int, 8, "key blocks kept per query block besides the diagonal one", min=0),
)

method("block_topk", family="sparse", exact=False, params=BLOCK_TOPK_PARAMS,
       description="per query block, the top-k key blocks by pooled (mean) query-key score, plus the diagonal block",
       source="Quest (Tang et al. 2024); MInference (Jiang et al. 2024); SeerAttention (Gao et al. 2024): estimated block masks")  # fmt: skip


def _block_means(x: torch.Tensor, n_blocks: int, block: int, front: int = 0) -> torch.Tensor:
    """(b, h, n_blocks, d) float32 means of `x`'s rows grouped in blocks of `block`, `front` empty rows first."""
    n = x.shape[-2]
    padded = torch.nn.functional.pad(x.float(), (0, 0, front, n_blocks * block - front - n))
    sums = padded.view(*x.shape[:2], n_blocks, block, -1).sum(3)
    counts = torch.full((n_blocks,), block, device=x.device)
    counts[0] -= front
    counts[-1] -= n_blocks * block - front - n
    return sums / counts.clamp_min(1).view(-1, 1)


class BlockTopk(Attention):
    """Tiles of `block` queries, each keeping its diagonal key block and the `top_blocks` best-scoring others.

    Causal: candidates are the blocks strictly before the tile (fully visible
    to all its queries); the diagonal block is causally masked inside. The
    pooled query of a tile averages its queries, so under causal masking a
    query's choice of blocks depends on later queries of its own tile (as in
    MInference's prefill); decoding (one query) has no such coupling.
    """

    def __init__(self, block: int, top_blocks: int):
        super().__init__()
        self.block, self.top_blocks = block, top_blocks

    @torch.no_grad()
    def select(self, q: torch.Tensor, k: torch.Tensor, causal: bool) -> tuple[TileGrid, torch.Tensor]:
        """The tile grid and (b, h, n_tiles, 1 + top_blocks) key-block indices (-1 = none; diagonal first)."""
        n_q, n_k = q.shape[-2], k.shape[-2]
        grid = TileGrid.bottom_right(n_q, n_k, self.block)
        pooled_q = _block_means(q, grid.n_tiles, self.block, front=grid.pad_front)
        pooled_k = _block_means(k, grid.n_key_blocks, self.block)
        scores = pooled_q @ pooled_k.transpose(-1, -2)  # (b, h, tiles, key blocks)
        qb = (grid.first_tile + torch.arange(grid.n_tiles, device=q.device)).view(-1, 1)
        kb = torch.arange(grid.n_key_blocks, device=q.device).view(1, -1)
        cand = (kb != qb) & ((kb < qb) if causal else True)
        scores = scores.masked_fill(~cand, float("-inf"))
        r = min(self.top_blocks, grid.n_key_blocks)
        top = scores.topk(r, dim=-1)
        picked = torch.where(torch.isfinite(top.values), top.indices, -1)
        diag = torch.where((qb >= 0) & (qb < grid.n_key_blocks), qb, -1).expand(*picked.shape[:2], -1, 1)
        return grid, torch.cat([diag, picked], dim=-1)

    @staticmethod
    def _as_table(grid: TileGrid, blocks: torch.Tensor) -> torch.Tensor:
        """Block lists (-1 padded) as a (b, h, n_tiles, n_key_blocks) boolean table."""
        table = torch.zeros(*blocks.shape[:3], grid.n_key_blocks + 1, dtype=torch.bool, device=blocks.device)
        table.scatter_(-1, (blocks + 1).long(), True)  # -1 lands in the spare column 0
        return table[..., 1:]

    def selection_table(self, q, k, causal) -> tuple[TileGrid, torch.Tensor]:
        """The selection as a (b, h, n_tiles, n_key_blocks) boolean table."""
        grid, blocks = self.select(q, k, causal)
        return grid, self._as_table(grid, blocks)

    def mask_mod(self, q, k, causal) -> MaskMod:
        grid, table = self.selection_table(q, k, causal)
        return block_table(table, self.block, grid.first_tile, k.shape[-2] - q.shape[-2])

    def computed_pairs(self, n_queries: int, n_keys: int, causal: bool) -> int:
        """Elements in the selected blocks, plus the pooled scores (a dot product = half a pair) for selection.

        Exact when causal (picked blocks precede the diagonal, so they are
        whole) and whenever a tile keeps all its candidates. Otherwise, which
        blocks win depends on the data; they are counted as whole blocks, so
        non-causal, a picked short last key block counts `block` keys.
        """
        grid = TileGrid.bottom_right(n_queries, n_keys, self.block)
        p0, p1 = (t.view(-1) for t in grid.rows())
        qb = grid.first_tile + torch.arange(grid.n_tiles)
        has_diag = (qb >= 0) & (qb < grid.n_key_blocks)
        j0 = qb * self.block
        j1 = torch.minimum(j0 + self.block - 1, torch.tensor(n_keys - 1))
        diag = torch.where(has_diag, pairs_in_blocks(p0, p1, j0, j1, causal), 0)
        n_cand = qb.clamp(0, grid.n_key_blocks) if causal else grid.n_key_blocks - has_diag.long()
        cand_keys = (n_cand * self.block) if causal else n_keys - interval_count(j0, j1) * has_diag
        keys = torch.where(n_cand <= self.top_blocks, cand_keys, self.top_blocks * self.block)
        picked = keys * interval_count(p0, p1)
        return int(diag.sum() + picked.sum()) + math.ceil(0.5 * int(n_cand.sum()))

    def forward(self, q, k, v, causal=False):
        grid, blocks = self.select(q, k, causal)
        if self.kind != "kernel":
            return gathered_attention(q, k, v, block=self.block, kv_blocks=blocks, causal=causal)
        from methods.kernels.block_sparse import kernel_tiles
        from methods.kernels.block_sparse_bwd import block_sparse_attention

        require_dot_tile("block", self.block)
        n_q, n_k = q.shape[-2], k.shape[-2]
        kgrid = TileGrid.bottom_right(n_q, n_k, *kernel_tiles(n_q, n_k, q.shape[-1], pattern_block=self.block, dtype=q.dtype))
        table = self._as_table(grid, blocks)
        layout = build_layout(kgrid, causal, select=expand_block_table(table, self.block, grid.first_tile, kgrid))
        return block_sparse_attention(q, k, v, layout, causal=causal)

    # --- decode: the full cache plus running sums of finished key blocks (Quest keeps per-page metadata too) ---
    def prefill(self, k, v, extra: int = 1):
        n = k.shape[-2]
        n_full = n // self.block
        # One row per key block finished by the last token this state can take (n + extra).
        sums = k.new_zeros(*k.shape[:2], (n + extra) // self.block, k.shape[-1], dtype=torch.float32)
        sums[:, :, :n_full] = k[:, :, : n_full * self.block].float().view(*k.shape[:2], n_full, self.block, -1).sum(3)
        return KVCache.from_context(k, v, extra=extra), sums

    def decode_step(self, q, k_new, v_new, state):
        cache, sums = state
        cache = cache.append(k_new, v_new)
        n, b = cache.length, self.block
        qb = (n - 1) // b  # the new token's block; blocks 0 .. qb-1 are finished
        scores = q.float() @ (sums[:, :, :qb] / b).transpose(-1, -2)  # (batch, heads, 1, qb)
        r = min(self.top_blocks, qb)
        top = scores[:, :, 0].topk(r, dim=-1).indices  # (batch, heads, r)
        own = torch.arange(qb * b, n, device=q.device).expand(*top.shape[:2], -1)
        picked = (top.unsqueeze(-1) * b + torch.arange(b, device=q.device)).flatten(-2)
        out = attend_positions(q, cache.keys, cache.values, torch.cat([own, picked], -1), self.kind == "kernel")
        if n % b == 0:  # the token finished its block: record the block's sum, past what the old state covers
            sums[:, :, qb] = cache.keys[:, :, qb * b : n].float().sum(2)
        return out, (cache, sums)

    def state_bytes(self, batch, heads, context, head_dim, dtype):
        block_sums = batch * heads * (context // self.block) * head_dim * 4
        return super().state_bytes(batch, heads, context, head_dim, dtype) + block_sums


register_impls(
    "block_topk",
    BlockTopk,
    *selection_impls(
        reference="pooled selection, then per-tile gather of the chosen blocks",
        kernel="pooled selection, then the block-sparse kernel (forward and backward)",
        kernel_caps=BLOCK_KERNEL,
    ),
)


# --- topk -----------------------------------------------------------------------------------

TOPK_PARAMS = (Param("top_k", int, 256, "keys per query (the same budget as the 256-token windows)", min=1),)

method("topk", family="sparse", exact=False, params=TOPK_PARAMS,
       description="per query, softmax over its exact top-k keys (the ceiling of top-k key selection)",
       source="top-k attention (Gupta et al. 2021); SEA (Lee et al. 2023), Loki (Singhania et al. 2024), TokenSelect (2024)")  # fmt: skip

SCORE_CHUNK_BYTES = 128 * 2**20  # bound on one chunk of the full score rows used for selection


class Topk(Attention):
    def __init__(self, top_k: int):
        super().__init__()
        self.top_k = top_k

    def _scored_chunks(self, q, k, causal):
        """Yield (row slice, top-k scores, top-k indices) per chunk of query rows; masked slots score -inf."""
        batch, heads, n_q, d = q.shape
        n_k = k.shape[-2]
        kk = min(self.top_k, n_k)
        rows = max(1, SCORE_CHUNK_BYTES // max(1, batch * heads * n_k * 4))
        kf = k.float() if q.dtype != torch.float64 else k
        for lo in range(0, n_q, rows):
            hi = min(n_q, lo + rows)
            scores = (q[:, :, lo:hi].to(kf.dtype) @ kf.transpose(-1, -2)) * default_scale(d)
            if causal:
                pos = torch.arange(lo, hi, device=q.device).view(-1, 1) + (n_k - n_q)
                scores = scores.masked_fill(torch.arange(n_k, device=q.device).view(1, -1) > pos, float("-inf"))
            top = scores.topk(kk, dim=-1)
            yield slice(lo, hi), top.values, top.indices

    @torch.no_grad()
    def select(self, q, k, causal) -> torch.Tensor:
        """(b, h, n_q, min(top_k, n_k)) key indices per query, -1 where fewer keys are visible."""
        parts = [torch.where(torch.isfinite(vals), idx, -1) for _, vals, idx in self._scored_chunks(q, k, causal)]
        return torch.cat(parts, dim=2)

    def prefill(self, k, v, extra: int = 1):
        """The full cache: any key may be among a future query's top k."""
        return KVCache.from_context(k, v, extra=extra)

    def computed_pairs(self, n_queries: int, n_keys: int, causal: bool) -> int:
        """Selection scores every visible key (a dot product = half a pair), then top_k pairs per query."""
        dense = computed_pairs_dense(n_queries, n_keys, causal)
        if causal:
            visible = (torch.arange(n_queries) + (n_keys - n_queries) + 1).clamp(0, n_keys)
        else:
            visible = torch.full((n_queries,), n_keys)
        return math.ceil(0.5 * dense) + int(visible.clamp_max(self.top_k).sum())

    def forward(self, q, k, v, causal=False):
        if q.shape[-2] == 0 or k.shape[-2] == 0:
            return q.new_zeros(*q.shape[:-1], v.shape[-1])
        if self.kind == "kernel":
            from methods.kernels.block_sparse import gather_attention

            return gather_attention(q, k, v, self.select(q, k, causal))
        outs = []
        for _, vals, idx in self._scored_chunks(q, k, causal):
            finite = torch.isfinite(vals)
            m = vals.amax(-1, keepdim=True).masked_fill(~finite[..., :1], 0.0)
            w = torch.exp(vals - m)
            w = w / w.sum(-1, keepdim=True).clamp_min(1.0)  # >= 1 unless the row is empty: then 0, not NaN
            # Scattering the k weights back into their score row and multiplying by V reads V once per chunk;
            # gathering k values per query would move N x k x d numbers. Selection already costs N x n_k x d.
            dense = torch.zeros(*idx.shape[:3], k.shape[-2], dtype=w.dtype, device=w.device).scatter(-1, idx, w)
            outs.append(dense @ v.to(w.dtype))
        return torch.cat(outs, dim=2).to(q.dtype)


register_impls(
    "topk",
    Topk,
    *selection_impls(
        reference="chunked full scores, top-k per row, softmax over the k",
        kernel="top-k selection, then the gather kernel",
        kernel_caps=GATHER_KERNEL,
    ),
)
