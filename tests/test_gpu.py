"""What only a GPU can check (`pytest -m gpu`; scripts/gpu_check.sh runs it on a lent GPU machine).

The CPU suite runs the Triton kernels under the interpreter, which neither compiles them nor runs them at
realistic sizes, and it never touches CUDA timing or memory. Here, on CUDA:

* every registered `kernel` implementation, compiled, against its method's `reference` at B=1, H=8, N=1024,
  D=64 in fp16, bf16 and fp32, causal and not as its capabilities claim: the repo's rule (FlashAttention's),
  the kernel's max-abs error against the fp64 truth <= 2x the reference's error in the same dtype + a floor;
  the truth is the oracle for exact methods and the reference in fp64 for approximate ones (as in the contract
  test), the floor is scaled by the truth's magnitude (linear methods' outputs are not bounded by |v|);
* backward likewise, for the kernels whose capabilities claim it (the gradients of their `grad_inputs`);
* CUDA timing (events, L2 flush) gives positive finite samples; CUDA peak memory sees naive softmax's
  N x N scores that SDPA does not hold.

Without CUDA every test skips, so the CPU CI still collects this file: it cannot rot unnoticed.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from helpers import FLOOR, max_err

from bench.measure.memory import measure_peak_memory
from bench.measure.timing import TimingConfig, measure_latency
from methods import METHODS, build, get_method
from methods.oracle import oracle_attention

CUDA = torch.device("cuda")
B, H, N, D = 1, 8, 1024, 64
DTYPES = [torch.float16, torch.bfloat16, torch.float32]

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
# tests/conftest.py defaults TRITON_INTERPRET to 1 for the CPU suite; interpreted kernels would prove nothing here.
compiled_only = pytest.mark.skipif(
    torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "1",
    reason="kernels would run interpreted: set TRITON_INTERPRET=0",
)

KERNELS = [(name, impl) for name, spec in METHODS.items() for impl, s in spec.impls.items() if s.kind == "kernel"]
BACKWARD_KERNELS = [(n, i) for n, i in KERNELS if METHODS[n].impls[i].capabilities.backward]


def cases(impls: list[tuple[str, str]]) -> list:
    """(name, impl, dtype, causal) for every pattern and dtype each implementation's capabilities claim."""
    out = []
    for name, impl in impls:
        caps = METHODS[name].impls[impl].capabilities
        for dtype in DTYPES:
            for causal in [c for c, ok in ((False, caps.non_causal), (True, caps.causal)) if ok]:
                if str(dtype).removeprefix("torch.") in caps.dtypes:
                    mark = f"{name}/{impl}-{str(dtype).removeprefix('torch.')}-{'causal' if causal else 'full'}"
                    out.append(pytest.param(name, impl, dtype, causal, id=mark))
    return out


