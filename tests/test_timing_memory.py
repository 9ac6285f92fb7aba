"""Timing loop and memory measurement: invariants, not speeds."""

import time

import pytest
import torch

from bench.measure.memory import measure_peak_memory
from bench.measure.timing import CellTimeout, TimingConfig, measure_latency
from methods import build

CPU = torch.device("cpu")


def test_repeats_bounded_and_samples_kept():
    calls = []
    t = measure_latency(lambda: calls.append(1), CPU, TimingConfig(warmup=2, min_time_s=0.0, min_repeats=5, max_repeats=5))
    assert len(t.samples_ms) == 5 and len(calls) == 7  # warm-up calls are not samples
    t = measure_latency(lambda: None, CPU, TimingConfig(warmup=0, min_time_s=10.0, min_repeats=1, max_repeats=7))
    assert len(t.samples_ms) == 7  # max_repeats wins over min_time
    assert t.threads == torch.get_num_threads()


def test_samples_measure_the_call():
    t = measure_latency(lambda: time.sleep(0.01), CPU, TimingConfig(warmup=0, min_time_s=0.0, min_repeats=3))
    assert all(s >= 9.0 for s in t.samples_ms)
    assert t.quantile(0.1) <= t.median <= t.quantile(0.9)


def test_slow_call_times_out():
    with pytest.raises(CellTimeout, match="timeout_s"):
        measure_latency(lambda: time.sleep(0.05), CPU, TimingConfig(warmup=0, min_repeats=1, timeout_s=0.01))


def test_memory_sees_the_quadratic_score_matrix():
    """Naive softmax at B=1, H=8, N=2048 fp32 holds >= 128 MiB of scores; SDPA far less."""
    q, k, v = (torch.randn(1, 8, 2048, 64) for _ in range(3))
    naive, sdpa = build("softmax", impl="reference"), build("softmax", impl="sdpa")
    with torch.no_grad():
        naive_peak = measure_peak_memory(lambda: naive(q, k, v), CPU)
        sdpa_peak = measure_peak_memory(lambda: sdpa(q, k, v), CPU)
    assert naive_peak >= 128 * 2**20
    assert sdpa_peak < naive_peak / 8


def test_memory_excludes_live_inputs():
    big = torch.randn(4096, 4096)  # 64 MiB alive before the call
    peak = measure_peak_memory(lambda: big[:16].clone(), CPU)
    assert 16 * 4096 * 4 <= peak < 2**20
