"""Helpers shared by the tests (accuracy rules, result rows).

Imported as `from helpers import ...`: pytest puts `tests/` on `sys.path` (rootdir conftest, no
`__init__.py`); test modules import shared helpers from here, never from each other.

The accuracy rule these serve (FlashAttention's own test rule): an implementation's max-abs error against
the fp64 oracle may be at most twice that of the PyTorch reference in the same dtype, plus `FLOOR`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from bench.results import CORE_COLUMNS, SCHEMA_VERSION
from methods import Attention, build

# The absolute slack of the rule per dtype, for references that are exact to rounding.
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def max_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Max-abs difference, computed in fp64; 0 when `out` is empty."""
    return float((out.detach().double() - ref.detach().double()).abs().max()) if out.numel() else 0.0


def make_row(cell_id: str, **values) -> dict:
    """A runner-like row: every core column present, a compiled scaling fwd cell unless told otherwise."""
    row = dict.fromkeys(CORE_COLUMNS)
    row.update(
        schema_version=SCHEMA_VERSION,
        run_id="run-1",
        cell_id=cell_id,
        method="softmax",
        impl="torch",
        family="softmax",
        task="scaling",
        suite="smoke",
        hardware="h100_sxm",
        device="NVIDIA H100 80GB HBM3",
        dtype="float16",
        batch=1,
        heads=8,
        seq_len=1024,
        kv_len=1024,
        head_dim=64,
        causal=True,
        mode="fwd",
        status="ok",
        reason="",
        latency_ms=1.0,
        latency_ms_p10=0.9,
        latency_ms_p90=1.1,
        latency_samples_ms=[0.9, 1.0, 1.1],
        peak_mem_bytes=64 * 2**20,
        flops=10**9,
        tflops=1.0,
        pct_peak=0.1,
        fidelity_max_abs=1e-3,
        fidelity_rel=2e-4,
        git_commit="0123456789abcdef0123",
        git_dirty=True,
        torch_version="2.13.0",
        triton_version="3.7.1",
        python_version="3.11.9",
        seed=0,
        config_yaml="",
        timestamp="2026-01-01T00:00:00+00:00",
        impl_kind="reference",
        exact=True,
        interpreted=False,
        input_dist="gaussian",
        threads=16,
        repeats=10,
        method_params="{}",
        cell_seconds=1.5,
    )
    row.update(values)
    return row


def attention_factory(method: str, impl: str = "reference", **params) -> Callable[[], Attention]:
    """What the runner hands a task: a factory of fresh instances of one method implementation."""
    return lambda: build(method, impl=impl, **params)


# --- DeltaNet: the naive oracle shared by the reference's and the kernel's tests -------------------------------------


def deltanet_inputs(n, d_k=32, d_v=None, dtype=torch.float32, b=1, h=2):
    """Random (q, k, v) of `n` tokens: q and k with head dim `d_k`, v with `d_v` (default `d_k`)."""
    d_v = d_k if d_v is None else d_v
    return torch.randn(b, h, n, d_k).to(dtype), torch.randn(b, h, n, d_k).to(dtype), torch.randn(b, h, n, d_v).to(dtype)


def naive_deltanet(q, k, v, w_beta, scale=None, activation="identity"):
    """fp64, one token at a time, every step written out: the definition DeltaNet's implementations must meet.

    The paper's form `S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T` with the whole preparation
    (normalisation, beta) written out again, sharing no code with `methods/deltanet.py`. Query i reads the
    state after token i + n_k - n_q (bottom-right alignment); earlier queries output 0.
    """
    q, k, v, w_beta = q.double(), k.double(), v.double(), w_beta.double()
    b, h, n, d_k = k.shape
    n_q = q.shape[-2]
    d_v = v.shape[-1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    beta = torch.sigmoid(torch.einsum("bhnd,d->bhn", k, w_beta))
    act = torch.nn.functional.silu if activation == "silu" else (lambda x: x)
    q, k = act(q), act(k)
    q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6) * scale
    k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    eye = torch.eye(d_k, dtype=torch.float64)
    state = torch.zeros(b, h, d_k, d_v, dtype=torch.float64)
    out = torch.zeros(b, h, n_q, d_v, dtype=torch.float64)
    for t in range(n):
        kt, bt = k[:, :, t], beta[:, :, t, None, None]
        transition = eye - bt * kt[..., :, None] * kt[..., None, :]
        state = transition @ state + bt * kt[..., :, None] * v[:, :, t, None, :]
        i = t - (n - n_q)  # the query sitting at token t, if any
        if 0 <= i < n_q:
            out[:, :, i] = (q[:, :, i, None, :] @ state)[:, :, 0]
    return out