def inputs(dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """fp32 random numbers cast to `dtype` on the GPU; the fp64 truth sees the very same (cast) numbers."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, N, D, generator=gen).to(CUDA, dtype) for _ in range(3))


def make(name: str, impl: str):
    attn = build(name, impl=impl, device=CUDA)  # the method's defaults: the sizes users run
    return attn.to(CUDA) if isinstance(attn, torch.nn.Module) else attn


def truth_fn(name: str, causal: bool):
    """What every implementation of the method must compute, in fp64."""
    if get_method(name).exact:
        return lambda q, k, v: oracle_attention(q, k, v, causal=causal, dtype=torch.float64)
    ref = make(name, "reference")
    return lambda q, k, v: ref(q.double(), k.double(), v.double(), causal=causal)


def bound(ref: torch.Tensor, truth: torch.Tensor, dtype: torch.dtype) -> float:
    scale = max(1.0, float(truth.abs().max())) if truth.numel() else 1.0
    return 2 * max_err(ref, truth) + FLOOR[dtype] * scale


@compiled_only
@pytest.mark.parametrize("name,impl,dtype,causal", cases(KERNELS))
def test_kernel_forward_within_twice_the_reference_error(name, impl, dtype, causal):
    q, k, v = inputs(dtype)
    with torch.no_grad():
        truth = truth_fn(name, causal)(q, k, v)
        ref = make(name, "reference")(q, k, v, causal=causal)
        out = make(name, impl)(q, k, v, causal=causal)
    assert out.shape == ref.shape and out.dtype == dtype and out.device == q.device
    assert out.isfinite().all()
    err, limit = max_err(out, truth), bound(ref, truth, dtype)
    assert err <= limit, f"kernel err {err:.3g} > bound {limit:.3g} (reference err {max_err(ref, truth):.3g})"


def grads(fn, q, k, v, names: tuple[str, ...], grad_out: torch.Tensor) -> list[torch.Tensor]:
    """Gradients of `fn(q, k, v)` for the inputs the output depends on (`capabilities.grad_inputs`)."""
    leaves = {n: t.detach().requires_grad_(n in names) for n, t in zip("qkv", (q, k, v), strict=True)}
    out = fn(leaves["q"], leaves["k"], leaves["v"])
    wanted = [leaves[n] for n in names]
    return list(torch.autograd.grad(out, wanted, grad_out.to(out.dtype)))


@compiled_only
@pytest.mark.parametrize("name,impl,dtype,causal", cases(BACKWARD_KERNELS))
def test_kernel_backward_within_twice_the_reference_error(name, impl, dtype, causal):
    q, k, v = inputs(dtype)
    grad_out = torch.randn(B, H, N, D, generator=torch.Generator().manual_seed(1)).to(CUDA, dtype)
    names = METHODS[name].impls[impl].capabilities.grad_inputs
    truth = grads(truth_fn(name, causal), q.double(), k.double(), v.double(), names, grad_out)
    ref_attn, attn = make(name, "reference"), make(name, impl)
    ref = grads(lambda *t: ref_attn(*t, causal=causal), q, k, v, names, grad_out)
    out = grads(lambda *t: attn(*t, causal=causal), q, k, v, names, grad_out)
    for n, o, r, t in zip(names, out, ref, truth, strict=True):
        assert o.dtype == dtype and o.isfinite().all(), n
        err, limit = max_err(o, t), bound(r, t, dtype)
        assert err <= limit, f"d{n}: kernel err {err:.3g} > bound {limit:.3g} (reference err {max_err(r, t):.3g})"


def test_cuda_timing_gives_positive_finite_samples():
    """CUDA events around each call, an L2 flush before it: the loop the runner uses on a GPU."""
    q, k, v = inputs(torch.bfloat16)
    sdpa = make("softmax", "sdpa")
    cfg = TimingConfig(warmup=2, min_time_s=0.0, min_repeats=10, max_repeats=10)
    timing = measure_latency(torch.no_grad()(lambda: sdpa(q, k, v)), CUDA, cfg)
    assert len(timing.samples_ms) == 10
    assert all(math.isfinite(s) and s > 0 for s in timing.samples_ms), timing.samples_ms
    assert timing.median < 1e3  # milliseconds: a 1024-token forward is far below a second


def test_cuda_peak_memory_sees_the_quadratic_scores():
    """N=4096: the naive reference holds at least one fp16 8 x 4096 x 4096 score matrix (256 MiB); SDPA does not."""
    n = 4096
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, H, n, D, generator=gen).to(CUDA, torch.float16) for _ in range(3))
    naive, sdpa = make("softmax", "reference"), make("softmax", "sdpa")
    with torch.no_grad():
        naive_peak = measure_peak_memory(lambda: naive(q, k, v), CUDA)
        sdpa_peak = measure_peak_memory(lambda: sdpa(q, k, v), CUDA)
    assert naive_peak >= H * n * n * 2, naive_peak
    assert 0 < sdpa_peak < naive_peak / 8, (sdpa_peak, naive_peak)
