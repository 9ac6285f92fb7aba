"""BigBird: global blocks + a sliding window of blocks + seeded random blocks, all at block granularity.

BigBird (Zaheer et al. 2020) is blocked by design: with block size b, query
block i sees `window_blocks` neighbouring key blocks, `random_blocks` key
blocks drawn at random, and `global_blocks` blocks that see and are seen by
everything. The ITC variant makes the first and last blocks global; we make
the *leading* `global_blocks` blocks global so that the pattern is also
causal and stable while decoding (a causal query never sees the last block).

Causal variant (BigBird itself is an encoder pattern): the window is the
`window_blocks` blocks ending at the query's own block, and random blocks
are drawn among the earlier blocks only.

Random blocks are a pure function of (seed, query block, key block): each
candidate key block gets a hashed score and the `random_blocks` best are
kept. So a query block's picks do not depend on the sequence length when
causal (decode sees exactly the row the forward pass used), and every
implementation and run agree.

FLOPs count the elements inside the selected blocks (causal triangles and
the short last block counted exactly).
"""

from __future__ import annotations

import torch

from methods.base import KVCache
from methods.flex import flex_forward
from methods.kernels.layout import (
    BlockLayout,
    TileGrid,
    build_layout,
    expand_block_table,
    mask_to_lists,
    pairs_in_blocks,
)
from methods.masks import MaskMod, block_table
from methods.registry import Param, method, register_impls, require_dot_tile
from methods.sparse_decode import attend_positions
from methods.sparse_patterns import FixedPattern, pattern_impls
from methods.sparse_reference import attend, gathered_attention

