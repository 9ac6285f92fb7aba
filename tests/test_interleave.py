"""Issue 14 wired: implementations timed in alternating rounds, sample hygiene, the probe's verdict in the
rows (injected readings), one runner run under real load (the flag only), and the noise command."""

from __future__ import annotations

import collections
import subprocess
import sys
import time

import pytest
import torch

from bench import noise
from bench.measure import checks
from bench.measure.checks import TimedCall, measure_calls
from bench.measure.hardware import HardwareProfile
from bench.measure.timing import Timing, TimingConfig, measure_latencies
from bench.results import load
from bench.sweep import RunSettings, point_groups, run_cells
from tasks.base import Cell

CPU = torch.device("cpu")
IDLE = 1e-3
POINT = dict(dtype="float32", batch=1, heads=2, seq_len=64, kv_len=64, head_dim=16, causal=True, mode="fwd",
             input_dist="gaussian")  # fmt: skip


def recorder(order: list[str], name: str, fail_on: int | None = None):
    calls = [0]

    def fn() -> None:
        calls[0] += 1
        if fail_on is not None and calls[0] >= fail_on:
            raise RuntimeError(f"{name} broke")
        order.append(name)

    return fn


# ----------------------------------------------------------------------------- the timing loop


def test_rounds_alternate_between_implementations() -> None:
    order: list[str] = []
    cfg = TimingConfig(warmup=0, min_time_s=0.0, min_repeats=4, max_repeats=4, rounds=4)
    got = measure_latencies([recorder(order, n) for n in "abc"], CPU, cfg)
    assert order == list("abc") * 4  # A B C A B C ..., never A A A A B B B B
    assert [len(t.samples_ms) for t in got] == [4, 4, 4]


def test_blocks_spread_each_implementation_over_the_rounds() -> None:
    """A fast and a slow call: each round gives each a block of ~min_time/rounds, so both span every round."""
    order: list[str] = []

    def fast() -> None:
        order.append("fast")
        time.sleep(0.001)

    def slow() -> None:
        order.append("slow")
        time.sleep(0.008)

    cfg = TimingConfig(warmup=1, min_time_s=0.08, min_repeats=3, max_repeats=500, rounds=4)
    fast_t, slow_t = measure_latencies([fast, slow], CPU, cfg)
    timed = order[2:]  # after one warm-up call each
    switches = sum(1 for a, b in zip(timed, timed[1:], strict=False) if a != b)
    assert switches >= 5, f"not interleaved: {switches} switches"
    assert len(fast_t.samples_ms) > len(slow_t.samples_ms)  # blocks are sized by time, not by count
    assert sum(fast_t.samples_ms) >= 80 and sum(slow_t.samples_ms) >= 80  # min_time_s each


def test_a_failing_implementation_leaves_the_rotation_and_the_others_finish() -> None:
    order: list[str] = []
    cfg = TimingConfig(warmup=0, min_time_s=0.0, min_repeats=5, max_repeats=5)
    ok, broken = measure_latencies([recorder(order, "a"), recorder(order, "b", fail_on=3)], CPU, cfg)
    assert isinstance(ok, Timing) and len(ok.samples_ms) == 5
    assert isinstance(broken, RuntimeError) and "b broke" in str(broken)


def test_between_rounds_runs_between_rounds_only() -> None:
    seen = []
    cfg = TimingConfig(warmup=0, min_time_s=0.0, min_repeats=3, max_repeats=3)
    measure_latencies([lambda: None], CPU, cfg, between_rounds=lambda: seen.append(1))
    assert len(seen) == 2  # three rounds of one call: two gaps


def test_iqr_drops_outliers_from_the_statistics_but_keeps_the_raw_samples() -> None:
    samples = [1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 50.0]
    raw, iqr = Timing(list(samples)), Timing(list(samples), outliers="iqr")
    assert iqr.samples_ms == samples and iqr.outliers_removed == 1 and raw.outliers_removed == 0
    assert max(iqr.kept_ms) == 1.1 and iqr.quantile(0.9) < 2 < raw.quantile(0.9)
    assert iqr.cv < 0.1 < raw.cv
    assert Timing([2.0]).cv is None


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"bogus": 1}, "unknown timing key"),
        ({"outliers": "trim"}, "none, iqr"),
        ({"min_repeats": 5, "max_repeats": 2}, "max_repeats"),
        ({"rounds": 0}, "rounds"),
        ({"pause_s": -1.0}, "pause_s"),
        ({"probe_threshold": 0.9}, "probe_threshold"),
        ({"wait_threshold": 1.5}, "wait_threshold"),
    ],
)
def test_bad_timing_config_fails_on_one_line(values: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match) as err:
        TimingConfig.from_mapping(values)
    assert "\n" not in str(err.value)


