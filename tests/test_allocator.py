"""Huge-page CPU allocations: a large tensor faults per 2 MiB page, not per 4 KiB one, and rows can say so.

Run in child processes, because torch reads the switch once, at its first allocation. No timing is
asserted: page faults are counted (getrusage), which the kernel reports exactly.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.measure.allocator import thp_mode

CHILD = """
import resource
import bench  # first, as `python -m bench.run` imports it: sets the switch unless the environment has it
import torch
from bench.measure.allocator import cpu_thp_alloc
def faults_of_one_allocation():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.empty(64 * 2**20 // 4)
    x.fill_(1.0)  # touch every page
    del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(max(faults_of_one_allocation() for _ in range(3)), cpu_thp_alloc())
"""
PAGES = 64 * 2**20 // 4096
ROOT = Path(__file__).resolve().parent.parent
needs_thp = pytest.mark.skipif(thp_mode() not in ("always", "madvise"), reason="the kernel gives no huge pages")


def children(*switches: str | None) -> list[tuple[int, str]]:
    """Each switch in its own child process, started together (each mostly imports torch)."""
    started = []
    for switch in switches:
        env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
        if switch is not None:
            env["THP_MEM_ALLOC_ENABLE"] = switch
        started.append(subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, cwd=ROOT, env=env))  # fmt: skip
    out = []
    for proc in started:
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
        faults, thp = stdout.split()
        out.append((int(faults), thp))
    return out


@needs_thp
def test_bench_turns_huge_page_allocations_on_and_the_environment_can_turn_them_off() -> None:
    """On by default, with rows able to say so; the control: with the switch off, the same tensor is faulted
    in per 4 KiB page (unless the kernel's THP mode is `always`)."""
    (faults, thp), (faults_off, thp_off) = children(None, "0")
    assert thp == "True"
    assert faults < PAGES // 10, f"{faults} faults for a 64 MiB tensor: huge pages expected (~32)"
    assert thp_off == "False"
    if thp_mode() == "madvise":
        assert faults_off >= PAGES // 2


def test_thp_mode_reads_the_kernels_choice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bench.measure import allocator

    mode = tmp_path / "enabled"
    mode.write_text("always [madvise] never\n")
    monkeypatch.setattr(allocator, "THP_MODE", mode)
    assert allocator.thp_mode() == "madvise"
    monkeypatch.setattr(allocator, "THP_MODE", tmp_path / "missing")
    assert allocator.thp_mode() is None