_M31 = 0x7FFFFFFF


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 31-bit integer hash (xorshift-multiply); products stay below 2**62, so int64 never overflows."""
    x = x & _M31
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _M31
    x = x ^ (x >> 12)
    x = (x * 0x297A2D39) & _M31
    return x ^ (x >> 15)


BIGBIRD_PARAMS = (
    Param("block", int, 64, "BigBird's block size (the kernel needs a power of two >= 16)", min=1),
    Param("window_blocks", int, 3, "the query's block and its neighbours (causal: the blocks ending at it)", min=1),
    Param("global_blocks", int, 2, "leading blocks that see and are seen by every block (ITC's g = 2)", min=0),
    Param("random_blocks", int, 3, "BigBird's r random blocks per query block", min=0),
    Param("seed", int, 0, "random blocks are a hash of (seed, query block, key block)"),
)

method("bigbird", family="sparse", exact=False, params=BIGBIRD_PARAMS,
       description="global blocks + sliding window of blocks + seeded random blocks",
       source="Zaheer et al. 2020, Big Bird: Transformers for Longer Sequences (ETC/ITC block-sparse attention)")  # fmt: skip


class BigBird(FixedPattern):
    def __init__(self, block: int, window_blocks: int, global_blocks: int, random_blocks: int, seed: int):
        super().__init__()
        self.block, self.window_blocks = block, window_blocks
        self.global_blocks, self.random_blocks, self.seed = global_blocks, random_blocks, seed

    def table(self, grid: TileGrid, causal: bool, device=None) -> torch.Tensor:
        """(n_tiles, n_key_blocks) bool: the key blocks each query block of `grid` (tiles = blocks) keeps."""
        qb = (grid.first_tile + torch.arange(grid.n_tiles, device=device)).view(-1, 1)
        kb = torch.arange(grid.n_key_blocks, device=device).view(1, -1)
        g, w = self.global_blocks, self.window_blocks
        glob = (qb < g) | (kb < g)
        window = ((kb <= qb) & (kb > qb - w)) if causal else ((kb - qb).abs() <= w // 2)
        cand = ~glob & ~window & ((kb < qb) if causal else True)
        picked = torch.zeros_like(cand)
        r = min(self.random_blocks, grid.n_key_blocks)
        if r > 0:
            seed = _mix(torch.tensor(self.seed, device=device))
            score = _mix(_mix(seed ^ (qb & _M31)) ^ kb).masked_fill(~cand, -1)
            top = score.topk(r, dim=-1)
            picked = picked.scatter(-1, top.indices, top.values >= 0)
        return glob | window | picked

    def mask_mod(self, n_q: int, n_k: int, causal: bool, device=None) -> MaskMod:
        grid = TileGrid.bottom_right(n_q, n_k, self.block)
        return block_table(self.table(grid, causal, device), self.block, grid.first_tile, n_k - n_q)

    def computed_pairs(self, n_queries: int, n_keys: int, causal: bool) -> int:
        grid = TileGrid.bottom_right(n_queries, n_keys, self.block)
        p0, p1 = grid.rows()
        j0, j1 = grid.keys()
        return int((pairs_in_blocks(p0, p1, j0, j1, causal) * self.table(grid, causal)).sum())

    # --- implementations ---
    def _reference(self, q, k, v, causal):
        """Global query rows densely (they see everything), the rest by per-tile gather; global keys are shared."""
        n_q, n_k = q.shape[-2], k.shape[-2]
        offset = n_k - n_q
        g_keys = min(self.global_blocks * self.block, n_k)
        n_glob = max(0, min(n_q, self.global_blocks * self.block - offset))
        parts = []
        if n_glob:
            pos = torch.arange(n_glob, device=q.device).view(-1, 1) + offset
            keep = torch.arange(n_k, device=q.device).view(1, -1) <= pos if causal else None
            parts.append(attend(q[:, :, :n_glob], k, v, keep=keep))
        if n_glob < n_q:
            grid = TileGrid(n_q - n_glob, n_k, self.block, self.block, offset + n_glob)
            table = self.table(grid, causal, q.device)
            table[:, : self.global_blocks] = False  # global keys come in as shared keys
            _, blocks = mask_to_lists(table)
            parts.append(
                gathered_attention(
                    q[:, :, n_glob:],
                    k,
                    v,
                    block=self.block,
                    kv_blocks=blocks[None, None],
                    causal=causal,
                    shared_keys=torch.arange(g_keys, device=q.device),
                    q_start=offset + n_glob,
                )
            )
        return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]

    def _kernel_layout(self, n_q: int, n_k: int, tiles: tuple[int, int], causal: bool, device) -> BlockLayout:
        pattern = TileGrid.bottom_right(n_q, n_k, self.block)
        grid = TileGrid.bottom_right(n_q, n_k, *tiles)
        select = expand_block_table(self.table(pattern, causal, device), self.block, pattern.first_tile, grid)
        return build_layout(grid, causal, select=select, device=device)

    def _kernel(self, q, k, v, causal):
        from methods.kernels.block_sparse import kernel_tiles
        from methods.kernels.block_sparse_bwd import block_sparse_attention

        require_dot_tile("block", self.block)
        n_q, n_k = q.shape[-2], k.shape[-2]
        tiles = kernel_tiles(n_q, n_k, q.shape[-1], pattern_block=self.block, dtype=q.dtype)
        key = ("kernel", n_q, n_k, tiles, causal, str(q.device))
        layout = self.layouts.get(key, lambda: self._kernel_layout(n_q, n_k, tiles, causal, q.device))
        return block_sparse_attention(q, k, v, layout, causal=causal)

    def _flex(self, q, k, v, causal):
        mm = self.mask_mod(q.shape[-2], k.shape[-2], causal, q.device)
        key = (self.method, self.block, self.window_blocks, self.global_blocks, self.random_blocks, self.seed)
        return flex_forward(q, k, v, causal, key, mm)

    # --- decode: random blocks may land anywhere in the past, so the full cache stays; a step reads its row only ---
    def prefill(self, k, v, extra: int = 1):
        return KVCache.from_context(k, v, extra=extra)

    def decode_step(self, q, k_new, v_new, state):
        cache = state.append(k_new, v_new)
        n = cache.length
        grid = TileGrid.bottom_right(1, n, self.block)
        blocks = self.table(grid, True, q.device)[0].nonzero().view(-1)
        pos = (blocks.view(-1, 1) * self.block + torch.arange(self.block, device=q.device)).view(-1)
        pos = pos[pos < n]
        return attend_positions(q, cache.keys, cache.values, pos, self.kind == "kernel"), cache


register_impls(
    "bigbird",
    BigBird,
    *pattern_impls(
        reference="global rows dense, window + random blocks gathered",
        kernel="block-sparse Triton kernel, block table (forward and backward)",
        flex="FlexAttention, BlockMask from the block table",
    ),
)
