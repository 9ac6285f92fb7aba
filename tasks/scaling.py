"""Task `scaling`: the attention op alone across shapes, dtypes, patterns and modes.

Every implementation at a sweep point sees the same inputs (seeded by the
point, not by the implementation) and is held against the same fp64 oracle,
which is computed once per point and reused.
"""

from __future__ import annotations

import hashlib
import json

import pandas as pd
import torch

from bench.measure.checks import TimedCall, check_exact, check_finite
from methods.base import Attention, Shape, computed_pairs_dense
from methods.oracle import fidelity, oracle_attention
from tasks.base import (
    FIDELITY_METRICS,
    SHAPE_KEYS,
    TIMED_CALL_METRICS,
    AttentionFactory,
    Cell,
    Metric,
    PreparedCell,
    RunContext,
    SummaryColumn,
    Task,
    torch_dtype,
)
from tasks.registry import register_task

INPUT_DISTS = ("gaussian", "peaked")
ORACLE_BLOCK_BYTES = 512 * 2**20  # bound on one oracle score block, so fidelity fits at long context


def point_seed(seed: int, point: dict, salt: str = "") -> int:
    """Same point, same inputs, whichever implementation asks."""
    shape_keys = {k: point.get(k) for k in ("dtype", "batch", "heads", "seq_len", "kv_len", "head_dim")}
    shape_keys["input_dist"] = point.get("input_dist", "gaussian")
    digest = hashlib.sha1(json.dumps([seed, shape_keys, salt], sort_keys=True).encode()).hexdigest()
    return int(digest[:8], 16)


