"""HyperAttention (Han et al. 2023): LSH-sorted block-diagonal attention plus uniformly sampled columns.

Non-causal, following the authors' implementation (github.com/insuhan/hyper-attention):

1. hash queries and keys with angular LSH (`n_projs` random hyperplanes; the
   sign pattern is read in Gray-code order so that neighbouring codes are
   neighbouring buckets) and sort each by its code;
2. exact attention inside diagonal blocks of `block` sorted queries x
   `block` sorted keys: large entries of the attention matrix concentrate
   there;
3. the rest of each row is estimated from `sample_size` key columns drawn
   uniformly (with replacement), skipping those in the row's own block and
   weighted by n / sample_size;
4. the two parts are merged through their log-sum-exps and un-sorted.

Causal: the authors' recursion. The causal matrix is split into two causal
halves (solved recursively, batched as one call of twice the heads) and the
unmasked lower-left quarter (non-causal HyperAttention), merged by
log-sum-exp; below `min_seq_len` the causal base case is exact. Odd lengths
are padded by one zero token at the end, which is invisible to every real
query under causality.

The sampled columns make this an estimator rather than a plain sparse
pattern, so its oracle in the tests is a dense softmax with the same
importance weights. Seeds fix the hyperplanes and the samples, so the
reference and the kernel compute the same estimate.

Decode: the paper accelerates prefill and keeps exact attention for
generation; decode here is exact over the full KV cache. Cross shapes
(n_q != n_k) are not supported: sorted query blocks are paired one to one
with sorted key blocks.
"""

from __future__ import annotations

import functools
import hashlib
import math

import torch

from methods.base import Attention, Capabilities, KVCache, Unsupported, compute_dtype, computed_pairs_dense
from methods.kernels.layout import LayoutCache, TileGrid, TokenTerms, build_layout
from methods.registry import Impl, Param, method, register_impls, triton_guard
from methods.sparse_decode import attend_contiguous
from methods.sparse_reference import attend, gathered_attention, merge_partials

HYPERATTENTION_PARAMS = (
    Param("block", int, 256, "sorted queries x sorted keys per diagonal block (the authors' block_size)", min=1),
    Param("sample_size", int, 256, "uniformly sampled key columns per row (the authors' sample_size)", min=0),
    Param("n_projs", int, 7, "LSH hyperplanes, 2^n_projs buckets (the authors' lsh_num_projs)", min=1, max=20),
    Param("min_seq_len", int, 1024, "causal recursion stops here with exact attention", min=16),
    Param("seed", int, 0, "fixes the LSH hyperplanes and the sampled columns"),
)

method("hyperattention", family="sparse", exact=False, params=HYPERATTENTION_PARAMS,
       description="LSH-sorted block-diagonal attention plus uniformly sampled columns (causal: recursive halving)",
       source="Han et al. 2023, HyperAttention: Long-context Attention in Near-Linear Time")  # fmt: skip

_NOTE = "sorted query and key blocks pair one to one, so n_q must equal n_k"


@functools.cache
def _gray_order(n_projs: int) -> torch.Tensor:
    """Bucket ids in Gray-code order: consecutive ids differ in one hyperplane (the authors' `perm`)."""
    order = torch.tensor([0, 1])
    for bit in range(1, n_projs):
        order = torch.cat([order, order.flip(0) + 2**bit])
    return order[: 2**n_projs]


def _seed_of(*parts) -> int:
    return int(hashlib.sha1(repr(parts).encode()).hexdigest()[:8], 16)


