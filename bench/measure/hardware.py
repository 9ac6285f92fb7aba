"""Hardware profiles: the peak compute and bandwidth a run is measured against.

Why this exists: "% of peak" is only meaningful against a documented denominator. GPU
profiles come from `conf/hardware/<name>.yaml` (dense datasheet peaks, each file citing its
source); a CPU has no datasheet number that survives SKU, core count and thread settings, so
its peaks are measured once (`measure_cpu`) and cached as JSON keyed by a CPU identity, so every
run on the same machine shares one denominator and pays the measurement once.

The runner, not this module, computes % of peak = achieved TFLOP/s / `peak_for(dtype)` * 100,
and records both the profile and the device the run actually used (a GPU profile may be
selected on a CPU machine on purpose).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from bench.measure.files import atomic_write
from bench.measure.provenance import cpuinfo

log = logging.getLogger(__name__)

DEFAULT_CONF_DIR = Path(__file__).resolve().parents[2] / "conf" / "hardware"
PEAK_KEYS: tuple[str, ...] = ("float32", "tf32", "float16", "bfloat16", "fp8")
DEVICE_CHOICES: tuple[str, ...] = ("auto", "cpu", "cuda")
CACHE_FORMAT = 1  # bump when the cached measurement's layout changes; old files are re-measured
COPY_BUFFER_BYTES = 256 * 2**20

_DTYPE_ALIASES: dict[str, str] = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "tf32": "tf32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "fp8": "fp8",
    "float8_e4m3fn": "fp8",
    "float8_e5m2": "fp8",
}


@dataclass
class HardwareProfile:
    """Peaks of one piece of hardware, plus where they came from.

    `peak_tflops` values are DENSE peaks (no 2:4 sparsity). `float32` is the non-tensor FP32
    rate (what SDPA's fp32 path reaches), `tf32` the tensor-core rate used only when TF32 is
    enabled. `device_name` is the device the run actually uses, which may differ from the
    profile when a profile is named explicitly. `details` holds the raw measurement for
    measured (CPU) profiles so a result file can show how the denominator was obtained.
    """

    name: str
    device_type: str
    device_name: str
    peak_tflops: dict[str, float | None]
    mem_bandwidth_gbs: float | None
    memory_gib: float | None
    measured: bool
    source: str
    details: dict[str, Any] = field(default_factory=dict)

    def peak_for(self, dtype: str | torch.dtype) -> float | None:
        """Dense peak TFLOP/s for a compute dtype, or None when unknown for this hardware.

        float32 returns the non-tensor FP32 entry even on CUDA: PyTorch's default fp32 matmul
        and SDPA paths do not use TF32, so the tensor-core TF32 rate would understate % of peak.
        Ask for "tf32" explicitly when TF32 is enabled.
        """
        key = str(dtype).removeprefix("torch.").lower()
        if key not in _DTYPE_ALIASES:
            raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(set(_DTYPE_ALIASES.values()))}")
        return self.peak_tflops.get(_DTYPE_ALIASES[key])

    def as_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable copy for results and provenance records."""
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- device


def detect_device(requested: str = "auto") -> torch.device:
    """Turn the `device` option into a torch.device, failing early on typos or missing CUDA.

    "auto" picks CUDA when available, else CPU. "cuda:N" is accepted for a specific GPU.
    """
    req = str(requested).strip().lower()
    base = req.split(":", 1)[0]
    if base not in DEVICE_CHOICES or (base != "cuda" and ":" in req):
        raise ValueError(f"unknown device {requested!r}; choose one of {', '.join(DEVICE_CHOICES)} (or cuda:N)")
    if base == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if base == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {requested!r} requested but torch.cuda.is_available() is False")
    return torch.device(req)


def cpu_model_name() -> str:
    """CPU model string: the human-readable part of the cache identity and `device_name`."""
    named = (value for key, value in cpuinfo().items() if key in ("model name", "Model", "Hardware"))  # file order
    return next(named, None) or platform.processor() or platform.machine() or "unknown cpu"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        try:
            return torch.cuda.get_device_name(device)
        except Exception:  # a name is informational; never fail a run over it
            return "cuda"
    if device.type == "cpu":
        return cpu_model_name()
    return device.type


def _system_memory_gib() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


# ----------------------------------------------------------------------------- CPU measurement


def _loadavg_1m() -> float | None:
    """1-minute load average, recorded with a measurement so a low cached peak can be explained."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def _best_time(fn: Callable[[], object], seconds: float) -> float:
    """Fastest of repeated calls after one warm-up, repeating until `seconds` have elapsed.

    The minimum (not the median) is used because this estimates a peak: slower repeats are
    interference, not capability.
    """
    fn()  # warm-up: first-touch pages, thread-pool spin-up, kernel selection
    best = math.inf
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        best = min(best, t1 - t0)
        if t1 - start >= seconds:
            return max(best, 1e-9)


def _gemm_tflops(n: int, dtype: torch.dtype, seconds: float) -> float:
    a = torch.randn(n, n, dtype=torch.float32).to(dtype)
    b = torch.randn(n, n, dtype=torch.float32).to(dtype)
    return 2.0 * n**3 / _best_time(lambda: torch.matmul(a, b), seconds) / 1e12


def measure_cpu(seconds: float = 0.5, sizes: tuple[int, ...] = (1024, 2048)) -> dict[str, Any]:
    """Measure this CPU's practical peaks with the same library calls the benchmarks use.

    fp32 GEMM TFLOP/s (torch.matmul on square n x n matrices, 2n^3 flops, best over `sizes`),
    bf16 GEMM TFLOP/s when a small probe shows bf16 is not emulated so slowly that measuring it
    would blow the time budget (otherwise None), and copy bandwidth GB/s (`dst.copy_(src)` of a
    256 MiB buffer, counting read + write bytes). `seconds` is the time budget of each
    individual measurement, so the total is a few times `seconds` plus warm-ups.
    """
    if seconds <= 0:
        raise ValueError("seconds must be positive")
    load_before = _loadavg_1m()
    t_start = time.perf_counter()
    gemm: dict[str, dict[str, float]] = {"float32": {}, "bfloat16": {}}
    with torch.inference_mode():
        for n in sizes:
            gemm["float32"][str(n)] = _gemm_tflops(n, torch.float32, seconds)
        fp32_peak = max(gemm["float32"].values())

        # bf16 probe: on CPUs without native bf16 (no AVX512-BF16/AMX) matmul can be >10x slower
        # than fp32; only measure the sizes whose predicted single-call time fits the budget.
        bf16_note = "measured"
        try:
            probe_tflops = _gemm_tflops(256, torch.bfloat16, min(seconds, 0.02))
        except RuntimeError as exc:  # bf16 matmul unsupported on this build/CPU
            probe_tflops, bf16_note = 0.0, f"skipped: {exc}"
        for n in sizes:
            if probe_tflops > 0 and 2.0 * n**3 / (probe_tflops * 1e12) <= seconds:
                gemm["bfloat16"][str(n)] = _gemm_tflops(n, torch.bfloat16, seconds)
        if not gemm["bfloat16"] and bf16_note == "measured":
            bf16_note = f"skipped: probe {probe_tflops:.4f} TFLOP/s too slow for the time budget"
        bf16_peak = max(gemm["bfloat16"].values()) if gemm["bfloat16"] else None

        numel = COPY_BUFFER_BYTES // 4
        src = torch.ones(numel, dtype=torch.float32)
        dst = torch.empty_like(src)
        copy_s = _best_time(lambda: dst.copy_(src), seconds)
        copy_gbs = 2 * COPY_BUFFER_BYTES / copy_s / 1e9

    load_after = _loadavg_1m()
    if load_before is not None and load_before >= max(0.5, 0.25 * (os.cpu_count() or 1)):
        # Other processes compete for the cores: the numbers are lower bounds, and they get cached.
        log.warning(
            "measure_cpu started at 1-min load average %.2f (%d cores); peaks may be underestimated. "
            "Delete the cache file to re-measure on an idle machine.",
            load_before,
            os.cpu_count() or 0,
        )
    return {
        "peak_tflops": {"float32": fp32_peak, "bfloat16": bf16_peak},
        "mem_bandwidth_gbs": copy_gbs,
        "gemm_tflops": gemm,
        "bfloat16": bf16_note,
        "copy_buffer_bytes": COPY_BUFFER_BYTES,
        "num_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "seconds_per_measurement": seconds,
        "wall_s": time.perf_counter() - t_start,
        "loadavg_1m_before": load_before,
        "loadavg_1m_after": load_after,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def cpu_identity() -> dict[str, Any]:
    """What a cached CPU measurement is valid for: a change in any of these re-measures."""
    return {"cpu_model": cpu_model_name(), "num_threads": torch.get_num_threads(), "torch_version": torch.__version__}


def default_cache_dir() -> Path:
    """$ATTNBENCH_CACHE_DIR, else ~/.cache/attnbench."""
    env = os.environ.get("ATTNBENCH_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "attnbench"


def _cache_path(cache_dir: Path, identity: Mapping[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir / f"cpu_profile_{digest}.json"


def _positive_finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _read_cache(path: Path, identity: Mapping[str, Any]) -> dict[str, Any] | None:
    """Cached measurement if the file is readable, for this identity, and sane; else None."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        m = data["measurement"]
        if data.get("format") != CACHE_FORMAT or data.get("identity") != dict(identity):
            return None
        bf16 = m["peak_tflops"].get("bfloat16")
        if not (_positive_finite(m["peak_tflops"]["float32"]) and _positive_finite(m["mem_bandwidth_gbs"])):
            return None
        if bf16 is not None and not _positive_finite(bf16):
            return None
        return m
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _write_cache(path: Path, identity: Mapping[str, Any], measurement: Mapping[str, Any]) -> None:
    """Atomic write (temp file + rename) so concurrent runs never read a half-written file."""
    payload = {"format": CACHE_FORMAT, "identity": dict(identity), "measurement": dict(measurement)}
    try:
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(payload, indent=2, sort_keys=True)))
    except OSError as exc:  # read-only home etc.: the run still gets its numbers
        log.warning("could not write hardware cache %s: %s", path, exc)


