"""Log-log slopes recover known exponents from synthetic latencies, and pick only the rows that should count."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from bench.report.slopes import fit_loglog_slope, scaling_slopes

LENGTHS = [256, 512, 1024, 2048, 4096, 8192, 16384]


@pytest.mark.parametrize("exponent", [0.0, 1.0, 2.0])
def test_exact_power_laws(exponent):
    lat = [3e-4 * n**exponent for n in LENGTHS]
    assert fit_loglog_slope(LENGTHS, lat) == pytest.approx(exponent, abs=1e-9)


@pytest.mark.parametrize("exponent", [1.0, 2.0])
def test_noisy_power_laws_within_005(exponent):
    rng = np.random.default_rng(0)
    for _ in range(20):
        noise = rng.lognormal(0.0, 0.05, size=len(LENGTHS))  # ~5% multiplicative timing noise
        lat = [2e-3 * n**exponent * e for n, e in zip(LENGTHS, noise, strict=True)]
        assert abs(fit_loglog_slope(LENGTHS, lat) - exponent) < 0.05


def test_fixed_overhead_bends_the_curve():
    """a + b N: short lengths look flat, long ones linear. Why the default range starts at 1024."""
    lat = [5.0 + 1e-3 * n for n in LENGTHS]
    assert fit_loglog_slope(LENGTHS[:3], lat[:3]) < 0.2
    assert fit_loglog_slope(LENGTHS[-2:], lat[-2:]) > 0.6


@pytest.mark.parametrize(
    "x,y,match",
    [([1024], [1.0], "two distinct"), ([1024, 1024], [1.0, 2.0], "two distinct"), ([0, 10], [1, 2], "> 0"),
     ([10, 20], [1, -2], "> 0"), ([10, 20], [1], "equally long")],
)  # fmt: skip
def test_bad_input_raises(x, y, match):
    with pytest.raises(ValueError, match=match):
        fit_loglog_slope(x, y)


def _rows(method, impl, exponent, causal=False, mode="fwd", dtype="float32", head_dim=64, **extra):
    return [
        dict(task="scaling", method=method, impl=impl, causal=causal, mode=mode, dtype=dtype, batch=1, heads=8,
             head_dim=head_dim, seq_len=1 if mode == "decode" else n, kv_len=n, status="ok", interpreted=False,
             latency_ms=1e-4 * n**exponent, **extra)
        for n in LENGTHS
    ]  # fmt: skip


def test_scaling_slopes_per_curve():
    rows = (
        _rows("linear", "reference", 1.0)
        + _rows("softmax", "sdpa", 2.0)
        + _rows("softmax", "sdpa", 2.0, head_dim=128)  # its own curve, not mixed with head_dim 64
        + _rows("linear", "reference", 0.0, mode="decode", causal=True)
        + _rows("softmax", "sdpa", 1.0, mode="decode", causal=True)
    )
    # Rows that must not count: a failed cell, an interpreted kernel, another task.
    rows.append({**rows[4], "status": "error", "latency_ms": 1e6})
    rows += [{**r, "interpreted": True} for r in _rows("linear", "kernel", 3.0)]
    rows.append({**rows[5], "task": "needle", "latency_ms": 1e-9})
    out = scaling_slopes(pd.DataFrame(rows))
    assert len(out) == 5
    got = {(r.method, r.impl, r.mode, r.head_dim): r.slope for r in out.itertuples()}
    assert got[("linear", "reference", "fwd", 64)] == pytest.approx(1.0)
    assert got[("softmax", "sdpa", "fwd", 64)] == pytest.approx(2.0)
    assert got[("softmax", "sdpa", "fwd", 128)] == pytest.approx(2.0)
    assert got[("linear", "reference", "decode", 64)] == pytest.approx(0.0, abs=1e-9)
    assert got[("softmax", "sdpa", "decode", 64)] == pytest.approx(1.0)
    # Default range: lengths >= 1024 only.
    assert set(out["min_kv_len"]) == {1024} and set(out["max_kv_len"]) == {16384}
    assert set(out["n_lengths"]) == {5}
    assert set(out["pattern"]) == {"non-causal", "causal"}


def test_range_patterns_and_too_few_lengths():
    rows = _rows("linear", "reference", 1.0, causal=True)
    for r in rows:
        r["latency_ms"] = 5.0 + 1e-3 * r["kv_len"]  # a fixed overhead: the range changes the fit
    cross = [{**r, "seq_len": r["kv_len"] // 2} for r in _rows("linear", "reference", 1.0)]
    df = pd.DataFrame(rows + cross)
    short = scaling_slopes(df, min_len=256, max_len=1024)
    long = scaling_slopes(df, min_len=8192)
    causal_short = short[short["pattern"] == "causal"]["slope"].item()
    causal_long = long[long["pattern"] == "causal"]["slope"].item()
    assert causal_short < 0.3 < 0.6 < causal_long
    assert set(short["pattern"]) == {"causal", "non-causal-cross"}
    one = scaling_slopes(df, min_len=16384)
    assert set(one["n_lengths"]) == {1} and all(math.isnan(s) for s in one["slope"])
    assert scaling_slopes(df, min_len=10**6).empty
    assert scaling_slopes(pd.DataFrame()).empty


def test_curves_split_by_every_declared_key():
    """A key the rows declare (here a task's own `knob`) names a curve: one fit per value, never one through both."""
    keys = ["dtype", "batch", "heads", "seq_len", "kv_len", "head_dim", "causal", "mode", "knob", "method_params"]
    rows = [{**r, "knob": knob, "keys": keys, "method_params": "{}"}
            for knob, exponent in ((1, 1.0), (2, 2.0)) for r in _rows("m", "reference", exponent)]  # fmt: skip
    out = scaling_slopes(pd.DataFrame(rows))
    assert dict(zip(out["knob"], out["slope"].round(6), strict=True)) == {1: 1.0, 2: 2.0}
