"""Task `needle`: exact softmax finds every needle, a blind method does not, and the haystack is what it claims."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from bench.measure.hardware import HardwareProfile
from bench.measure.timing import TimingConfig
from bench.results import load
from bench.sweep import RunSettings, run_cells
from methods import Unsupported, build
from methods.base import Attention, Capabilities
from methods.oracle import oracle_attention
from tasks.base import Cell, RunContext
from tasks.needle import (
    VARIANTS,
    NeedleTask,
    chance_level,
    decode_hits,
    make_haystack,
    softmax_stats,
)
from tasks.needle_views import needle_heatmaps, needle_table

CONF = Path(__file__).resolve().parent.parent / "conf" / "task" / "needle.yaml"
DEFAULTS = {k: v for k, v in OmegaConf.to_container(OmegaConf.load(CONF)).items() if k != "name"}
BETA = float(DEFAULTS["beta"])
SMOKE_LENGTHS = (256, 512, 1024, 2048)
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
EXACT_IMPLS = ("reference", "sdpa", "sdpa_math")
TASK = NeedleTask()
FAST = TimingConfig(warmup=0, min_time_s=0.0, min_repeats=1, max_repeats=1)
CTX = RunContext(device=torch.device("cpu"), timing=FAST, measure_memory=False)
# Small trials so the file stays fast; head_dim 32 has fewer codes (more decoding noise) than the default 64.
SMALL = dict(batch=1, heads=8, head_dim=32)


def point(**overrides) -> dict:
    p = TASK.normalise_point({**DEFAULTS, **SMALL, **overrides})
    assert p is not None
    return p


def run(attn: Attention, seed: int = 0, **overrides) -> dict:
    p = point(**overrides)
    return TASK.run_cell(Cell(attn.method or "test", attn.impl or "test", "needle", "cpu", p, seed=seed), lambda: attn, CTX)


class SlidingWindow(Attention):
    """Softmax over the last `window` keys only (query included): blind to anything further back."""

    method, impl, exact = "window_test", "reference", False
    capabilities = Capabilities(decode=False)

    def __init__(self, window: int) -> None:
        super().__init__()
        self.window = window

    def forward(self, q, k, v, causal=False):
        offset = k.shape[-2] - q.shape[-2]

        def in_window(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx + offset) & (kv_idx > q_idx + offset - self.window)

        return oracle_attention(q, k, v, mask_mod=in_window, dtype=q.dtype)


class NormalisedOutput(Attention):
    """Softmax followed by an RMSNorm over the head dim (as lightning's output norm): not linear in v."""

    method, impl, exact = "normalised_test", "reference", False

    def forward(self, q, k, v, causal=False):
        out = oracle_attention(q, k, v, causal=causal, dtype=q.dtype)
        return out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + 1e-6)


class CausalOnly(Attention):
    method, impl = "causal_only", "reference"
    capabilities = Capabilities(non_causal=False, note="test double")

    def forward(self, q, k, v, causal=False):
        return q


# --- (a) exact softmax finds every needle at the default beta ---------------------------------


def hit_rate(attn: Attention, p: dict, seed: int = 0) -> float:
    """The task's metric on one call, without the timing and probe calls `run_cell` adds."""
    hay = make_haystack(p, seed)
    with torch.no_grad():
        out = attn(hay.q, hay.k, hay.v, causal=bool(p["causal"]))
    return float(decode_hits(out, hay.truth).float().mean())


@pytest.mark.parametrize("variant", VARIANTS)
def test_exact_softmax_finds_every_needle_on_the_smoke_grid(variant):
    """sdpa through the whole task (row columns included) on the whole grid; reference and sdpa_math,
    which materialise N x N scores, on its corners (the whole grid for them: the slow test below)."""
    sdpa = build("softmax", impl="sdpa")
    others = {name: build("softmax", impl=name) for name in EXACT_IMPLS if name != "sdpa"}
    for n in SMOKE_LENGTHS:
        for depth in DEPTHS:
            where = f"{variant} N={n} depth={depth}"
            row = run(sdpa, seq_len=n, depth=depth, variant=variant)
            assert row["accuracy"] == 1.0, where
            assert row["hits"] == row["trials"] == 8, where
            assert row["margin_min"] > 0, where  # the needle out-scores every competitor
            # The probe reads the method's own mass; for exact softmax it is the analytic one.
            assert row["method_mass"] == pytest.approx(row["needle_mass"], rel=1e-3, abs=1e-6), where
            assert row["fidelity_rel"] < 1e-4, where
            assert row["latency_ms"] > 0 and row["flops"] > 0, where
            if n in (SMOKE_LENGTHS[0], SMOKE_LENGTHS[-1]) and depth in (0.0, 0.5, 1.0):
                for name, attn in others.items():
                    assert hit_rate(attn, point(seq_len=n, depth=depth, variant=variant, heads=2)) == 1.0, name


