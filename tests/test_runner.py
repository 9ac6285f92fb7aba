"""The runner: rows for every outcome, resume, and a sweep that survives a failing cell."""

import pytest
import torch

from bench.measure.hardware import HardwareProfile
from bench.measure.timing import CellTimeout, TimingConfig
from bench.results import CORE_COLUMNS, load
from bench.sweep import RunSettings, run_cells
from methods import METHODS
from methods.base import Attention, Capabilities
from methods.registry import ImplSpec, MethodSpec
from tasks.base import Cell

POINT = dict(dtype="float32", batch=1, heads=2, seq_len=64, kv_len=64, head_dim=16, causal=True, mode="fwd",
             input_dist="gaussian")


def settings(tmp_path, force=False):
    profile = HardwareProfile("cpu", "cpu", "test cpu", {"float32": 1.0}, None, None, True, "test")
    timing = TimingConfig(warmup=0, min_time_s=0.0, min_repeats=2, max_repeats=2)
    return RunSettings(tmp_path, "run1", torch.device("cpu"), profile, timing, force=force, config_yaml="x: 1")


def cell(method="softmax", impl="reference", **point):
    return Cell(method, impl, "scaling", "cpu", {**POINT, **point})


class Broken(Attention):
    def forward(self, q, k, v, causal=False):
        raise RuntimeError("injected failure\nsecond line")


class Garbage(Attention):
    def forward(self, q, k, v, causal=False):
        return torch.zeros_like(q)


class NaNs(Attention):
    def forward(self, q, k, v, causal=False):
        return torch.full_like(q, float("nan"))


class OutOfMemory(Attention):
    def forward(self, q, k, v, causal=False):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")


class Slow(Attention):
    def forward(self, q, k, v, causal=False):
        raise CellTimeout("one call took 9.0 s > timeout_s=1")


@pytest.fixture
def fake_methods(monkeypatch):
    spec = MethodSpec("fake", "exact", "test doubles", "tests")
    for name, cls in [("broken", Broken), ("garbage", Garbage), ("nan", NaNs), ("oom", OutOfMemory), ("slow", Slow)]:
        cls.method, cls.impl, cls.kind, cls.family, cls.capabilities = "fake", name, "reference", "exact", Capabilities()
        spec.impls[name] = ImplSpec(name, "reference", cls, Capabilities())
    spec.impls["gpu_only"] = ImplSpec("gpu_only", "kernel", Garbage, Capabilities(), guard=lambda d: "needs a GPU")
    monkeypatch.setitem(METHODS, "fake", spec)


def test_ok_row_has_every_core_column(tmp_path):
    run_cells([cell()], settings(tmp_path), log=lambda s: None)
    df = load(tmp_path)
    assert set(CORE_COLUMNS) <= set(df.columns)
    r = df.iloc[0]
    assert r.status == "ok" and r.reason == ""
    assert r.latency_ms > 0 and len(r.latency_samples_ms) == 2
    assert r.latency_ms_p10 <= r.latency_ms <= r.latency_ms_p90
    assert r.flops == 4 * 2 * (64 * 65 // 2) * 16
    assert r.tflops == pytest.approx(r.flops / (r.latency_ms * 1e-3) / 1e12)
    assert r.pct_peak == pytest.approx(100 * r.tflops / 1.0)
    assert r.peak_mem_bytes > 0 and r.fidelity_rel < 1e-5 and r.fidelity_max_abs < 1e-5
    assert r.torch_version == torch.__version__ and r.seed == 0 and r.config_yaml == "x: 1"
    assert r.family == "exact" and r.hardware == "cpu" and r.run_id == "run1"


def test_failures_become_rows_and_the_sweep_goes_on(tmp_path, fake_methods):
    impls = ["broken", "garbage", "nan", "oom", "slow", "gpu_only"]
    cells = [cell("fake", i) for i in impls] + [cell()]
    rows = run_cells(cells, settings(tmp_path), log=lambda s: None)
    status = {r["impl"]: (r["status"], r["reason"]) for r in rows}
    assert status["broken"] == ("error", "RuntimeError: injected failure")
    assert status["garbage"][0] == "wrong" and "relative error" in status["garbage"][1]
    assert status["nan"][0] == "wrong" and "NaN" in status["nan"][1]
    assert status["oom"][0] == "oom"
    assert status["slow"][0] == "timeout"
    assert status["gpu_only"] == ("unsupported", "needs a GPU")
    assert status["reference"][0] == "ok"  # the cell after the failures still ran
    assert len(load(tmp_path)) == len(cells)


def test_capability_mismatch_is_unsupported(tmp_path):
    # hyperattention's kernels are forward-only.
    rows = run_cells([cell("hyperattention", "kernel", mode="fwd_bwd")], settings(tmp_path), log=lambda s: None)
    assert rows[0]["status"] == "unsupported"
    assert "backward" in rows[0]["reason"] or "CUDA" in rows[0]["reason"]


def test_kernel_row_is_marked_interpreted(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    rows = run_cells([cell(impl="kernel")], settings(tmp_path), log=lambda s: None)
    assert rows[0]["status"] == "ok" and rows[0]["interpreted"] is True
    monkeypatch.delenv("TRITON_INTERPRET")
    rows = run_cells([cell(impl="kernel", seq_len=32, kv_len=32)], settings(tmp_path), log=lambda s: None)
    assert rows[0]["status"] == "unsupported" and "TRITON_INTERPRET=1" in rows[0]["reason"]


def test_resume_skips_ok_cells_and_force_reruns(tmp_path, fake_methods):
    cells = [cell(), cell("fake", "broken")]
    first = run_cells(cells, settings(tmp_path), log=lambda s: None)
    assert [r["status"] for r in first] == ["ok", "error"]
    logs = []
    second = run_cells(cells, settings(tmp_path), log=logs.append)
    assert [r["impl"] for r in second] == ["broken"]  # only the failed cell is measured again
    assert any("skipped" in line for line in logs)
    third = run_cells(cells, settings(tmp_path, force=True), log=lambda s: None)
    assert len(third) == 2
    assert len(load(tmp_path)) == 2  # one file per cell, rewritten in place


def test_cell_id_is_stable_and_distinguishes_keys():
    assert cell().cell_id == cell().cell_id
    assert cell().cell_id != cell(seq_len=128).cell_id
    assert cell().cell_id != cell(impl="sdpa").cell_id
    suite_b = Cell("softmax", "reference", "scaling", "cpu", POINT, suite="other")
    assert suite_b.cell_id == cell().cell_id  # the suite does not make a different measurement