def cached_cpu_measurement(cache_dir: Path | None = None) -> tuple[dict[str, Any], Path, bool]:
    """(measurement, cache file, read_from_cache). Measures and writes the cache on a miss."""
    identity = cpu_identity()
    path = _cache_path(Path(cache_dir) if cache_dir is not None else default_cache_dir(), identity)
    cached = _read_cache(path, identity)
    if cached is not None:
        return cached, path, True
    if path.exists():
        log.warning("hardware cache %s is unreadable or stale; re-measuring", path)
    log.info("measuring CPU peaks once for %s (cached at %s)", identity, path)
    measurement = measure_cpu()
    _write_cache(path, identity, measurement)
    return measurement, path, False


# ----------------------------------------------------------------------------- profiles


def _to_dict(cfg: Mapping[str, Any] | DictConfig) -> dict[str, Any]:
    if isinstance(cfg, DictConfig):
        out = OmegaConf.to_container(cfg, resolve=True)
        assert isinstance(out, dict)
        return out
    return dict(cfg)


def load_profile_spec(path: Path) -> dict[str, Any]:
    """One `conf/hardware/*.yaml` as a plain dict (the `# @package` line is just a comment here)."""
    out = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(out, dict):
        raise ValueError(f"{path}: expected a mapping")
    return out