@pytest.mark.slow
@pytest.mark.parametrize("impl", EXACT_IMPLS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_exact_impl_finds_every_needle_on_the_whole_smoke_grid(variant, impl):
    attn = build("softmax", impl=impl)
    for n in SMOKE_LENGTHS:
        for depth in DEPTHS:
            for causal in (True, False):
                assert hit_rate(attn, point(seq_len=n, depth=depth, variant=variant, causal=causal)) == 1.0


def test_causal_and_non_causal_agree_on_the_last_query():
    attn = build("softmax", impl="sdpa")
    for variant in ("single", "multiquery"):
        for causal in (True, False):
            row = run(attn, seq_len=512, depth=0.5, variant=variant, causal=causal)
            assert row["accuracy"] == 1.0, (variant, causal)


# --- (b) hit rate falls to chance as the signal vanishes ----------------------------------------


def test_hit_rate_falls_towards_chance_as_beta_shrinks():
    attn = build("softmax", impl="sdpa")
    accuracy = {}
    for beta in (BETA, 4.0, 3.0, 2.0, 0.0):
        rates = [hit_rate(attn, point(seq_len=1024, depth=d, beta=beta, batch=4, heads=16)) for d in DEPTHS]
        accuracy[beta] = sum(rates) / len(rates)
    betas = sorted(accuracy, reverse=True)
    assert accuracy[BETA] == 1.0
    assert all(accuracy[a] >= accuracy[b] for a, b in zip(betas, betas[1:], strict=False)), accuracy
    chance = chance_level("single", 1, SMALL["head_dim"])
    assert accuracy[0.0] < 0.15 and accuracy[0.0] < 5 * chance + 0.1, accuracy
    assert accuracy[2.0] < 0.5, accuracy


# --- (c) a method that cannot see the needle misses it ------------------------------------------


def test_sliding_window_hits_inside_its_window_and_misses_outside():
    n, window = 512, 64
    attn = SlidingWindow(window)
    slots = n - 1  # the query is the last token
    # The oldest key the window sees is n - window; depth puts the needle at round(depth * (slots - 1)).
    inside = (n - window) / (slots - 1)
    outside = (n - window - 1) / (slots - 1)
    for depth in (1.0, inside):
        row = run(attn, seq_len=n, depth=depth, heads=16)
        assert row["accuracy"] == 1.0, depth
        assert row["method_mass"] > row["needle_mass"] > 0, depth  # fewer competitors in the window
    for depth in (0.0, outside):
        row = run(attn, seq_len=n, depth=depth, heads=16)
        assert row["needle_pos"] < n - window
        assert row["method_mass"] == 0.0, depth
        assert row["accuracy"] <= 0.25, depth  # chance is 1/32
        assert row["needle_mass"] > 0.1  # exact softmax would have found it: the cell was easy


def test_method_mass_is_read_only_from_methods_linear_in_v():
    row = run(NormalisedOutput(), seq_len=256)
    assert row["accuracy"] == 1.0  # the norm keeps the direction the decoder reads
    assert row["method_mass"] is None and row["linear_in_v"] is False
    assert run(SlidingWindow(64), seq_len=256)["linear_in_v"] is True


def test_capabilities_are_checked_before_running():
    with pytest.raises(Unsupported, match="non-causal"):
        run(CausalOnly(), seq_len=256, causal=False)


# --- (d) seeding ---------------------------------------------------------------------------------

METRICS = (
    "accuracy",
    "hits",
    "trials",
    "needle_cos",
    "needle_mass",
    "method_mass",
    "margin",
    "margin_min",
    "needle_pos",
)


def test_same_seed_same_rows_other_seed_other_haystack():
    attn = build("softmax", impl="sdpa")
    for variant in VARIANTS:
        a = run(attn, seed=0, seq_len=256, variant=variant, beta=4.0)
        b = run(attn, seed=0, seq_len=256, variant=variant, beta=4.0)
        assert {m: a[m] for m in METRICS} == {m: b[m] for m in METRICS}
        c = run(attn, seed=1, seq_len=256, variant=variant, beta=4.0)
        assert (a["needle_mass"], a["margin"]) != (c["needle_mass"], c["margin"])
    p = point(seq_len=256)
    h0, h0_again, h1 = make_haystack(p, 0), make_haystack(dict(p), 0), make_haystack(p, 1)
    for name in ("q", "k", "v"):
        assert torch.equal(getattr(h0, name), getattr(h0_again, name))
        assert not torch.equal(getattr(h0, name), getattr(h1, name))


def test_depth_and_beta_move_the_needle_not_the_haystack():
    base = make_haystack(point(seq_len=256, depth=0.0, variant="multikey"), 0)
    other = make_haystack(point(seq_len=256, depth=1.0, beta=2.0, variant="multikey"), 0)
    planted = torch.zeros(256, dtype=torch.bool)
    for hay in (base, other):
        planted[hay.truth.needle_pos] = True
        planted[hay.truth.distractor_pos.flatten()] = True
    assert torch.equal(base.q, other.q)
    assert torch.equal(base.k[:, :, ~planted], other.k[:, :, ~planted])
    assert torch.equal(base.v[:, :, ~planted], other.v[:, :, ~planted])


# --- (e) generator invariants --------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("causal", [True, False])
def test_haystack_puts_each_needle_where_it_says(variant, causal):
    n, d, beta, sim, needles = 300, 32, 7.0, 0.75, 4
    for depth in DEPTHS:
        p = point(seq_len=n, head_dim=d, batch=2, heads=3, depth=depth, beta=beta, variant=variant, causal=causal)
        hay = make_haystack(p, 0)
        truth = hay.truth
        n_q = needles if variant == "multiquery" else 1
        block = needles if variant in ("multivalue", "multiquery") else 1
        assert hay.q.shape == hay.k.shape == hay.v.shape == (2, 3, n, d)
        assert hay.q.dtype == torch.float32
        assert truth.query_pos.tolist() == list(range(n - n_q, n))  # the queries are the last tokens
        slots = n - n_q
        start = math.floor(depth * (slots - block) + 0.5)
        assert truth.needle_pos.tolist() == list(range(start, start + block))
        if depth == 0.0:
            assert start == 0
        if depth == 1.0:
            assert start + block == slots  # the last needle is the token just before the (first) query
        # Logits: every target scores exactly beta against its query (scale 1/sqrt(d)).
        rows = hay.q[:, :, truth.query_pos] / math.sqrt(d)
        for i in range(n_q):
            for pos in truth.target_pos[i].tolist():
                logit = (rows[:, :, i] * hay.k[:, :, pos]).sum(-1)
                assert torch.allclose(logit, torch.full_like(logit, beta), atol=1e-4)
        # The query's norm is that of a typical random query.
        assert torch.allclose(rows.norm(dim=-1) * math.sqrt(d), torch.full((2, 3, n_q), float(d)).sqrt(), atol=1e-4)
        # Values at the targets are their markers; markers are distinct within a trial.
        codebook = truth.codebook
        assert torch.allclose(codebook @ codebook.transpose(-1, -2), d * torch.eye(d).expand(2, 3, d, d), atol=1e-3)
        for i in range(n_q):
            for j, pos in enumerate(truth.target_pos[i].tolist()):
                marker = truth.target_marker[:, :, i, j]
                expected = torch.gather(codebook, 2, marker.view(2, 3, 1, 1).expand(2, 3, 1, d))[:, :, 0]
                assert torch.allclose(hay.v[:, :, pos], expected)
        all_markers = torch.cat([truth.target_marker.flatten(2), truth.distractor_marker], dim=-1)
        assert all(len(set(m.tolist())) == m.numel() for m in all_markers.flatten(0, 1))
        if variant == "multikey":
            assert truth.distractor_pos.shape == (2, 3, needles - 1)
            for pos in truth.distractor_pos.flatten(0, 1):
                pos = set(pos.tolist())
                assert len(pos) == needles - 1 and not pos & {start} and max(pos) < slots
            gathered = torch.gather(hay.k, 2, truth.distractor_pos.unsqueeze(-1).expand(2, 3, needles - 1, d))
            logits = (gathered * rows[:, :, :1]).sum(-1)
            assert torch.allclose(logits, torch.full_like(logits, sim * beta), atol=1e-4)
        else:
            assert truth.distractor_pos.numel() == 0
        # The ground truth decodes itself: an output equal to the target values is a hit.
        out = torch.zeros(2, 3, n, d)
        for i in range(n_q):
            out[:, :, truth.query_pos[i]] = hay.v[:, :, truth.target_pos[i]].sum(2)
        assert decode_hits(out, truth).all()
        assert not decode_hits(torch.zeros_like(out), truth).any()  # ties are misses
        stats = softmax_stats(hay.q, hay.k, truth, causal)
        assert 0 < stats["needle_mass"] < 1 and stats["margin_min"] <= stats["margin"]


def test_normalise_point_validates_and_fills():
    p = TASK.normalise_point({**DEFAULTS, "variant": "single", "needles": 4})
    assert p["needles"] == 1 and p["kv_len"] == p["seq_len"]
    with pytest.raises(ValueError, match="variant"):
        TASK.normalise_point({**DEFAULTS, "variant": "nope"})
    with pytest.raises(ValueError, match="mode=fwd"):
        TASK.normalise_point({**DEFAULTS, "mode": "decode"})
    with pytest.raises(ValueError, match="depth"):
        TASK.normalise_point({**DEFAULTS, "depth": 1.5})
    assert TASK.normalise_point({**DEFAULTS, "seq_len": 8, "variant": "multiquery"}) is None
    assert len(TASK.points(DEFAULTS, {"depth": list(DEPTHS), "variant": list(VARIANTS)})) == 20


def test_float16_haystack_runs():
    row = run(build("softmax", impl="sdpa"), seq_len=512, dtype="float16")
    assert row["accuracy"] == 1.0


# --- (f) report, through the runner and the results store ----------------------------------------


def test_rows_through_the_runner_feed_heatmaps_and_table(tmp_path, monkeypatch):
    from tasks import TASKS

    monkeypatch.setitem(TASKS, "needle", TASK)  # registration in tasks/__init__.py is the lead's
    profile = HardwareProfile("cpu", "cpu", "test cpu", {"float32": 1.0}, None, None, True, "test")
    settings = RunSettings(tmp_path / "rows", "run1", torch.device("cpu"), profile, FAST, measure_memory=False)
    lengths, depths = (256, 512), (0.0, 1.0)
    cells = [
        Cell("softmax", impl, "needle", "cpu", point(seq_len=n, depth=d, variant=v, heads=4))
        for n in lengths
        for d in depths
        for v in ("single", "multikey")
        for impl in ("sdpa", "flash_attn")  # flash_attn: an `unsupported` row on a CPU
    ]
    rows = run_cells(cells, settings, log=lambda *_: None)
    assert {r["status"] for r in rows} == {"ok", "unsupported"}
    df = load(tmp_path / "rows")
    ok = df[df["status"] == "ok"]
    assert (ok["accuracy"] == 1.0).all() and ok["needle_mass"].notna().all()
    assert set(ok["depth"]) == set(depths) and set(ok["variant"]) == {"single", "multikey"}

    paths = needle_heatmaps(df, tmp_path / "report")
    assert len(paths) == 2  # sdpa x single and multikey; flash_attn measured nothing, so no figure
    assert all(p.suffix == ".png" and p.stat().st_size > 1000 for p in paths)

    table = needle_table(df)
    assert list(table.columns) == ["method", "impl", "variant", "256", "512"]  # then one column per length
    records = table.values.tolist()
    assert ["softmax", "sdpa", "single", "1.00", "1.00"] in records
    assert ["softmax", "flash_attn", "single", "unsupported", "unsupported"] in records


def test_report_splits_settings_that_vary(tmp_path):
    def row(beta, n, depth, rate, status="ok"):
        hits = None if rate is None else int(rate * 8)
        return dict(task="needle", method="m", impl="i", variant="single", beta=beta, seq_len=n, depth=depth,
                    status=status, accuracy=rate, hits=hits, trials=8)  # fmt: skip

    rows = [row(beta, n, d, rate) for beta, rate in ((8.0, 1.0), (1.0, 0.25)) for n in (1024, 4096) for d in (0.0, 1.0)]
    rows += [row(8.0, 16384, d, None, "oom") for d in (0.0, 1.0)]
    df = pd.DataFrame(rows)
    table = needle_table(df)
    assert list(table.columns) == ["method", "impl", "variant", "beta", "1K", "4K", "16K"]
    assert ["m", "i", "single", "1.0", "0.25", "0.25", ""] in table.values.tolist()
    assert ["m", "i", "single", "8.0", "1.00", "1.00", "oom"] in table.values.tolist()
    paths = needle_heatmaps(df, tmp_path)
    assert sorted(p.name for p in paths) == ["needle_m_i_single_beta=1.0.png", "needle_m_i_single_beta=8.0.png"]
    assert needle_heatmaps(df.iloc[:0], tmp_path / "none") == []
