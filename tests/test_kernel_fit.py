"""Every Triton kernel configuration the GPU path can choose compiles for sm_80 and sm_90 and fits there.

`bench.kernel_fit` records the launches the registered kernel implementations make (forward, backward,
decode; fp16/bf16/fp32; head dims 32-256) with the GPU's tile choices, and compiles them with Triton's
compiler for an A100 and an H100 target, no GPU needed. It must run without the interpreter, so it runs in
a subprocess here (tests/conftest.py sets TRITON_INTERPRET=1 for this process).

The default run compiles one launch per distinct tile shape; results are cached by Triton's source hash in
the committed `results/baselines/kernel_fit.json`, so only kernels changed since the cache was written are
compiled again. The full sweep (`--all`, every configuration, about 20 minutes on 2 cores) is marked slow.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.kernel_fit import DEFAULT_CACHE, LIMITS, SPILL_BUDGET_BYTES, CompileResult
from methods import METHODS

ROOT = Path(__file__).resolve().parents[1]


def run_python(*args: str, timeout: int = 1500) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def fit(tmp_path: Path, *flags: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """Run the tool on a copy of the committed cache (the test never rewrites the repo's copy)."""
    cache = tmp_path / "cache.json"
    if (ROOT / DEFAULT_CACHE).exists():
        shutil.copy(ROOT / DEFAULT_CACHE, cache)
    out = tmp_path / "results.json"
    proc = run_python("-m", "bench.kernel_fit", "--cache", str(cache), "--json", str(out), *flags)
    assert out.exists(), proc.stdout + proc.stderr
    return proc, json.loads(out.read_text())


def check_every_configuration_fits(proc: subprocess.CompletedProcess, results: list[dict]) -> None:
    # Every cell a kernel claims was driven through, or refused by a stated limit (a one-line "not supported").
    refused = [line for line in proc.stdout.splitlines() if "refused:" in line]
    assert all("not supported" in line for line in refused), "\n".join(refused)
    assert {r["arch"] for r in results} == set(LIMITS)
    bad = [CompileResult(**r).line() for r in results if CompileResult(**r).fails()]
    assert not bad, "\n".join(bad)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_each_distinct_tile_shape_fits_both_targets(tmp_path):
    proc, results = fit(tmp_path)
    check_every_configuration_fits(proc, results)
    # Forward and backward kernels of every kind were recorded: the tool saw what the GPU path launches.
    kernels = {r["kernel"] for r in results}
    expected = {
        "flash_fwd._flash_fwd_kernel", "flash_bwd._dq_kernel", "flash_bwd._dkdv_kernel",
        "block_sparse._block_sparse_fwd_kernel", "block_sparse_bwd._bs_dq_kernel", "block_sparse_bwd._bs_dkdv_kernel",
        "chunked_linear._chunked_linear_fwd_kernel", "chunked_linear_bwd._dq_kernel", "chunked_linear_bwd._dkdv_kernel",
        "deltanet_chunk._deltanet_chunk_fwd_kernel", "deltanet_chunk_bwd._deltanet_chunk_bwd_kernel",
    }  # fmt: skip
    assert expected <= kernels, expected - kernels
    origins = {r["origin"].split(" ")[0] for r in results}
    kernel_impls = {f"{n}/{i}" for n, s in METHODS.items() for i, spec in s.impls.items() if spec.kind == "kernel"}
    assert origins <= kernel_impls
    assert any("fwd_bwd" in r["origin"] for r in results) and any("decode" in r["origin"] for r in results)


@pytest.mark.slow
def test_every_configuration_fits_both_targets(tmp_path):
    check_every_configuration_fits(*fit(tmp_path, "--all"))


OVERSIZED = """
import sys, torch, triton, triton.language as tl
from bench.kernel_fit import compile_launch, record_launches

@triton.jit
def deep_pipeline(X, Y, N, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    for k in range(0, N, BLOCK):
        a = tl.load(X + offs[:, None] * N + (k + offs[None, :]))
        b = tl.load(X + (k + offs[:, None]) * N + offs[None, :])
        acc = tl.dot(a, b, acc)
    tl.store(Y + offs[:, None] * BLOCK + offs[None, :], acc)

with record_launches() as recording:
    x = torch.zeros(1024, 1024, dtype=torch.float16)
    deep_pipeline[(1,)](x, x, 1024, BLOCK=128, num_warps=8, num_stages=6)
result = compile_launch(recording.launches[0], int(sys.argv[1]))
print(result.shared_bytes, "|".join(result.problems()))
"""


@pytest.mark.parametrize("arch", sorted(LIMITS))
def test_a_kernel_over_the_targets_shared_memory_is_reported(tmp_path, arch):
    """Six pipeline stages of two 128 x 128 fp16 tiles stage 320-384 KB: more than either target has."""
    script = tmp_path / "oversized.py"
    script.write_text(OVERSIZED)
    proc = run_python(str(script), str(arch), timeout=300)
    assert proc.returncode == 0, proc.stderr
    shared, problems = proc.stdout.strip().splitlines()[-1].split(" ", 1)
    assert int(shared) > LIMITS[arch]
    assert problems.startswith(f"shared memory {int(shared) / 1024:.1f} KB > {LIMITS[arch] // 1024} KB")


def test_verdicts_name_the_limit_crossed():
    fits = CompileResult("k", 80, "", "", 1024, 64, 0, 1.0)
    assert fits.problems() == []
    over = CompileResult("k", 80, "", "", LIMITS[80] + 1, 64, 0, 1.0)
    assert over.problems() == ["shared memory 163.0 KB > 163 KB"]
    assert CompileResult("k", 90, "", "", LIMITS[80] + 1, 64, 0, 1.0).problems() == []  # fits an H100
    spilling = CompileResult("k", 90, "", "", 1024, 255, SPILL_BUDGET_BYTES[2] + 8, 1.0)
    assert spilling.problems() == [f"spills {SPILL_BUDGET_BYTES[2] + 8} B > {SPILL_BUDGET_BYTES[2]} B"]
    fp32 = CompileResult("k", 90, "", "", 1024, 255, SPILL_BUDGET_BYTES[2] + 8, 1.0, element_bytes=4)
    assert fp32.problems() == []  # fp32's budget is larger: its exact products hold operands in registers
    broken = CompileResult("k", 90, "", "", None, None, None, 1.0, error="PassManager::run failed")
    assert broken.problems() == ["compile error: PassManager::run failed"]


def test_refuses_to_run_under_the_interpreter():
    proc = subprocess.run(
        [sys.executable, "-m", "bench.kernel_fit"],
        cwd=ROOT,
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode != 0 and "without TRITON_INTERPRET=1" in proc.stderr
