"""Which rows were timed on a disturbed machine, and which of their values that touches: one rule for all readers.

Why one module: compare (which must not judge a disturbed latency) and the report (which must mark
it) have to agree on what "disturbed" means, or a cell compare refused to judge could sit unmarked
in the leaderboard. It imports nothing from `bench`, so `bench.compare` and `bench.report` can both
import it without a cycle.

The runner's interference probe (issue 14) writes, for every row that timed a call:
- `noisy` (bool): the probe found the machine disturbed during the timing even after re-measuring;
- `probe_slowdown` (float): the probe's slowdown over its idle figure for the attempt kept;
- `runqueue_wait` (float, CPU rows): the share of the timed threads' runnable time spent waiting
  for a core (another process had it), for the attempt kept;
- `throttled` (bool, GPU rows, may be absent): NVML saw power or thermal clock throttling;
- `latency_cv` (float): the samples' coefficient of variation (informational, judges nothing).

A row is *disturbed* when `noisy` or `throttled` is true. Rows written before the probe lack the
columns; missing, None and NaN all read as "not disturbed", so old results behave as they did.
Only timing is disturbed by load: latency, its spread, throughput, % of peak and other declared
time or per-second metrics. Memory, accuracy, fidelity and status are measured without the clock
and stay trustworthy.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

import pandas as pd

MARK = "†"  # after a value (or a plotted point) that rests on a disturbed row's timing
LABEL = "disturbed (noisy)"  # the legend entry of a plot's disturbed points
FLAGS = ("noisy", "throttled")  # either true: the row's timing is not to be trusted
SLOWDOWN = "probe_slowdown"
WAIT = "runqueue_wait"
# Core columns of every timed row that are computed from its latency (bench.measure.checks.measure_call).
TIMING_COLUMNS = ("latency_ms", "latency_ms_p10", "latency_ms_p90", "tflops", "pct_peak")
TIME_UNITS = ("ns", "us", "µs", "ms", "s", "seconds", "min", "h")


def flag(value: object) -> bool:
    """A probe flag as a plain bool: only a real true value counts; None, NaN, pd.NA and absence are False."""
    if value is None or value is pd.NA:
        return False
    if isinstance(value, float) and math.isnan(value):
        return False
    if isinstance(value, str):  # a flag that went through text (a CSV, a JSON round trip)
        return value.strip().lower() in ("true", "1", "yes")
    try:
        return bool(value)
    except (TypeError, ValueError):  # an array or something else that is not a flag
        return False


def is_disturbed(row: Mapping) -> bool:
    """Whether one row (a dict or a pandas Series) was timed on a disturbed machine: noisy or throttled."""
    return any(flag(row.get(name)) for name in FLAGS)


def disturbed_mask(df: pd.DataFrame) -> pd.Series:
    """`is_disturbed` for every row of a frame (all False when it has neither column)."""
    mask = pd.Series(False, index=df.index)
    for name in FLAGS:
        if name in df.columns:
            mask |= df[name].map(flag).astype(bool)
    return mask


def _number(value: object) -> float | None:
    real = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if real else None


def describe(row: Mapping) -> str:
    """What disturbed a row, for a reader: 'probe 3.1x slower than idle', 'GPU clocks throttled', or both.

    A noisy CPU row adds its run-queue wait ('..., threads waited 41% of the time for a core'), which
    can flag a row whose probe read quiet. An empty string for an undisturbed row; 'flagged noisy'
    when the row says noisy with neither figure.
    """
    bits = []
    if flag(row.get("noisy")):
        slowdown, wait = _number(row.get(SLOWDOWN)), _number(row.get(WAIT))
        if slowdown is not None:
            bits.append(f"probe {slowdown:.1f}x slower than idle")
        if wait is not None:
            bits.append(f"threads waited {wait:.0%} of the time for a core")
        if slowdown is None and wait is None:
            bits.append("flagged noisy")
    if flag(row.get("throttled")):
        bits.append("GPU clocks throttled")
    return ", ".join(bits)


def is_timing_metric(name: str, unit: str | None = "", judge: str | None = None) -> bool:
    """Whether a metric's value comes from the clock, so a disturbed row's value of it is not to be trusted.

    By its declaration, never by a task: the runner's timed-call columns, anything compare judges from
    latency samples, anything in a unit of time, and rates per second (TFLOP/s, tokens/s).
    """
    unit = (unit or "").strip()
    return name in TIMING_COLUMNS or judge == "samples" or unit in TIME_UNITS or unit.endswith("/s")


def timed_mask(df: pd.DataFrame) -> pd.Series:
    """Rows that timed a call: status ok with a latency (the rows the probe speaks for)."""
    if "latency_ms" not in df.columns:
        return pd.Series(False, index=df.index)
    ok = df["status"].eq("ok") if "status" in df.columns else pd.Series(True, index=df.index)
    return ok & pd.to_numeric(df["latency_ms"], errors="coerce").notna()


def probed(df: pd.DataFrame) -> bool:
    """Whether any row carries an interference-probe reading (rows written before the probe carry none)."""
    return any(c in df.columns and df[c].notna().any() for c in (*FLAGS, SLOWDOWN))