def test_cudagraph_and_pause_are_gpu_options() -> None:
    cfg = TimingConfig(warmup=0, min_time_s=0.0, min_repeats=2, max_repeats=2, cudagraph=True, pause_s=0.0)
    (t,) = measure_latencies([lambda: None], CPU, cfg)
    assert not t.cudagraph  # a CPU call is timed as it is


# ----------------------------------------------------------------------------- the probe's verdict in the rows


def scripted_probe(monkeypatch: pytest.MonkeyPatch, readings: list[float], waits: list[float | None] = [0.0]) -> list[float]:  # noqa: B006
    """The probe returns `readings` in order, then the last one forever; the idle figure is IDLE. The run-queue
    meter reads `waits` per attempt (then the last one), so a loaded test machine does not decide these tests."""
    seen: list[float] = []
    metered: list[int] = []

    def meter() -> object:
        value = waits[min(len(metered), len(waits) - 1)]
        metered.append(1)
        return lambda: value

    monkeypatch.setattr(checks, "runqueue_meter", meter)
    monkeypatch.setattr(checks, "_recent_noisy", collections.deque(maxlen=checks.RECENT))

    def probe(device: object) -> float:
        value = readings[min(len(seen), len(readings) - 1)]
        seen.append(value)
        return value

    monkeypatch.setattr(checks, "probe_seconds", probe)
    monkeypatch.setattr(checks, "idle_probe_seconds", lambda device: IDLE)
    return seen


# Two rounds of one call each: readings before, between the rounds and after = 3 per attempt.
PROBED = TimingConfig(warmup=0, min_time_s=0.0, min_repeats=2, max_repeats=2, max_retries=2, backoff_s=0.0)


def two_calls() -> list[TimedCall]:
    a = torch.randn(64, 64)
    return [TimedCall(lambda: a @ a, flops=2 * 64**3, peak_tflops=1.0), TimedCall(lambda: a + a)]


def test_quiet_readings_measure_once_and_do_not_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = scripted_probe(monkeypatch, [IDLE * 1.05])
    rows = measure_calls(two_calls(), CPU, PROBED)
    assert len(seen) == 3
    for row in rows:
        assert row["noisy"] is False and row["measure_attempts"] == 1 and row["interleaved"] == 2
        assert row["probe_slowdown"] == pytest.approx(1.05) and row["probe_readings"] == 3
        assert row["latency_cv"] is not None and len(row["latency_samples_ms"]) == 2
    assert rows[0]["tflops"] is not None and "tflops" not in rows[1]


def test_disturbed_then_quiet_is_remeasured_not_flagged(monkeypatch: pytest.MonkeyPatch) -> None:
    scripted_probe(monkeypatch, [IDLE * 5] * 3 + [IDLE])
    rows = measure_calls(two_calls(), CPU, PROBED)
    assert all(r["noisy"] is False and r["measure_attempts"] == 2 for r in rows)


