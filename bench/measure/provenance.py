"""Where a row came from: code version, packages, machine. Collected once per process."""

from __future__ import annotations

import functools
import os
import platform
import socket
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


@functools.cache
def cpuinfo() -> dict[str, str]:
    """The first non-empty value of every key in /proc/cpuinfo, in file order (the first processor's, and the
    trailing ARM keys such as "Hardware"); empty where there is no such file. The one reader of it: model name,
    architecture, device."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() and value.strip():
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_arch() -> str | None:
    """The host CPU as its vendor, family, model and stepping, with the logical CPU count; None off Linux.

    Why not the model name: clouds mask it ("AMD EPYC" here on a Zen 5 VM and on an earlier session's
    VM alike), and the two ran the reference methods 1.2-1.8x apart relative to SDPA, so a latency
    baseline from one misjudges the other (`bench.compare --same-machine`).
    """
    fields = cpuinfo()
    parts = [fields.get("vendor_id") or fields.get("CPU implementer")]
    parts += [f"{name} {fields[key]}" for name, key in (("family", "cpu family"), ("model", "model"),
              ("stepping", "stepping"), ("part", "CPU part")) if fields.get(key)]  # fmt: skip
    parts = [p for p in parts if p]
    return f"{' '.join(parts)}, {os.cpu_count()} cpus" if parts else None


@functools.cache
def provenance() -> dict:
    """git commit and dirty flag, package versions, the host CPU and name; the same for every row of a process."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "torch_version": torch.__version__,
        "triton_version": triton_version,
        "python_version": platform.python_version(),
        "machine": cpu_arch(),
        "host": socket.gethostname(),  # which node of a cluster (or box of a campaign) wrote the row
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {cpuinfo().get('model name') or platform.processor() or platform.machine()}"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
