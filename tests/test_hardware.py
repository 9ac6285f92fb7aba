"""Hardware profiles: datasheet yamls are sane, CPU peaks are measured once and cached,
`auto` maps real CUDA device names to the right profile, and device selection fails loudly."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from bench.measure import hardware
from bench.measure.hardware import (
    DEFAULT_CONF_DIR,
    HardwareProfile,
    detect_device,
    match_profile,
    measure_cpu,
    resolve_profile,
)

GPU_PROFILES = ["h100_sxm", "h100_pcie", "h200", "a100_80gb", "l40s", "rtx4090"]
FAKE_MEASUREMENT: dict[str, Any] = {
    "peak_tflops": {"float32": 0.5, "bfloat16": 1.5},
    "mem_bandwidth_gbs": 20.0,
    "num_threads": 2,
}


@pytest.mark.parametrize("name", GPU_PROFILES)
def test_gpu_yaml_is_sane(name: str) -> None:
    cfg = OmegaConf.load(DEFAULT_CONF_DIR / f"{name}.yaml")
    assert cfg.name == name
    assert cfg.device_type == "cuda"
    assert len(cfg.match) > 0 and cfg.source
    peaks = cfg.peak_tflops
    for dtype in ("float32", "float16", "bfloat16"):
        assert peaks[dtype] > 0, dtype
    assert peaks.float16 > peaks.float32
    assert cfg.mem_bandwidth_gbs > 0 and cfg.memory_gib > 0
    # The profile resolves as-is on a CPU machine (runner records profile and device separately).
    prof = resolve_profile(cfg, torch.device("cpu"))
    assert prof.name == name and not prof.measured
    assert prof.peak_for("float32") == peaks.float32  # non-tensor fp32, never the tf32 entry
    assert prof.peak_for(torch.bfloat16) == peaks.bfloat16
    json.dumps(prof.as_dict())


def test_auto_and_cpu_yamls_exist() -> None:
    assert OmegaConf.load(DEFAULT_CONF_DIR / "auto.yaml").name == "auto"
    cpu = OmegaConf.load(DEFAULT_CONF_DIR / "cpu.yaml")
    assert cpu.name == "cpu" and cpu.device_type == "cpu" and cpu.measure is True
    assert all(v is None for v in cpu.peak_tflops.values())


def test_profile_named_only_is_completed_from_yaml() -> None:
    prof = resolve_profile({"name": "h200"}, torch.device("cpu"))
    assert prof.mem_bandwidth_gbs == 4800.0 and prof.peak_for("fp16") == 989.4
    with pytest.raises(ValueError, match="h100_sxm"):
        resolve_profile({"name": "nope"}, torch.device("cpu"))


def test_peak_for_rejects_unknown_dtype() -> None:
    prof = resolve_profile({"name": "a100_80gb"}, torch.device("cpu"))
    assert prof.peak_for("fp8") is None
    with pytest.raises(ValueError):
        prof.peak_for("float31")


@pytest.fixture
def counted_measure(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    calls: list[float] = []

    def fake(seconds: float = 0.5) -> dict[str, Any]:
        calls.append(seconds)
        return json.loads(json.dumps(FAKE_MEASUREMENT))

    monkeypatch.setattr(hardware, "measure_cpu", fake)
    return calls


@pytest.mark.parametrize("cfg", [{"name": "cpu"}, {"name": "auto"}])
def test_cpu_measures_once_then_reads_cache(tmp_path: Path, counted_measure: list[float], cfg: dict) -> None:
    first = resolve_profile(cfg, torch.device("cpu"), cache_dir=tmp_path)
    assert counted_measure == [0.5]
    assert first.name == "cpu" and first.device_type == "cpu" and first.measured
    assert first.peak_for("float32") == 0.5 and first.peak_for("bfloat16") == 1.5
    assert first.peak_for("float16") is None
    assert first.mem_bandwidth_gbs == 20.0
    assert len(list(tmp_path.glob("cpu_profile_*.json"))) == 1

    second = resolve_profile(cfg, torch.device("cpu"), cache_dir=tmp_path)
    assert len(counted_measure) == 1, "second call must read the cache"
    assert second.peak_tflops == first.peak_tflops and "cached" in second.source


def test_cache_dir_from_env(tmp_path: Path, counted_measure: list[float], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATTNBENCH_CACHE_DIR", str(tmp_path / "c"))
    resolve_profile({"name": "cpu"}, torch.device("cpu"))
    assert len(list((tmp_path / "c").glob("cpu_profile_*.json"))) == 1


@pytest.mark.parametrize(
    "corrupt",
    ["{not json", "", json.dumps({"format": 1, "identity": {}, "measurement": {}}), "[1, 2]"],
)
def test_corrupt_cache_is_remeasured(tmp_path: Path, counted_measure: list[float], corrupt: str) -> None:
    resolve_profile({"name": "cpu"}, torch.device("cpu"), cache_dir=tmp_path)
    (path,) = tmp_path.glob("cpu_profile_*.json")
    path.write_text(corrupt)
    prof = resolve_profile({"name": "cpu"}, torch.device("cpu"), cache_dir=tmp_path)
    assert len(counted_measure) == 2 and prof.peak_for("float32") == 0.5
    assert json.loads(path.read_text())["measurement"]["peak_tflops"]["float32"] == 0.5  # rewritten


def test_cache_with_bad_numbers_is_remeasured(tmp_path: Path, counted_measure: list[float]) -> None:
    resolve_profile({"name": "cpu"}, torch.device("cpu"), cache_dir=tmp_path)
    (path,) = tmp_path.glob("cpu_profile_*.json")
    data = json.loads(path.read_text())
    data["measurement"]["peak_tflops"]["float32"] = -1.0
    path.write_text(json.dumps(data))
    resolve_profile({"name": "cpu"}, torch.device("cpu"), cache_dir=tmp_path)
    assert len(counted_measure) == 2


def test_cpu_config_values_override_measurement(tmp_path: Path, counted_measure: list[float]) -> None:
    cfg = OmegaConf.load(DEFAULT_CONF_DIR / "cpu.yaml")
    cfg.peak_tflops.float32 = 9.0
    prof = resolve_profile(cfg, torch.device("cpu"), cache_dir=tmp_path)
    assert prof.peak_for("float32") == 9.0 and prof.peak_for("bfloat16") == 1.5


def test_real_measure_cpu_is_finite() -> None:
    # No bound on its wall time: a timed test fails on a busy machine (speed is a benchmark's job).
    m = measure_cpu(seconds=0.1)
    assert m["peak_tflops"]["float32"] > 0 and math.isfinite(m["peak_tflops"]["float32"])
    bf16 = m["peak_tflops"]["bfloat16"]
    assert bf16 is None or (bf16 > 0 and math.isfinite(bf16))
    assert m["mem_bandwidth_gbs"] > 0 and math.isfinite(m["mem_bandwidth_gbs"])
    assert m["num_threads"] == torch.get_num_threads()
    json.dumps(m)


@pytest.mark.parametrize(
    "device_name, expected",
    [
        ("NVIDIA H100 80GB HBM3", "h100_sxm"),
        ("NVIDIA H100 PCIe", "h100_pcie"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA A100-SXM4-80GB", "a100_80gb"),
        ("NVIDIA L40S", "l40s"),
        ("NVIDIA GeForce RTX 4090", "rtx4090"),
        ("Tesla T4", None),
        # Look-alikes with different numbers must not borrow a profile.
        ("NVIDIA GH200 480GB", None),
        ("NVIDIA H200 NVL", None),
        ("NVIDIA H100 NVL", None),
        ("NVIDIA L40", None),
        ("NVIDIA A100-SXM4-40GB", None),
        ("NVIDIA GeForce RTX 4090 D", None),
    ],
)
def test_match_profile(device_name: str, expected: str | None) -> None:
    spec = match_profile(device_name)
    assert (spec["name"] if spec else None) == expected


def _fake_cuda(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)

    def no_props(device: Any = None) -> Any:
        raise RuntimeError("no CUDA in tests")

    monkeypatch.setattr(torch.cuda, "get_device_properties", no_props)


def test_auto_on_fake_cuda_picks_profile(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cuda(monkeypatch, "NVIDIA H100 80GB HBM3")
    assert detect_device("auto") == torch.device("cuda")
    prof = resolve_profile({"name": "auto"}, torch.device("cuda"))
    assert isinstance(prof, HardwareProfile)
    assert prof.name == "h100_sxm" and prof.device_name == "NVIDIA H100 80GB HBM3"
    assert prof.peak_for("bfloat16") == 989.4


def test_auto_on_unknown_gpu_does_not_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cuda(monkeypatch, "Tesla T4")
    prof = resolve_profile(OmegaConf.create({"name": "auto"}), torch.device("cuda"))
    assert prof.name == "unknown" and prof.device_name == "Tesla T4"
    assert prof.source == "unknown GPU: Tesla T4; add a profile under conf/hardware"
    assert all(v is None for v in prof.peak_tflops.values()) and prof.mem_bandwidth_gbs is None
    assert prof.peak_for("float16") is None


def test_detect_device() -> None:
    assert detect_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert detect_device().type == expected
    with pytest.raises(ValueError, match=r"auto.*cpu.*cuda"):
        detect_device("tpu")


def test_detect_device_cuda_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="cuda"):
        detect_device("cuda")