def test_a_machine_that_stays_busy_flags_every_row_and_keeps_its_samples(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = scripted_probe(monkeypatch, [IDLE * 4])
    rows = measure_calls(two_calls(), CPU, PROBED)
    assert len(seen) == 3 * 3  # first attempt and two retries
    for row in rows:
        assert row["noisy"] is True and row["measure_attempts"] == 3 and row["probe_slowdown"] == pytest.approx(4)
        assert len(row["latency_samples_ms"]) == 2


def test_a_quiet_probe_with_a_long_run_queue_wait_is_disturbed(monkeypatch: pytest.MonkeyPatch) -> None:
    """One busy neighbour on two cores: the short probe can read quiet while the cell's threads wait for a core."""
    scripted_probe(monkeypatch, [IDLE * 1.1], waits=[0.4, 0.38, 0.41])
    rows = measure_calls(two_calls(), CPU, PROBED)
    for row in rows:
        assert row["noisy"] is True and row["measure_attempts"] == 3
        assert row["runqueue_wait"] == pytest.approx(0.41) and row["probe_slowdown"] == pytest.approx(1.1)


def test_a_wait_that_passes_is_remeasured_and_an_unknown_wait_leaves_the_probe_to_judge(monkeypatch) -> None:
    scripted_probe(monkeypatch, [IDLE * 1.1], waits=[0.5, 0.02])
    rows = measure_calls(two_calls(), CPU, PROBED)
    assert all(r["noisy"] is False and r["measure_attempts"] == 2 and r["runqueue_wait"] == 0.02 for r in rows)
    scripted_probe(monkeypatch, [IDLE * 1.1], waits=[None])  # no /proc/self/task/*/schedstat (macOS)
    rows = measure_calls(two_calls(), CPU, PROBED)
    assert all(r["noisy"] is False and r["measure_attempts"] == 1 and r["runqueue_wait"] is None for r in rows)
    strict = TimingConfig(**{**PROBED.__dict__, "wait_threshold": 0.01})
    scripted_probe(monkeypatch, [IDLE * 1.1], waits=[0.02])
    assert all(r["noisy"] is True for r in measure_calls(two_calls(), CPU, strict))


def test_a_machine_that_stays_busy_stops_paying_for_retries_until_it_is_quiet(monkeypatch) -> None:
    scripted_probe(monkeypatch, [IDLE * 4])
    attempts = [measure_calls(two_calls(), CPU, PROBED)[0]["measure_attempts"] for _ in range(checks.NOISY_STREAK + 2)]
    assert attempts == [3] * checks.NOISY_STREAK + [1, 1]  # then measured once each, still flagged
    recent = checks._recent_noisy
    scripted_probe(monkeypatch, [IDLE])  # resets the history: refill it as the busy spell left it
    checks._recent_noisy.extend(recent)
    measure_calls(two_calls(), CPU, PROBED)  # one quiet measurement amid the busy spell
    recent = checks._recent_noisy
    scripted_probe(monkeypatch, [IDLE * 4])
    checks._recent_noisy.extend(recent)
    assert measure_calls(two_calls(), CPU, PROBED)[0]["measure_attempts"] == 1  # does not re-arm the retries
    recent = checks._recent_noisy
    scripted_probe(monkeypatch, [IDLE])
    checks._recent_noisy.extend(recent)
    quiet_attempts = [measure_calls(two_calls(), CPU, PROBED)[0]["measure_attempts"] for _ in range(checks.RECENT)]
    assert quiet_attempts == [1] * checks.RECENT and not any(checks._recent_noisy)
    scripted_probe(monkeypatch, [IDLE * 4])
    checks._recent_noisy.extend([False] * checks.RECENT)
    assert measure_calls(two_calls(), CPU, PROBED)[0]["measure_attempts"] == 3  # retries are back once it is quiet


def test_probe_off_leaves_the_flag_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = scripted_probe(monkeypatch, [IDLE * 4])
    rows = measure_calls(two_calls(), CPU, TimingConfig(warmup=0, min_time_s=0.0, min_repeats=2, probe=False))
    assert not seen and all(r["noisy"] is None and r["probe_slowdown"] is None for r in rows)


# ----------------------------------------------------------------------------- the runner


def settings(tmp_path, timing: TimingConfig) -> RunSettings:
    profile = HardwareProfile("cpu", "cpu", "test cpu", {"float32": 1.0}, None, None, True, "test")
    return RunSettings(tmp_path, "run1", CPU, profile, timing, config_yaml="x: 1")


def cells(*impls: str, **point) -> list[Cell]:
    return [Cell("softmax", impl, "scaling", "cpu", {**POINT, **point}) for impl in impls]


def test_a_points_implementations_are_timed_together(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    scripted_probe(monkeypatch, [IDLE * 4])  # disturbed throughout: every row of the point is flagged
    plan = cells("reference", "sdpa", "sdpa_math") + cells("reference", seq_len=32) + cells("reference", "sdpa", mode="bwd")
    assert [len(g) for g in point_groups(plan)] == [3, 1, 1, 1]  # bwd cells hold their graph: one at a time
    logged: list[str] = []
    run_cells(plan, settings(tmp_path, PROBED), log=logged.append)
    df = load(tmp_path).set_index(["impl", "seq_len", "mode"])
    assert (df["status"] == "ok").all()
    assert df.loc[("sdpa", 64, "fwd"), "interleaved"] == 3 and df.loc[("reference", 32, "fwd"), "interleaved"] == 1
    assert df["noisy"].all()
    # Four measurements (one per group), each noisy: the fourth follows a streak of three and is made once.
    assert df.loc[("sdpa", 64, "bwd"), "measure_attempts"] == 1
    assert (df.drop(index=("sdpa", 64, "bwd"))["measure_attempts"] == 3).all()
    assert sum("noisy: probe 4.0x slower than idle" in line for line in logged) == len(plan)


def test_a_cell_failing_its_preparation_does_not_stop_its_point(tmp_path, monkeypatch) -> None:
    scripted_probe(monkeypatch, [IDLE])
    run_cells(cells("reference", "flash_attn", "sdpa"), settings(tmp_path, PROBED), log=lambda s: None)
    df = load(tmp_path).set_index("impl")
    assert df.loc["flash_attn", "status"] == "unsupported"
    assert df.loc["reference", "status"] == df.loc["sdpa", "status"] == "ok"
    assert df.loc["sdpa", "interleaved"] == 2 and not df.loc["sdpa", "noisy"]


def test_a_busy_machine_flags_or_remeasures_a_runner_row(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end with real load, the runner's own probe and run-queue meter at 2 threads: only the flag is
    checked. Busy children outnumber the cores. The measurement spans ~0.1 s: one of 10 x 0.03 ms fitted
    inside a scheduler slice, its probe readings passed (1.02-1.04x) and its wait was unknown (2 of 6 runs)."""
    monkeypatch.setenv("ATTNBENCH_CACHE_DIR", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    timing = TimingConfig(warmup=1, min_time_s=0.1, min_repeats=3, max_repeats=10_000, max_retries=1, backoff_s=0.05)
    try:
        checks.idle_probe_seconds(CPU)  # the idle figure, measured before the load starts
        children = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(3)]
        try:
            start = time.perf_counter()
            while time.perf_counter() - start < 0.3:  # let them spin up; stay runnable meanwhile
                pass
            run_cells(cells("sdpa", seq_len=128, kv_len=128), settings(tmp_path / "rows", timing), log=lambda s: None)
        finally:
            for child in children:
                child.kill()
            for child in children:
                child.wait()
    finally:
        torch.set_num_threads(threads)
    row = load(tmp_path / "rows").iloc[0]
    assert row.status == "ok"
    assert row.noisy or row.measure_attempts > 1, (
        f"busy run looked quiet: probe {row.probe_slowdown:.2f}x idle, wait {row.runqueue_wait}, {row.probe_readings}")


# ----------------------------------------------------------------------------- the noise command


def test_run_to_run_cv_and_its_limit() -> None:
    assert noise.run_to_run_cv([10.0, 10.0, 10.0]) == 0.0
    assert noise.run_to_run_cv([9.0, 11.0]) == pytest.approx(2**0.5 / 10)
    assert noise.run_to_run_cv([1.0]) is None
    assert noise.cv_limit(1.15) == pytest.approx(0.05)


def cell_noise(medians: list[float], noisy: list[bool] | None = None, ratios=()) -> noise.CellNoise:
    n = len(medians)
    return noise.CellNoise("softmax/sdpa", medians, [1.0] * n, [0.01] * n, [1] * n, noisy or [False] * n, list(ratios))


def test_verdict_needs_no_noisy_repeat_and_a_small_cv() -> None:
    assert noise.verdict([cell_noise([10.0, 10.1, 9.9])], 1.15)[0]
    quiet, why = noise.verdict([cell_noise([10.0, 10.1, 9.9], [False, True, False])], 1.15)
    assert not quiet and "1 measurement(s) flagged noisy" in why
    quiet, why = noise.verdict([cell_noise([10.0, 14.0, 8.0])], 1.15)
    assert not quiet and "> 5.0%" in why
    # Normalised: the ratio's CV is judged, not the absolute medians'.
    assert noise.verdict([cell_noise([10.0, 14.0, 8.0], ratios=[0.5, 0.51, 0.5])], 1.15)[0]


def test_noise_command_end_to_end(capsys: pytest.CaptureFixture[str]) -> None:
    """The command as run from the shell (in-process: `main` is the entry point; threads restored after)."""
    args = ["method=softmax", "impl=[reference,sdpa]", "task=scaling", "task.seq_len=32", "task.heads=1",
            "task.head_dim=16", "threads=1", "+timing.min_time_s=0.005", "--repeats", "2", "--normalize-by", "sdpa"]  # fmt: skip
    threads = torch.get_num_threads()
    try:
        code = noise.main(args)
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert code in (0, 1)
    assert "probe: idle" in out and "softmax/reference seq_len=32" in out and "ratio to softmax/sdpa" in out
    verdict_lines = [line for line in out.splitlines() if line.startswith(("quiet enough:", "NOT quiet enough:"))]
    assert len(verdict_lines) == 1
    assert (code == 0) == verdict_lines[0].startswith("quiet enough:")


@pytest.mark.parametrize(
    ("args", "match"),
    [(["method=sofmax"], "unknown method 'sofmax'"), (["method=softmax", "--repeats", "1"], "--repeats must be >= 2")],
)
def test_noise_command_bad_input(args: list[str], match: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert noise.main(args) == 2  # in-process: the exit path is the same, without importing torch again
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1
