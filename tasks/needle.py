"""Task `needle`: needle-in-a-haystack retrieval by the attention operator itself, no training.

Long-context users first ask whether a method still finds one relevant token
among many (gkamradt's needle test, RULER, passkey retrieval). This task asks
the attention op that question directly, so it runs in seconds on a CPU and
applies to every method through `attn(q, k, v, causal=...)`.

The construction, per trial (each (batch, head) pair is one independent trial,
so one call measures `batch * heads` trials):

- **Haystack.** N tokens with keys and values drawn from N(0, I) and random
  queries. The softmax scale is 1/sqrt(head_dim), so a haystack key's logit
  against the probe query is N(0, 1).
- **Query.** `q = sqrt(head_dim) * u` for a random unit vector `u`: its norm is
  that of a typical random query, and its logit for a key `k` is `u . k`.
  The query sits at the last position, causal or not (the simplest choice that
  is valid for both: in the causal case it sees the whole haystack). The
  multi-query variant puts its K queries on the last K positions.
- **Needle.** The key at the needle slot keeps its random part orthogonal to
  `u` (so its norm and direction look like any other key) but its component
  along `u` is set to `beta`: the needle's logit is exactly `beta`, i.e. beta
  is the signal-to-noise ratio in units of the haystack logits' std. Its value
  is a *marker*: one row of a random orthogonal codebook of `head_dim` codes
  scaled to norm sqrt(head_dim), like the haystack values. The metric decodes
  the output by its largest projection on the codebook; the haystack values
  are random and project on every code, so they are the noise decoding fights.
- **Depth.** The haystack slots are the positions before the query (0 .. N-n_q-1).
  Depth d puts the needle (or the block of K consecutive needles of the
  multi-needle variants) at slot floor(d * (slots - K) + 0.5): depth 0 is the
  first token, depth 1 the token just before the (first) query; the query
  itself is never the needle.

RULER-style variants (`variant`), with `needles` = K:

- `single`: one needle, one query.
- `multikey`: one needle plus K-1 distractors at random slots (seeded per trial)
  whose keys are close to the needle's (they share a fraction
  `distractor_sim` of its logit and of its orthogonal noise) but not the
  query's exact key. Their values carry other markers; decoding a distractor
  is a miss.
- `multivalue`: K needles with the identical key, each with its own marker;
  a hit is all K markers being the top-K decoded markers.
- `multiquery`: K queries (orthonormal directions) and K needles, needle i
  answering query i; a hit is every query decoding its own marker.

Columns per cell:

- `accuracy` (the core column): hit rate over the trials; `hits`, `trials`;
  `query_hit_rate` (per query, for multiquery); `chance`, the hit rate of a
  decoder that guesses (1/head_dim for single), the floor for a blind method.
- `needle_cos`: cos(output at the query, target value), mean over targets;
  for multivalue a perfect retrieval mixes K values, so its ceiling is 1/sqrt(K).
- `needle_mass`, `margin`, `margin_min`: computed from q and k alone, so they
  describe the cell's difficulty identically for every method: the attention
  mass exact softmax puts on the target(s), and the weakest target logit minus
  the strongest competing logit (mean and worst over trials).
- `method_mass`: the mass the method itself puts on the target(s), read by a
  probe call whose values are the target indicator. That is exact for any
  attention whose output is a weighted sum of values with weights from q and
  k (it equals `needle_mass` for exact softmax and is 0 for a window that
  misses the needle); a second call checks attn(v + probe) = attn(v) +
  attn(probe), and a method that fails it (an output norm, as lightning's
  RMSNorm) gets None, with `linear_in_v` False.
- `fidelity_*` against the fp64 oracle at the read rows only (cheap at any
  length; exact methods outside tolerance are `wrong`), then latency and memory
  of the whole-sequence forward call from `bench.measure.checks.measure_calls`, with
  `flops = attn.flops(shape, "fwd")`, as in `scaling`.

Default beta (conf/task/needle.yaml): 8. Exact softmax's hit rate jumps from
chance to 1 over about two units of beta, and the jump moves right with the
context (about 4-5 at 2K tokens, 6-7 at 128K). At beta 8 exact softmax scores
100% from 256 to 131072 tokens, yet the needle does not dominate the row at
long context (its mass is about 0.5 at 2K, 0.015 at 128K): a method has to keep
the softmax's fine structure to decode it.

Seeding: the haystack depends on the run seed and on the point's shape and
variant only, not on depth, beta, causal, dtype or the implementation. Moving
the needle or changing its strength leaves the haystack untouched (as in the
needle-in-a-haystack plots), and every implementation sees the same inputs.
The needles' markers are redrawn per depth (see `needle_markers`).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from bench.measure.checks import TimedCall, check_exact, check_finite
from methods.base import Attention, Shape, default_scale
from methods.oracle import fidelity, oracle_attention
from tasks.base import (
    FIDELITY_METRICS,
    TIMED_CALL_METRICS,
    AttentionFactory,
    Cell,
    Metric,
    PreparedCell,
    RunContext,
    Section,
    SummaryColumn,
    Task,
    torch_dtype,
)
from tasks.needle_views import needle_heatmaps, needle_table
from tasks.registry import register_task

VARIANTS = ("single", "multikey", "multivalue", "multiquery")
# attn(v + probe) must equal attn(v) + attn(probe) to this relative tolerance for `method_mass` to be read.
LINEARITY_TOL = {"float32": 1e-3, "float16": 2e-2, "bfloat16": 1e-1, "float64": 1e-8}
# The keys that decide the haystack. Depth, beta, causal and dtype are left out on purpose (module docstring).
HAYSTACK_KEYS = ("batch", "heads", "seq_len", "head_dim", "variant", "needles", "distractor_sim")


@dataclass
class NeedleTruth:
    """Ground truth of one haystack; positions are shared by all trials, markers are per trial."""

    variant: str
    query_pos: torch.Tensor  # (n_q,) positions whose output is read
    target_pos: torch.Tensor  # (n_q, n_t) positions of the needles each query must retrieve
    target_marker: torch.Tensor  # (batch, heads, n_q, n_t) codebook index of each target's value
    needle_pos: torch.Tensor  # (K,) every needle position (the block placed at `depth`)
    distractor_pos: torch.Tensor  # (batch, heads, n_d) multikey distractors (n_d = 0 otherwise)
    distractor_marker: torch.Tensor  # (batch, heads, n_d)
    codebook: torch.Tensor  # (batch, heads, C, head_dim) float32, orthogonal rows of norm sqrt(head_dim)

    @property
    def n_queries(self) -> int:
        return int(self.query_pos.numel())

    def to(self, device: torch.device | str) -> NeedleTruth:
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return NeedleTruth(**moved)


@dataclass
class Haystack:
    q: torch.Tensor  # (batch, heads, N, head_dim) in the point's dtype
    k: torch.Tensor
    v: torch.Tensor
    truth: NeedleTruth


def haystack_seed(seed: int, point: dict) -> int:
    """Same run seed and haystack keys, same haystack, whichever implementation (or depth, or beta) asks."""
    keys = {k: point.get(k) for k in HAYSTACK_KEYS}
    digest = hashlib.sha1(json.dumps([seed, keys, "needle"], sort_keys=True).encode()).hexdigest()
    return int(digest[:8], 16)


def n_queries(variant: str, needles: int) -> int:
    return needles if variant == "multiquery" else 1


def n_block(variant: str, needles: int) -> int:
    """Needles placed as a block at `depth` (multikey's distractors are scattered, not part of it)."""
    return needles if variant in ("multivalue", "multiquery") else 1


def needle_block_start(depth: float, slots: int, block: int) -> int:
    """First position of a block of `block` needles at relative depth `depth` among `slots` haystack slots."""
    return int(math.floor(depth * (slots - block) + 0.5))


def chance_level(variant: str, needles: int, codes: int) -> float:
    """Hit rate of a decoder that guesses: the floor a method that cannot see the needle should sit at."""
    if variant in ("single", "multikey"):
        return 1.0 / codes
    if variant == "multivalue":
        return 1.0 / math.comb(codes, needles)
    return (1.0 / codes) ** needles


def _replace_along(z: torch.Tensor, u: torch.Tensor, amount: float | torch.Tensor) -> torch.Tensor:
    """z with its component along the unit vector u replaced by `amount` (u, z: (..., D))."""
    return z - (z * u).sum(-1, keepdim=True) * u + amount * u


@dataclass
class _Draws:
    """Every random draw of a haystack; depth and beta only decide where and how strongly the needle is planted."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    u: torch.Tensor  # (b, h, n_q, d) orthonormal query directions
    codebook: torch.Tensor  # (b, h, d, d)
    pick: torch.Tensor  # (b * h, N) priorities for the distractor slots


_DRAWS_CACHE: dict[str, _Draws] = {}


def _draws(point: dict, seed: int) -> _Draws:
    """The random draws, in a fixed order, kept for the last haystack key (a sweep over depth and beta
    redraws nothing: at 128K tokens the draws cost far more than planting a needle). Never mutated."""
    key = json.dumps([haystack_seed(seed, point), {k: point.get(k) for k in HAYSTACK_KEYS}], sort_keys=True)
    if key in _DRAWS_CACHE:
        return _DRAWS_CACHE[key]
    _DRAWS_CACHE.clear()
    b, h, n, d = (int(point[key]) for key in ("batch", "heads", "seq_len", "head_dim"))
    needles = int(point["needles"])
    n_q = n_queries(point["variant"], needles)
    gen = torch.Generator(device="cpu").manual_seed(haystack_seed(seed, point))
    q = torch.randn(b, h, n, d, generator=gen)
    k = torch.randn(b, h, n, d, generator=gen)
    v = torch.randn(b, h, n, d, generator=gen)
    # Query directions: orthonormal, so in multiquery another query's needle looks like haystack.
    u = torch.linalg.qr(torch.randn(b, h, d, n_q, generator=gen)).Q.transpose(-1, -2)
    codebook = torch.linalg.qr(torch.randn(b, h, d, d, generator=gen)).Q.transpose(-1, -2) * math.sqrt(d)
    pick = torch.rand(b * h, n, generator=gen)
    _DRAWS_CACHE[key] = _Draws(q, k, v, u, codebook, pick)
    return _DRAWS_CACHE[key]


def needle_markers(point: dict, seed: int) -> torch.Tensor:
    """(b, h, needles) distinct codebook indices per trial: the needles' (and distractors') markers.

    Drawn per depth (not per beta): a method blind to the needle decodes the same haystack
    marker at every depth, so a marker fixed across depths would make its lucky trials
    lucky at every depth; redrawn, its hits are independent draws at chance level.
    """
    b, h, d, needles = (int(point[key]) for key in ("batch", "heads", "head_dim", "needles"))
    digest = hashlib.sha1(json.dumps([haystack_seed(seed, point), float(point["depth"])]).encode()).hexdigest()
    gen = torch.Generator(device="cpu").manual_seed(int(digest[:8], 16))
    return torch.rand(b, h, d, generator=gen).argsort(dim=-1)[..., :needles]


def make_haystack(point: dict, seed: int) -> Haystack:
    """The point's haystack and its ground truth, on the CPU, in the point's dtype.

    The haystack's draws do not depend on depth or beta, so those two only move and
    scale the needle (its markers are redrawn per depth: `needle_markers`).
    """
    b, h, n, d = (int(point[key]) for key in ("batch", "heads", "seq_len", "head_dim"))
    variant, needles = point["variant"], int(point["needles"])
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from: {', '.join(VARIANTS)}")
    depth, beta, sim = float(point["depth"]), float(point["beta"]), float(point["distractor_sim"])
    n_q = n_queries(variant, needles)
    draws = _draws(point, seed)
    q, k, v = draws.q.clone(), draws.k.clone(), draws.v.clone()
    u, codebook = draws.u, draws.codebook
    markers = needle_markers(point, seed)

    slots = n - n_q
    block = n_block(variant, needles)
    start = needle_block_start(depth, slots, block)
    needle_pos = torch.arange(start, start + block)
    query_pos = torch.arange(slots, n)
    q[:, :, query_pos] = math.sqrt(d) * u
    z_needle = k[:, :, start].clone()  # the needle slot's own random key, before it is replaced

    def code(idx: torch.Tensor) -> torch.Tensor:  # (b, h, m) indices -> (b, h, m, d) marker values
        return torch.gather(codebook, 2, idx.unsqueeze(-1).expand(*idx.shape, d))

    distractor_pos = torch.zeros(b, h, 0, dtype=torch.long)
    distractor_marker = torch.zeros(b, h, 0, dtype=torch.long)
    if variant == "single":
        k[:, :, start] = _replace_along(z_needle, u[:, :, 0], beta)
        v[:, :, start] = code(markers[..., :1])[:, :, 0]
        target_pos, target_marker = needle_pos.view(1, 1), markers[..., :1].unsqueeze(2)
    elif variant == "multikey":
        k[:, :, start] = _replace_along(z_needle, u[:, :, 0], beta)
        v[:, :, start] = code(markers[..., :1])[:, :, 0]
        n_d = needles - 1
        pick = draws.pick.clone()
        pick[:, start] = -1.0  # never on the needle, nor on a query
        pick[:, slots:] = -1.0
        distractor_pos = pick.topk(n_d, dim=-1).indices.view(b, h, n_d)
        distractor_marker = markers[..., 1:]
        gather_idx = distractor_pos.unsqueeze(-1).expand(b, h, n_d, d)
        z_d = torch.gather(k, 2, gather_idx)
        # Close to the needle key: a fraction `sim` of its logit and of its orthogonal noise.
        mixed = sim * z_needle.unsqueeze(2) + math.sqrt(max(0.0, 1 - sim**2)) * z_d
        k.scatter_(2, gather_idx, _replace_along(mixed, u[:, :, :1], sim * beta))
        v.scatter_(2, gather_idx, code(distractor_marker))
        target_pos, target_marker = needle_pos.view(1, 1), markers[..., :1].unsqueeze(2)
    elif variant == "multivalue":
        k[:, :, needle_pos] = _replace_along(z_needle, u[:, :, 0], beta).unsqueeze(2).expand(b, h, needles, d)
        v[:, :, needle_pos] = code(markers)
        target_pos, target_marker = needle_pos.view(1, needles), markers.unsqueeze(2)
    else:  # multiquery
        k[:, :, needle_pos] = _replace_along(k[:, :, needle_pos], u, beta)
        v[:, :, needle_pos] = code(markers)
        target_pos, target_marker = needle_pos.view(needles, 1), markers.unsqueeze(-1)

    dtype = torch_dtype(point["dtype"])
    truth = NeedleTruth(
        variant=variant,
        query_pos=query_pos,
        target_pos=target_pos,
        target_marker=target_marker,
        needle_pos=needle_pos,
        distractor_pos=distractor_pos,
        distractor_marker=distractor_marker,
        codebook=codebook,
    )
    return Haystack(q.to(dtype), k.to(dtype), v.to(dtype), truth)


def marker_scores(out: torch.Tensor, truth: NeedleTruth) -> torch.Tensor:
    """(batch, heads, n_q, C): the output at each query projected on every code of the codebook."""
    rows = out[:, :, truth.query_pos.to(out.device)].float()
    return rows @ truth.codebook.to(out.device).transpose(-1, -2)


def decode_query_hits(out: torch.Tensor, truth: NeedleTruth) -> torch.Tensor:
    """(batch, heads, n_q) bool: each query's target markers are exactly its top-n_t decoded markers.

    Written as "the weakest target beats the strongest non-target", so ties
    (an output of zeros, say) are misses.
    """
    scores = marker_scores(out, truth)
    markers = truth.target_marker.to(out.device)
    weakest = scores.gather(-1, markers).amin(-1)
    others = scores.scatter(-1, markers, float("-inf")).amax(-1)
    return weakest > others


def decode_hits(out: torch.Tensor, truth: NeedleTruth) -> torch.Tensor:
    """(batch, heads) bool: one trial is a hit when every query of it retrieves all its targets."""
    return decode_query_hits(out, truth).all(-1)


def needle_cos(out: torch.Tensor, truth: NeedleTruth) -> torch.Tensor:
    """(batch, heads, n_q, n_t): cos(output at the query, value of each target needle)."""
    rows = out[:, :, truth.query_pos.to(out.device)].float().unsqueeze(3)  # (b, h, n_q, 1, d)
    codebook = truth.codebook.to(out.device)
    markers = truth.target_marker.to(out.device)
    b, h, n_q, n_t = markers.shape
    values = torch.gather(codebook, 2, markers.reshape(b, h, -1, 1).expand(-1, -1, -1, codebook.shape[-1]))
    return torch.nn.functional.cosine_similarity(rows, values.view(b, h, n_q, n_t, -1), dim=-1)


def target_mask(truth: NeedleTruth, n: int) -> torch.Tensor:
    """(n_q, N) bool: the keys each query must retrieve."""
    mask = torch.zeros(truth.n_queries, n, dtype=torch.bool)
    mask.scatter_(1, truth.target_pos, True)
    return mask


def softmax_stats(q: torch.Tensor, k: torch.Tensor, truth: NeedleTruth, causal: bool) -> dict:
    """What exact softmax makes of the cell, from q and k alone: the cell's difficulty.

    needle_mass: attention mass on the query's target(s), summed over targets;
    margin: weakest target logit minus the strongest competing visible logit
    (haystack, distractors, other queries' needles), mean and min over trials.
    """
    n = k.shape[-2]
    qpos = truth.query_pos.to(q.device)
    rows = q[:, :, qpos].float()
    # fp32 products (an fp64 copy of k would cost gigabytes at 128K tokens), fp64 from the logits on.
    logits = ((rows @ k.float().transpose(-1, -2)) * default_scale(q.shape[-1])).double()  # (b, h, n_q, N)
    if causal:
        visible = torch.arange(n, device=q.device).view(1, -1) <= qpos.view(-1, 1)
        logits = logits.masked_fill(~visible, float("-inf"))
    targets = target_mask(truth, n).to(q.device)
    mass = (torch.softmax(logits, dim=-1) * targets).sum(-1)
    weakest = logits.masked_fill(~targets, float("inf")).amin(-1)
    strongest_other = logits.masked_fill(targets, float("-inf")).amax(-1)
    margin = (weakest - strongest_other).amin(-1)  # a trial is as hard as its hardest query
    return {
        "needle_mass": float(mass.mean()),
        "margin": float(margin.mean()),
        "margin_min": float(margin.min()),
    }


def probe_values(truth: NeedleTruth, like: torch.Tensor) -> torch.Tensor:
    """Values that read the method's own attention mass: 1 in channel i at query i's targets, 0 elsewhere."""
    probe = torch.zeros_like(like)
    for i in range(truth.n_queries):
        probe[:, :, truth.target_pos[i].to(like.device), i] = 1.0
    return probe


_HAYSTACK_CACHE: dict[str, Haystack] = {}


def haystack_for(point: dict, seed: int, device: torch.device | str = "cpu") -> Haystack:
    """make_haystack on `device`, kept for the last point: every implementation of a point reuses it."""
    keys = {k: point.get(k) for k in (*HAYSTACK_KEYS, "depth", "beta", "dtype")}
    key = json.dumps([seed, keys, str(device)], sort_keys=True)
    if key not in _HAYSTACK_CACHE:
        _HAYSTACK_CACHE.clear()
        hay = make_haystack(point, seed)
        _HAYSTACK_CACHE[key] = Haystack(*(t.to(device) for t in (hay.q, hay.k, hay.v)), hay.truth.to(device))
    return _HAYSTACK_CACHE[key]


@register_task
class NeedleTask(Task):
    name = "needle"
    description = (
        "needle-in-a-haystack retrieval by the attention op (RULER-style variants), hit rate over context x depth"
    )
    keys = ("depth", "beta", "variant", "needles", "distractor_sim")
    metrics = (
        Metric("accuracy", "fraction", "higher", "drop", "hit rate"),
        Metric("hits", "", None, None, "hits"),
        Metric("trials", "", None, None, "trials"),
        Metric("query_hit_rate", "fraction", "higher", None, "per-query hit rate"),
        Metric("chance", "fraction", None, None, "chance"),
        Metric("needle_cos", "", "higher", None, "cos(output, needle value)"),
        Metric("needle_mass", "fraction", None, None, "softmax mass on the needle"),
        Metric("margin", "", None, None, "needle logit margin (mean)"),
        Metric("margin_min", "", None, None, "needle logit margin (worst)"),
        Metric("method_mass", "fraction", "higher", None, "method's mass on the needle"),
        *FIDELITY_METRICS,
        *TIMED_CALL_METRICS,
        Metric("state_bytes", "bytes", "lower", None, "decode state"),
    )
    headline = "accuracy"
    pareto = ("latency_ms", "accuracy")

    def summary(self, ok: pd.DataFrame) -> list[SummaryColumn]:
        """Hit rate of the single-needle variant at the longest context, pooled over depths; its mean latency."""
        single = ok[ok["variant"].eq("single")] if "variant" in ok.columns else ok
        if single.empty:
            return []
        longest = int(single["seq_len"].max())
        at = single[single["seq_len"].eq(longest)]
        by_impl = [at["method"], at["impl"]]
        rate = at["hits"].groupby(by_impl).sum() / at["trials"].groupby(by_impl).sum()
        latency = at["latency_ms"].groupby(by_impl).mean()
        where = f"{longest} tokens, single needle, mean over depths"
        return [SummaryColumn(self.metric("accuracy"), where, rate),
                SummaryColumn(self.metric("latency_ms"), where, latency, in_table=False)]

    def report_sections(self, rows: pd.DataFrame, out_dir: Path) -> list[Section]:
        table = needle_table(rows)
        if table.empty:
            return []
        text = "Hit rate per context length, pooled over depths; a length without an ok row shows its status."
        return [Section("Needle retrieval (hit rate per context length)", text, table, needle_heatmaps(rows, out_dir))]

    def normalise_point(self, point: dict) -> dict | None:
        point = dict(point)
        point.setdefault("variant", "single")
        point.setdefault("needles", 4)
        point.setdefault("distractor_sim", 0.75)
        point.setdefault("mode", "fwd")
        if point["variant"] not in VARIANTS:
            raise ValueError(f"unknown variant {point['variant']!r}; choose from: {', '.join(VARIANTS)}")
        if point["mode"] != "fwd":
            raise ValueError(f"the needle task measures the forward call only (mode=fwd), got mode={point['mode']}")
        if point["variant"] == "single":
            point["needles"] = 1  # so `single` cells do not differ by a key they ignore
        point["kv_len"] = point["seq_len"]  # self-attention over the whole sequence
        for key in ("batch", "heads", "seq_len", "head_dim", "needles"):
            if int(point[key]) < 1:
                raise ValueError(f"{key} must be >= 1, got {point[key]}")
        if not 0.0 <= float(point["depth"]) <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {point['depth']}")
        if float(point["beta"]) < 0:
            raise ValueError(f"beta must be >= 0, got {point['beta']}")
        if not 0.0 <= float(point["distractor_sim"]) < 1.0:
            raise ValueError(f"distractor_sim must be in [0, 1), got {point['distractor_sim']}")
        needles = int(point["needles"])
        if needles > int(point["head_dim"]):
            raise ValueError(
                f"needles ({needles}) cannot exceed head_dim ({point['head_dim']}): markers are head_dim codes"
            )
        if int(point["seq_len"]) < 2 * needles + 1:
            return None  # too short to hold the needles, the queries and any haystack
        return point

    def prepare_cell(self, cell: Cell, make_attention: AttentionFactory, ctx: RunContext) -> PreparedCell:
        p = dict(cell.point)
        attn = make_attention()
        causal = bool(p["causal"])
        attn.capabilities.check(causal=causal, cross=False, mode="fwd", dtype=p["dtype"])
        attn = attn.to(ctx.device)
        hay = haystack_for(p, cell.seed, ctx.device)
        q, k, v, truth = hay.q, hay.k, hay.v, hay.truth
        n_q = truth.n_queries
        trials = q.shape[0] * q.shape[1]

        with torch.no_grad():
            out = attn(q, k, v, causal=causal)
        check_finite(out)
        row: dict = {}
        # The read rows are the last n_q tokens; the oracle's bottom-right causal alignment keeps them in place.
        reference = oracle_attention(q[:, :, -n_q:], k, v, causal=causal, dtype=torch.float64)
        row["fidelity_max_abs"], row["fidelity_rel"] = fidelity(out[:, :, -n_q:], reference)
        if attn.exact:
            check_exact(row["fidelity_rel"], p["dtype"])
        hits = decode_hits(out, truth)
        row.update(
            accuracy=float(hits.float().mean()),
            hits=int(hits.sum()),
            trials=trials,
            query_hit_rate=float(decode_query_hits(out, truth).float().mean()),
            chance=chance_level(p["variant"], int(p["needles"]), truth.codebook.shape[-2]),
            needle_cos=float(needle_cos(out, truth).mean()),
            needle_pos=int(truth.needle_pos[0]),
            n_queries=n_q,
        )
        row.update(softmax_stats(q, k, truth, causal))
        row.update(self._method_mass(attn, q, k, v, out, truth, causal, p["dtype"]))
        del out

        shape = Shape(p["batch"], p["heads"], p["seq_len"], p["seq_len"], p["head_dim"], causal)
        row["state_bytes"] = attn.state_bytes(p["batch"], p["heads"], p["seq_len"], p["head_dim"], q.dtype)
        fn = torch.no_grad()(lambda: attn(q, k, v, causal=causal))
        return PreparedCell(row, TimedCall(fn, attn.flops(shape, "fwd"), ctx.peak_tflops))

    @staticmethod
    def _method_mass(attn: Attention, q, k, v, out, truth: NeedleTruth, causal: bool, dtype: str) -> dict:
        """The method's own mass on the targets, from a probe call, when the method is linear in v.

        Untimed calls: the probe P = attn(probe) and, for a method that is not exact softmax,
        A = attn(v + probe). A method whose output is a weighted sum of values (weights from q
        and k) has A = out + P; one that normalises its output (lightning's RMSNorm) does not,
        and its probe reads no mass: `method_mass` is None.
        """
        rows = truth.query_pos
        probe = probe_values(truth, v)
        with torch.no_grad():
            probed = attn(q, k, probe, causal=causal)[:, :, rows].float()
        linear = attn.exact  # an exact method is softmax attention: linear in v by definition
        if not linear:
            with torch.no_grad():
                added = attn(q, k, v + probe, causal=causal)[:, :, rows].float()
            expected = out[:, :, rows].float() + probed
            scale = float(expected.abs().max().clamp_min(1e-6))
            error = float((added - expected).abs().max())
            linear = bool(torch.isfinite(added).all()) and error <= LINEARITY_TOL[dtype] * scale
        channels = torch.arange(truth.n_queries, device=probed.device)
        mass = float(probed[:, :, channels, channels].mean()) if linear else None
        return {"method_mass": mass, "linear_in_v": linear}