def available_profiles(conf_dir: Path = DEFAULT_CONF_DIR) -> list[str]:
    """Profile names (file stems) under conf_dir, for error messages and listings."""
    return sorted(p.stem for p in Path(conf_dir).glob("*.yaml"))


def match_profile(device_name: str, conf_dir: Path = DEFAULT_CONF_DIR) -> dict[str, Any] | None:
    """Profile spec whose `match` substrings occur in a CUDA device name, or None.

    Matching is case-insensitive. A profile's optional `exclude` substrings veto it (e.g. "H200"
    also occurs in "GH200" and "H200 NVL", which are different parts). When several profiles
    match, the longest matched substring wins (most specific); ties go to the first file name.
    """
    lowered = device_name.lower()
    best: tuple[int, dict[str, Any]] | None = None
    for path in sorted(Path(conf_dir).glob("*.yaml")):
        spec = load_profile_spec(path)
        patterns = [str(s) for s in spec.get("match") or []]
        if any(str(x).lower() in lowered for x in spec.get("exclude") or []):
            continue
        hits = [len(p) for p in patterns if p and p.lower() in lowered]
        if hits and (best is None or max(hits) > best[0]):
            best = (max(hits), spec)
    return best[1] if best else None


def _peaks(raw: Mapping[str, Any] | None) -> dict[str, float | None]:
    peaks: dict[str, float | None] = {k: None for k in PEAK_KEYS}
    for key, value in (raw or {}).items():
        peaks[str(key)] = None if value is None else float(value)
    return peaks


def _opt_float(x: Any) -> float | None:
    return None if x is None else float(x)