class HyperAttention(Attention):
    def __init__(self, block: int, sample_size: int, n_projs: int, min_seq_len: int, seed: int):
        super().__init__()
        self.block, self.sample_size, self.n_projs = block, sample_size, n_projs
        self.min_seq_len, self.seed = min_seq_len, seed
        self._cache: dict[tuple, torch.Tensor] = {}
        self._layouts = LayoutCache()  # kernel block lists depend on the shape only (sorted space)

    # --- seeded randomness, cached per shape and device ---
    def _projections(self, head_dim: int, device) -> torch.Tensor:
        key = ("proj", head_dim, str(device))
        if key not in self._cache:
            gen = torch.Generator().manual_seed(_seed_of(self.seed, "lsh", head_dim))
            self._cache[key] = torch.randn(head_dim, self.n_projs, generator=gen).to(device)
        return self._cache[key]

    def samples(self, batch: int, heads: int, n: int, device) -> torch.Tensor:
        """(batch, heads, sample_size) sampled sorted-key indices for a non-causal call of size n."""
        key = ("samples", batch, heads, n, str(device))
        if key not in self._cache:
            gen = torch.Generator().manual_seed(_seed_of(self.seed, "samples", batch, heads, n))
            self._cache[key] = torch.randint(n, (batch, heads, self.sample_size), generator=gen).to(device)
        return self._cache[key]

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Angular LSH bucket of every row, in Gray-code order (so sorting puts similar directions together)."""
        proj = self._projections(x.shape[-1], x.device)
        bits = (x.float() @ proj) > 0
        ids = (bits.long() << torch.arange(self.n_projs, device=x.device)).sum(-1)
        return _gray_order(self.n_projs).to(x.device)[ids]

    # --- the algorithm, with the inner attentions swappable between PyTorch and the kernels ---
    def _noncausal(self, q, k, v, kernel: bool):
        """Non-causal HyperAttention of a square problem: (out, lse), both un-sorted back to query order."""
        batch, heads, n, d = q.shape
        q_order = torch.argsort(self.codes(q), dim=-1, stable=True)
        k_order = torch.argsort(self.codes(k), dim=-1, stable=True)
        take = lambda x, order: torch.gather(x, 2, order.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1]))  # noqa: E731
        q_s, k_s, v_s = take(q, q_order), take(k, k_order), take(v, k_order)
        block = min(self.block, n)
        out, lse = self._diagonal_blocks(q_s, k_s, v_s, block, kernel)
        if self.sample_size > 0 and n > block:
            idx = self.samples(batch, heads, n, q.device)
            if kernel:
                from methods.kernels.block_sparse import gather_attention

                out_s, lse_s = gather_attention(
                    q_s, k_s, v_s, idx.unsqueeze(2), exclude_block=block, return_lse=True, out_dtype=torch.float32
                )
            else:
                row_block = (torch.arange(n, device=q.device) // block).view(-1, 1)
                other = (
                    torch.div(idx, block, rounding_mode="floor").unsqueeze(2) != row_block
                )  # not the row's own block
                out_s, lse_s = attend(q_s, take(k_s, idx), take(v_s, idx), keep=other, return_lse=True)
            out, lse = merge_partials(out, lse, out_s, lse_s + math.log(n / self.sample_size))
        inverse = torch.argsort(q_order, dim=-1)
        return take(out, inverse), torch.gather(lse, 2, inverse)

    def _diagonal_blocks(self, q_s, k_s, v_s, block: int, kernel: bool):
        n = q_s.shape[-2]
        if kernel:
            from methods.kernels.block_sparse import kernel_tiles
            from methods.kernels.block_sparse_bwd import block_sparse_attention

            grid = TileGrid.bottom_right(n, n, *kernel_tiles(n, n, q_s.shape[-1], dtype=q_s.dtype))
            terms = TokenTerms(local=block)
            key = ("diagonal", grid, str(q_s.device))
            layout = self._layouts.get(key, lambda: build_layout(grid, False, terms, device=q_s.device))
            return block_sparse_attention(
                q_s, k_s, v_s, layout, causal=False, terms=terms, return_lse=True, out_dtype=torch.float32
            )
        tiles = torch.arange(-(-n // block), device=q_s.device).view(1, 1, -1, 1)
        return gathered_attention(q_s, k_s, v_s, block=block, kv_blocks=tiles, causal=False, return_lse=True)

    def _exact_causal(self, q, k, v, kernel: bool):
        n = q.shape[-2]
        if kernel:
            from methods.kernels.block_sparse import kernel_tiles
            from methods.kernels.block_sparse_bwd import block_sparse_attention

            grid = TileGrid.bottom_right(n, n, *kernel_tiles(n, n, q.shape[-1], dtype=q.dtype))
            every = lambda: torch.ones(grid.n_tiles, grid.n_key_blocks, dtype=torch.bool, device=q.device)  # noqa: E731
            key = ("causal", grid, str(q.device))
            layout = self._layouts.get(key, lambda: build_layout(grid, True, select=every(), device=q.device))
            return block_sparse_attention(q, k, v, layout, causal=True, return_lse=True, out_dtype=torch.float32)
        keep = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        return attend(q, k, v, keep=keep, return_lse=True)

    def _causal(self, q, k, v, kernel: bool):
        batch, heads, n, d = q.shape
        if n <= self.min_seq_len:
            return self._exact_causal(q, k, v, kernel)
        if n % 2:  # one zero token at the end: only the (discarded) padded query can see it
            q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, 1)) for t in (q, k, v))
        half = q.shape[-2] // 2
        halves = [t.reshape(batch, 2 * heads, half, t.shape[-1]) for t in (q, k, v)]
        out_d, lse_d = self._causal(*halves, kernel)
        out_d, lse_d = out_d.reshape(batch, heads, 2 * half, -1), lse_d.reshape(batch, heads, 2 * half)
        out_u, lse_u = self._noncausal(q[:, :, half:], k[:, :, :half], v[:, :, :half], kernel)
        out_b, lse_b = merge_partials(out_d[:, :, half:], lse_d[:, :, half:], out_u, lse_u)
        out = torch.cat([out_d[:, :, :half], out_b], dim=2)[:, :, :n]
        return out, torch.cat([lse_d[:, :, :half], lse_b], dim=2)[:, :, :n]

    def forward(self, q, k, v, causal=False):
        if q.shape[-2] != k.shape[-2]:
            raise Unsupported(
                f"query length != key length is not supported ({_NOTE}); got {q.shape[-2]}, {k.shape[-2]}"
            )
        if q.shape[-2] == 0:
            return q.new_zeros(*q.shape[:-1], v.shape[-1])
        kernel = self.kind == "kernel"
        if not kernel:  # the reference runs in its accumulation dtype and rounds once at the end
            ct = compute_dtype(q.dtype)
            out, _ = (self._causal if causal else self._noncausal)(q.to(ct), k.to(ct), v.to(ct), kernel)
        else:
            out, _ = (self._causal if causal else self._noncausal)(q, k, v, kernel)
        return out.to(q.dtype)

    # --- cost model: the algorithm's own evaluations ---
    def _pairs_noncausal(self, n: int) -> int:
        block = min(self.block, n)
        n_blocks = -(-n // block)
        last = n - (n_blocks - 1) * block
        diag = (n_blocks - 1) * block * block + last * last
        sampled = n * self.sample_size if (self.sample_size > 0 and n > block) else 0
        hashing = n * self.n_projs  # 2n rows x n_projs projections of 2d FLOPs = n * n_projs pairs of 4d FLOPs
        return diag + sampled + hashing

    def _pairs_causal(self, n: int) -> int:
        if n <= self.min_seq_len:
            return n * (n + 1) // 2
        half = (n + n % 2) // 2
        return 2 * self._pairs_causal(half) + self._pairs_noncausal(half)

    def computed_pairs(self, n_queries: int, n_keys: int, causal: bool) -> int:
        """Diagonal blocks + sampled columns + LSH projections (as pairs of 4d FLOPs); exact for decode steps."""
        if n_queries != n_keys:  # only a decode step reaches here with a cross shape, and decode is exact
            return computed_pairs_dense(n_queries, n_keys, causal)
        return self._pairs_causal(n_queries) if causal else self._pairs_noncausal(n_queries)

    # --- decode: exact over the full cache (the paper speeds up prefill only) ---
    def prefill(self, k, v, extra: int = 1):
        return KVCache.from_context(k, v, extra=extra)

    def decode_step(self, q, k_new, v_new, state):
        cache = state.append(k_new, v_new)
        return attend_contiguous(q, cache.keys, cache.values, self.kind == "kernel"), cache


register_impls(
    "hyperattention",
    HyperAttention,
    Impl(
        "reference",
        "reference",
        Capabilities(cross=False, decode=True, note=_NOTE),
        description="LSH sort, per-block gather, sampled columns in PyTorch",
    ),
    Impl(
        "kernel",
        "kernel",
        Capabilities(cross=False, decode=True, backward=False, note=f"{_NOTE}; the Triton kernels are forward-only"),
        guard=triton_guard,
        description="LSH sort in PyTorch, block-diagonal on the block-sparse kernel, samples on the gather kernel",
    ),
)