def make_qkv(point: dict, seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v for the point; `peaked` sharpens q so rows are low-entropy, as in trained models."""
    gen = torch.Generator(device="cpu").manual_seed(point_seed(seed, point))
    dtype = torch_dtype(point["dtype"])
    n_q = 1 if point["mode"] == "decode" else point["seq_len"]
    b, h, d, n_k = point["batch"], point["heads"], point["head_dim"], point["kv_len"]
    q = torch.randn(b, h, n_q, d, generator=gen)
    k = torch.randn(b, h, n_k, d, generator=gen)
    v = torch.randn(b, h, n_k, d, generator=gen)
    dist = point.get("input_dist", "gaussian")
    if dist == "peaked":
        q = q * 4.0
    elif dist != "gaussian":
        raise ValueError(f"unknown input_dist {dist!r}; choose from: {', '.join(INPUT_DISTS)}")
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


_ORACLE_CACHE: dict[str, torch.Tensor] = {}


def oracle_for(point: dict, seed: int, q, k, v, causal: bool) -> torch.Tensor:
    """fp64 oracle output, kept for the last point: every implementation of a point reuses it."""
    key = json.dumps([point_seed(seed, point), causal, str(q.device)])
    if key not in _ORACLE_CACHE:
        _ORACLE_CACHE.clear()
        per_row = max(1, q.shape[0] * q.shape[1] * k.shape[-2] * 8)
        block_q = max(1, min(q.shape[-2], ORACLE_BLOCK_BYTES // per_row))
        _ORACLE_CACHE[key] = oracle_attention(q, k, v, causal=causal, dtype=torch.float64, block_q=block_q)
    return _ORACLE_CACHE[key]


STATE_BYTES = Metric("state_bytes", "bytes", "lower", None, "decode state")
SPARSITY = Metric("sparsity", "fraction", None, None, "sparsity (1 - computed/dense pairs)")
# The point the summary table reports a method at: the shape columns plus the input distribution.
POINT_COLUMNS = (*SHAPE_KEYS, "input_dist")


def reference_point(ok: pd.DataFrame) -> dict | None:
    """The forward point most implementations were measured at (the longest context among ties), preferring
    self-attention and gaussian inputs.

    One stated shape for the whole column, so the summary compares like with like; causal
    and non-causal count as one point here (each gets its own latency column).
    """
    rows = ok[ok["latency_ms"].notna()]
    for preferred in (rows["seq_len"].eq(rows["kv_len"]), rows.get("input_dist", pd.Series(dtype=object)).eq("gaussian")):
        if preferred.any():  # self-attention and gaussian inputs, where measured: the shape most users ask about
            rows = rows[preferred.reindex(rows.index, fill_value=False)]
    if rows.empty:
        return None
    shape = [c for c in POINT_COLUMNS if c != "causal" and c in rows.columns]
    labels = rows["method"].astype(str) + "/" + rows["impl"].astype(str)
    coverage = labels.groupby([rows[c].astype(str) for c in shape]).nunique().rename("n").reset_index()
    coverage["is_fwd"] = coverage["mode"].eq("fwd")
    coverage["kv"] = pd.to_numeric(coverage["kv_len"])
    best = coverage.sort_values(["is_fwd", "n", "kv"], ascending=False, kind="stable").iloc[0]
    return {c: best[c] for c in shape}


def point_text(point: dict, causal: bool | None = None) -> str:
    """'fwd causal float32 N=1024 B×H×D=1×8×64': the reference point as a column header says it."""
    pattern = "" if causal is None else ("causal " if causal else "non-causal ")
    seq = f"N={point['kv_len']}" if point["seq_len"] == point["kv_len"] else f"q={point['seq_len']} kv={point['kv_len']}"
    return f"{point['mode']} {pattern}{point['dtype']} {seq} B×H×D={point['batch']}×{point['heads']}×{point['head_dim']}"


@register_task
class ScalingTask(Task):
    name = "scaling"
    description = "latency, memory, TFLOP/s and fidelity of the attention op (fwd, bwd, fwd_bwd, decode)"
    keys = ("input_dist", "tokens")  # tokens: a token budget that normalise_point turns into batch
    metrics = (*TIMED_CALL_METRICS, *FIDELITY_METRICS, STATE_BYTES, SPARSITY)
    headline = "latency_ms"
    pareto = ("latency_ms", "fidelity_rel")
    plots_vs_context = True

    def summary(self, ok: pd.DataFrame) -> list[SummaryColumn]:
        """Latency (causal and non-causal), peak memory and fidelity at one reference point (`reference_point`)."""
        point = reference_point(ok)
        if point is None:
            return []
        at = ok
        for col, value in point.items():
            at = at[at[col].astype(str) == value]
        columns = []
        by_impl = [at["method"], at["impl"]]
        for causal in (False, True):
            rows = at[at["causal"].eq(causal)]
            if not rows.empty:
                latency = rows["latency_ms"].groupby([rows["method"], rows["impl"]]).median()
                columns.append(SummaryColumn(self.metric("latency_ms"), point_text(point, causal), latency))
        for name in ("peak_mem_bytes", "fidelity_rel"):
            values = pd.to_numeric(at[name], errors="coerce").groupby(by_impl).median().dropna()
            if not values.empty:
                columns.append(SummaryColumn(self.metric(name), point_text(point), values))
        return columns

    def normalise_point(self, point: dict) -> dict | None:
        point = dict(point)
        point.setdefault("input_dist", "gaussian")
        tokens = point.pop("tokens", None)
        if tokens:  # a fixed token budget per batch, as FlashAttention's benchmarks use (16k)
            point["batch"] = max(1, int(tokens) // int(point["seq_len"]))
        if point.get("kv_len") in (None, "same"):
            point["kv_len"] = point["seq_len"]
        if point["mode"] == "decode":
            # Decode is one new token against a cache of the context: seq_len 1, kv_len = context.
            point["seq_len"] = 1
            point["causal"] = True
        for key in ("batch", "heads", "seq_len", "kv_len", "head_dim"):
            if int(point[key]) < 1:
                raise ValueError(f"{key} must be >= 1, got {point[key]}")
        return point

    def interleaves(self, cell: Cell) -> bool:
        """Not `bwd`: its closure holds the autograd graph, and a point's implementations would hold theirs at once."""
        return cell.point.get("mode") != "bwd"

    def prepare_cell(self, cell: Cell, make_attention: AttentionFactory, ctx: RunContext) -> PreparedCell:
        p = dict(cell.point)
        attn = make_attention()
        mode, causal = p["mode"], bool(p["causal"])
        cross = mode != "decode" and p["seq_len"] != p["kv_len"]  # decode is its own capability
        attn.capabilities.check(causal=causal, cross=cross, mode=mode, dtype=p["dtype"])
        attn = attn.to(ctx.device)
        q, k, v = make_qkv(p, cell.seed, ctx.device)
        shape = Shape(p["batch"], p["heads"], p["seq_len"], p["kv_len"], p["head_dim"], causal)
        row: dict = {"input_dist": p["input_dist"]}

        # Correctness first, on the very inputs that are timed.
        with torch.no_grad():
            out = attn.decode(q, k, v) if mode == "decode" else attn(q, k, v, causal=causal)
        row["sparsity"] = 1.0 - attn.computed_pairs(shape.seq_len, shape.kv_len, causal) / max(
            1, computed_pairs_dense(shape.seq_len, shape.kv_len, causal)
        )
        check_finite(out)
        reference = oracle_for(p, cell.seed, q, k, v, causal)
        row["fidelity_max_abs"], row["fidelity_rel"] = fidelity(out, reference)
        if attn.exact:
            check_exact(row["fidelity_rel"], p["dtype"])
        del out

        row["state_bytes"] = attn.state_bytes(p["batch"], p["heads"], p["kv_len"], p["head_dim"], q.dtype)
        fn = self._call(attn, mode, causal, q, k, v)
        return PreparedCell(row, TimedCall(fn, attn.flops(shape, mode), ctx.peak_tflops))

    @staticmethod
    def _call(attn: Attention, mode: str, causal: bool, q, k, v):
        """The closure that is timed: exactly the work the mode names, nothing set up inside it."""
        if mode == "decode":
            # The context is prefilled outside the timed call; the timed work is one token's step.
            with torch.no_grad():
                state = attn.prefill(k[:, :, :-1], v[:, :, :-1])
            k_new, v_new = k[:, :, -1:], v[:, :, -1:]
            return torch.no_grad()(lambda: attn.decode_step(q, k_new, v_new, state)[0])
        if mode == "fwd":
            return torch.no_grad()(lambda: attn(q, k, v, causal=causal))
        # allow_unused: an output may ignore an input (the `identity` baseline never reads q or k).
        inputs = q, k, v = tuple(t.detach().requires_grad_(True) for t in (q, k, v))
        grad_out = torch.randn_like(q[..., : v.shape[-1]])
        if mode == "fwd_bwd":

            def fwd_bwd():
                out = attn(q, k, v, causal=causal)
                return torch.autograd.grad(out, inputs, grad_out, allow_unused=True)

            return fwd_bwd
        out = attn(q, k, v, causal=causal)  # mode == "bwd": the graph is built once, outside the timed call
        return lambda: torch.autograd.grad(out, inputs, grad_out, retain_graph=True, allow_unused=True)