def _from_spec(spec: Mapping[str, Any], device_name: str) -> HardwareProfile:
    return HardwareProfile(
        name=str(spec["name"]),
        device_type=str(spec.get("device_type", "cuda")),
        device_name=device_name,
        peak_tflops=_peaks(spec.get("peak_tflops")),
        mem_bandwidth_gbs=_opt_float(spec.get("mem_bandwidth_gbs")),
        memory_gib=_opt_float(spec.get("memory_gib")),
        measured=False,
        source=str(spec.get("source", "")),
    )


def _unknown_profile(device: torch.device, device_name: str) -> HardwareProfile:
    memory_gib = None
    if device.type == "cuda":
        try:
            memory_gib = torch.cuda.get_device_properties(device).total_memory / 2**30
        except Exception:  # informational only
            memory_gib = None
        source = f"unknown GPU: {device_name}; add a profile under conf/hardware"
    else:
        source = f"no profile for device type {device.type!r}: {device_name}; add a profile under conf/hardware"
    return HardwareProfile(
        name="unknown",
        device_type=device.type,
        device_name=device_name,
        peak_tflops=_peaks(None),
        mem_bandwidth_gbs=None,
        memory_gib=memory_gib,
        measured=False,
        source=source,
    )


def _measured_profile(spec: Mapping[str, Any], cache_dir: Path | None) -> HardwareProfile:
    """CPU profile: cached measurement fills every peak the config leaves null."""
    measurement, path, from_cache = cached_cpu_measurement(cache_dir)
    peaks = _peaks(spec.get("peak_tflops"))
    for key, value in measurement["peak_tflops"].items():
        if peaks.get(key) is None and value is not None:
            peaks[key] = float(value)
    bandwidth = _opt_float(spec.get("mem_bandwidth_gbs"))
    if bandwidth is None:
        bandwidth = float(measurement["mem_bandwidth_gbs"])
    memory_gib = _opt_float(spec.get("memory_gib"))
    return HardwareProfile(
        name=str(spec.get("name", "cpu")),
        device_type="cpu",
        device_name=cpu_model_name(),
        peak_tflops=peaks,
        mem_bandwidth_gbs=bandwidth,
        memory_gib=memory_gib if memory_gib is not None else _system_memory_gib(),
        measured=True,
        source=f"measured by bench.measure.hardware.measure_cpu ({'cached' if from_cache else 'fresh'}: {path})",
        details=dict(measurement),
    )


def resolve_profile(
    cfg: Mapping[str, Any] | DictConfig,
    device: torch.device | str,
    conf_dir: Path = DEFAULT_CONF_DIR,
    cache_dir: Path | None = None,
) -> HardwareProfile:
    """The profile a run is measured against, from the `hardware` config group and the device.

    - `name: auto`: on CUDA the profile matching torch.cuda.get_device_name() (an unknown GPU
      gets a profile with null peaks, never an error); on CPU the `cpu` profile.
    - `measure: true` (the `cpu` profile): measure once per CPU identity and cache in cache_dir
      (default $ATTNBENCH_CACHE_DIR or ~/.cache/attnbench); a corrupt cache is re-measured.
    - any other name is returned as configured, even if the device differs (a GPU profile on a
      CPU machine is allowed); `device_name` records the actual device.
    A cfg carrying only `name` is completed from conf_dir/<name>.yaml, cfg keys winning.
    """
    spec = _to_dict(cfg)
    device = torch.device(device)
    conf_dir = Path(conf_dir)
    name = spec.get("name")
    if not name:
        raise ValueError(f"hardware config needs a `name`; available: {available_profiles(conf_dir)}")

    if name == "auto":
        if device.type == "cuda":
            device_name = _device_name(device)
            matched = match_profile(device_name, conf_dir)
            return _from_spec(matched, device_name) if matched else _unknown_profile(device, device_name)
        if device.type != "cpu":
            return _unknown_profile(device, _device_name(device))
        cpu_yaml = conf_dir / "cpu.yaml"
        spec = load_profile_spec(cpu_yaml) if cpu_yaml.exists() else {"name": "cpu", "measure": True}

    if "peak_tflops" not in spec and not spec.get("measure"):
        path = conf_dir / f"{spec['name']}.yaml"
        if not path.exists():
            raise ValueError(f"no hardware profile {spec['name']!r}; available: {available_profiles(conf_dir)}")
        spec = {**load_profile_spec(path), **spec}

    if spec.get("measure"):
        return _measured_profile(spec, cache_dir)
    return _from_spec(spec, _device_name(device))
