"""Which (query tile, key block) pairs a sparse pattern touches: the bookkeeping shared by references and kernel.

Host-side PyTorch (no Triton), so the references import it without a GPU
stack; it sits under `methods/kernels/` because the block-sparse kernel takes
its `BlockLayout` and `TokenTerms`, and kernels import nothing from method
modules. The same terms as attention-gym mask_mods (for the oracle and
FlexAttention) are built by `methods.masks.terms_mask_mod`.

A sparse-softmax method is described twice, at two granularities:

* **token terms** (`TokenTerms`): a union of parametric predicates on the
  query position `p` and key position `j` (a band around `p`, the first
  `sinks` keys, the query's own aligned block, summary columns). They are
  the element masks the Triton kernel evaluates inside partial blocks;
* **block selections**: a boolean table over (query block, key block), for
  patterns that pick whole blocks (BigBird's random blocks, block top-k).

`TileGrid` cuts the queries into position-aligned tiles (tile edges fall on
multiples of the tile size in absolute position, so a tile is exactly one
pattern block even when `n_q != n_k`) and the keys into blocks.
`term_tables` decides, per tile and key block and without looking at
elements, whether a term can hold somewhere (`any`) or holds everywhere
(`all`); `build_layout` turns that into FlexAttention-style block lists:

* `full`: every element visible, no mask evaluated;
* `edge`: a selected whole block cut only by causality or the end of the keys;
* `partial`: the token terms are evaluated element by element.

`any`/`all` of a union are computed conservatively (`all` may say False
where it is True); that only moves a block from `full` to `partial`, never
changes the result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "BlockLayout",
    "LayoutCache",
    "TileGrid",
    "TokenTerms",
    "build_layout",
    "causal_tables",
    "expand_block_table",
    "interval_count",
    "mask_to_lists",
    "pairs_in_blocks",
    "term_tables",
    "transpose_lists",
]


def floordiv(x: torch.Tensor | int, d: int) -> torch.Tensor | int:
    """Floor division that stays floor for negative positions (non-causal, n_q > n_k)."""
    if isinstance(x, int):
        return x // d
    return torch.div(x, d, rounding_mode="floor")


@dataclass(frozen=True)
class TokenTerms:
    """A union of token-level predicates; an unset term contributes nothing.

    band=(left, right): `p - left <= j <= p + right`. sinks=S: `j < S`.
    local=L: `j // L == p // L`. columns=(stride, summary): `j % stride >= stride - summary`.
    """

    band: tuple[int, int] | None = None
    sinks: int = 0
    local: int = 0
    columns: tuple[int, int] | None = None


@dataclass(frozen=True)
class TileGrid:
    """Position-aligned query tiles of `block_m` and key blocks of `block_n`.

    Query `i` sits at position `q_start + i` (`q_start = n_k - n_q` for
    bottom-right alignment). Tile `t` covers positions
    `[(first_tile + t) * block_m, (first_tile + t + 1) * block_m)`.
    """

    n_q: int
    n_k: int
    block_m: int
    block_n: int
    q_start: int

    @classmethod
    def bottom_right(cls, n_q: int, n_k: int, block_m: int, block_n: int | None = None) -> TileGrid:
        return cls(n_q, n_k, block_m, block_n or block_m, n_k - n_q)

    @property
    def first_tile(self) -> int:
        return self.q_start // self.block_m

    @property
    def n_tiles(self) -> int:
        if self.n_q == 0:
            return 0
        return (self.q_start + self.n_q - 1) // self.block_m - self.first_tile + 1

    @property
    def n_key_blocks(self) -> int:
        return -(-self.n_k // self.block_n)

    @property
    def pad_front(self) -> int:
        """Rows of tile 0 before the first query."""
        return self.q_start - self.first_tile * self.block_m

    def rows(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(first, last) valid query position of every tile, shaped (n_tiles, 1)."""
        start = (self.first_tile + torch.arange(self.n_tiles, device=device)) * self.block_m
        p0 = start.clamp_min(self.q_start)
        p1 = (start + self.block_m - 1).clamp_max(self.q_start + self.n_q - 1)
        return p0.view(-1, 1), p1.view(-1, 1)

    def keys(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(first, last) key position of every key block, shaped (1, n_key_blocks)."""
        j0 = torch.arange(self.n_key_blocks, device=device) * self.block_n
        j1 = (j0 + self.block_n - 1).clamp_max(self.n_k - 1)
        return j0.view(1, -1), j1.view(1, -1)


def _band_tables(left: int, right: int, p0, p1, j0, j1):
    any_ = (j0 <= p1 + right) & (j1 >= p0 - left)
    all_ = (j0 >= p1 - left) & (j1 <= p0 + right)
    return any_, all_


def _local_tables(size: int, p0, p1, j0, j1):
    bp0, bp1, bj0, bj1 = (floordiv(x, size) for x in (p0, p1, j0, j1))
    any_ = (bj0 <= bp1) & (bp0 <= bj1)
    all_ = (bp0 == bp1) & (bj0 == bj1) & (bp0 == bj0)
    return any_, all_


def _column_tables(stride: int, summary: int, j0, j1):
    first_col = stride - summary
    r = j0 % stride
    first_hit = torch.where(r >= first_col, j0, j0 + (first_col - r))
    any_ = (first_hit <= j1) & (summary > 0)
    all_ = (j1 - j0 + 1 <= summary) & (r >= first_col) & (floordiv(j0, stride) == floordiv(j1, stride))
    return any_, all_


def term_tables(terms: TokenTerms, grid: TileGrid, device=None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per term: (any, all) boolean tables of shape (n_tiles, n_key_blocks)."""
    p0, p1 = grid.rows(device)
    j0, j1 = grid.keys(device)
    shape = (grid.n_tiles, grid.n_key_blocks)
    out = {}
    if terms.band is not None:
        out["band"] = _band_tables(*terms.band, p0, p1, j0, j1)
    if terms.sinks > 0:
        out["sinks"] = (j0 < terms.sinks, j1 < terms.sinks)
    if terms.local > 0:
        out["local"] = _local_tables(terms.local, p0, p1, j0, j1)
    if terms.columns:
        out["columns"] = _column_tables(*terms.columns, j0, j1)
    return {k: (a.expand(shape), b.expand(shape)) for k, (a, b) in out.items()}


def causal_tables(grid: TileGrid, causal: bool, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(any, all): some / every valid (query, key) pair of the block is causally visible."""
    shape = (grid.n_tiles, grid.n_key_blocks)
    if not causal:
        ones = torch.ones(shape, dtype=torch.bool, device=device)
        return ones, ones
    p0, p1 = grid.rows(device)
    j0, j1 = grid.keys(device)
    return (j0 <= p1).expand(shape), (j1 <= p0).expand(shape)


def mask_to_lists(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean (..., n_tiles, n_blocks) -> (counts (..., n_tiles), indices (..., n_tiles, L)) as int32.

    Indices come in increasing block order and are padded with -1 to the
    longest list (at least 1 wide, so the tensor is never empty).
    """
    counts = mask.sum(-1)
    width = max(int(counts.max()) if counts.numel() else 0, 1)
    order = torch.argsort((~mask).to(torch.uint8), dim=-1, stable=True)[..., :width]
    if order.shape[-1] < width:  # fewer blocks than the pad width (no key blocks at all)
        order = torch.nn.functional.pad(order, (0, width - order.shape[-1]), value=-1)
    keep = torch.arange(width, device=mask.device) < counts.unsqueeze(-1)
    return counts.to(torch.int32), torch.where(keep, order, -1).to(torch.int32)


def transpose_lists(num: torch.Tensor, idx: torch.Tensor, n_cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row lists of columns -> per-column lists of the rows that list it, in `mask_to_lists`' format.

    The block-sparse backward's dK/dV pass owns one key block and must visit
    exactly the query tiles whose forward lists name it (in the same category:
    full, edge or partial, so it applies the same element mask); this is that
    inversion. `num` is (..., n_rows), `idx` (..., n_rows, L) with -1 padding;
    entries past a row's count are ignored. Returns counts (..., n_cols) and
    indices (..., n_cols, L') as int32, rows in increasing order.
    """
    n_rows, width = idx.shape[-2], idx.shape[-1]
    live = (torch.arange(width, device=idx.device) < num.unsqueeze(-1).long()) & (idx >= 0)
    safe = torch.where(live, idx.long(), n_cols)  # dead entries go to a dump column, dropped below
    table = torch.zeros((*idx.shape[:-1], n_cols + 1), dtype=torch.bool, device=idx.device)
    table.scatter_(-1, safe, True)
    table = table[..., :n_cols].transpose(-1, -2)
    if n_rows == 0:
        table = table.reshape(*idx.shape[:-2], n_cols, 0)
    return mask_to_lists(table)


def expand_block_table(table: torch.Tensor, block: int, first_block: int, grid: TileGrid) -> torch.Tensor:
    """A (..., query block, key block) table at pattern granularity `block`, resampled onto the grid's tiles.

    The grid's tiles must divide the pattern block (kernels use tiles of 16 to
    64 under a pattern block of 64 or more); row `r` of `table` is absolute
    query block `first_block + r`.
    """
    if block % grid.block_m or block % grid.block_n:
        raise ValueError(
            f"pattern block {block} must be a multiple of the kernel tiles ({grid.block_m}, {grid.block_n})"
        )
    if block == grid.block_m == grid.block_n and grid.first_tile == first_block:
        return table[..., : grid.n_tiles, : grid.n_key_blocks]
    dev = table.device
    rows = floordiv((grid.first_tile + torch.arange(grid.n_tiles, device=dev)) * grid.block_m, block) - first_block
    cols = floordiv(torch.arange(grid.n_key_blocks, device=dev) * grid.block_n, block)
    return table[..., rows, :][..., cols]


@dataclass
class BlockLayout:
    """Per query tile, the key blocks a block-sparse kernel visits, FlexAttention BlockMask style.

    Count tensors are (Bb, Hb, n_tiles), index tensors (Bb, Hb, n_tiles, L),
    int32, with Bb in {1, batch} and Hb in {1, heads} (size 1 broadcasts).
    """

    grid: TileGrid
    full_num: torch.Tensor
    full_idx: torch.Tensor
    edge_num: torch.Tensor
    edge_idx: torch.Tensor
    part_num: torch.Tensor
    part_idx: torch.Tensor

    def to(self, device) -> BlockLayout:
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.__dict__.items()}
        return BlockLayout(**moved)


def build_layout(
    grid: TileGrid,
    causal: bool,
    terms: TokenTerms | None = None,
    select: torch.Tensor | None = None,
    device=None,
) -> BlockLayout:
    """Classify every (tile, key block) as full, edge, partial or skipped; see the module docstring.

    `select` is a (..., n_tiles, n_key_blocks) table on the grid (see
    `expand_block_table`) of whole blocks the pattern keeps.
    """
    shape = (grid.n_tiles, grid.n_key_blocks)
    c_any, c_all = causal_tables(grid, causal, device)
    j0, _ = grid.keys(device)
    in_bounds = (j0 + grid.block_n <= grid.n_k).expand(shape)
    tok_any = torch.zeros(shape, dtype=torch.bool, device=device)
    tok_all = tok_any.clone()
    for a, b in term_tables(terms or TokenTerms(), grid, device).values():
        tok_any, tok_all = tok_any | a, tok_all | b
    sel = torch.zeros((1, 1, *shape), dtype=torch.bool, device=device) if select is None else select
    while sel.dim() < 4:
        sel = sel.unsqueeze(0)
    full = (sel | tok_all) & c_all & in_bounds
    edge = sel & c_any & ~full
    part = ~sel & tok_any & c_any & ~full
    lists = [mask_to_lists(m) for m in (full, edge, part)]
    return BlockLayout(grid, *lists[0], *lists[1], *lists[2])


class LayoutCache:
    """Block lists of data-independent patterns, kept per shape and device, as FlexAttention keeps its BlockMask.

    Fixed patterns build their lists once per shape, outside the timed
    calls that follow, so a kernel row measures attention, not bookkeeping.
    Bounded: the oldest half goes when it is full.
    """

    def __init__(self, size: int = 32):
        self.size = size
        self.entries: dict[tuple, object] = {}

    def get(self, key: tuple, build):
        if key not in self.entries:
            if len(self.entries) >= self.size:
                for old in list(self.entries)[: self.size // 2]:
                    del self.entries[old]
            self.entries[key] = build()
        return self.entries[key]


# --- exact element counts (the FLOP model's computed area) -------------------------------


def interval_count(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Size of the integer interval [lo, hi] (0 when empty)."""
    return (hi - lo + 1).clamp_min(0)


def pairs_in_blocks(p0, p1, j0, j1, causal: bool) -> torch.Tensor:
    """Visible (query, key) pairs of queries p0..p1 against keys j0..j1 (broadcast int64 tensors), closed form."""
    rows = interval_count(p0, p1)
    keys = interval_count(j0, j1)
    if not causal:
        return rows * keys
    # Query p sees min(j1, p) - j0 + 1 keys when p >= j0: a ramp on [j0, j1], then the whole block.
    a = torch.maximum(p0, j0)
    b = torch.minimum(p1, j1)
    ramp_rows = interval_count(a, b)
    ramp = (ramp_rows * (a + b - 2 * j0 + 2)) // 2  # sum of (p - j0 + 1) for p in [a, b]
    flat_rows = interval_count(torch.maximum(p0, j1 + 1), p1)
    return ramp + flat_rows * keys
