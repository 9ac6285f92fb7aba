"""DeltaNet's Triton backward (`methods/kernels/deltanet_chunk_bwd.py`) under Triton's interpreter on CPU.

Two levels, each held to the repo's rule for backward kernels (as `test_flash_bwd.py`): a kernel gradient's
max-abs error against the fp64 truth may be at most twice that of the same computation in PyTorch in the
same dtype, plus `FLOOR`.

* the chunk loop alone, `deltanet_chunk_loop(q, k, W, U)`: gradients of all four against autograd through
  the same loop written in PyTorch (`_torch_loop`), which isolates the hand-written backward;
* the whole differentiable entry `deltanet_chunk(q, k, v, beta)` (WY factors under autograd) and the
  registered `deltanet/kernel` (preparation and `w_beta` included), against the reference's autograd and the
  naive recurrence in fp64.

Lengths 1, 37 and 71 leave a partial last chunk; chunk 16 gives several chunks at small cost; head dims 24
and 40 are not powers of two (padded tiles) and d_k != d_v.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import FLOOR, deltanet_inputs, max_err, naive_deltanet

import methods.kernels.deltanet_chunk_bwd as bwd
from methods import build
from methods.deltanet import delta_rule_chunked, l2_normalize
from methods.kernels.deltanet_chunk import LaunchConfig, deltanet_chunk_forward
from methods.kernels.deltanet_chunk_bwd import deltanet_chunk, deltanet_chunk_loop
from methods.kernels.wy import wy_factors


def _torch_loop(q, k, w, u, chunk_size: int) -> torch.Tensor:
    """The kernel's loop in PyTorch: `U' = U_i - W_i S; O_i = Q_i S + tril(Q_i K_i^T) U'; S += K_i^T U'`."""
    b, h, n, d_k = k.shape
    pad = (-n) % chunk_size
    q, k, w, u = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, w, u))
    state = k.new_zeros(b, h, d_k, u.shape[-1])
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool).tril()
    outs = []
    for i in range(0, n + pad, chunk_size):
        qi, ki, wi, ui = (t[:, :, i : i + chunk_size] for t in (q, k, w, u))
        u_new = ui - wi @ state
        outs.append(qi @ state + (qi @ ki.transpose(-1, -2)).masked_fill(~causal, 0.0) @ u_new)
        state = state + ki.transpose(-1, -2) @ u_new
    return torch.cat(outs, dim=2)[:, :, :n]


def _prepared(n: int, d_k: int, d_v: int, dtype: torch.dtype = torch.float32):
    """(q, k, v, beta) as `DeltaNetReference.prepare` makes them: unit keys, scaled unit queries, beta in (0, 1)."""
    q, k, v = deltanet_inputs(n, d_k=d_k, d_v=d_v)
    q = l2_normalize(q) * d_k**-0.5
    beta = torch.sigmoid(torch.randn(*k.shape[:3]))
    return tuple(t.to(dtype) for t in (q, l2_normalize(k), v, beta))


def _grads(fn, inputs, grad_out, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, ...]:
    """Gradients of `fn(*inputs)` for `grad_out`, with fresh leaves (cast to `dtype` if given)."""
    leaves = [(t if dtype is None else t.to(dtype)).detach().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return torch.autograd.grad(out, leaves, grad_out.to(out.dtype))


def _check_rule(names: str, kernel, exact, reference, inputs, floor: float) -> None:
    for name, g, e, r, x in zip(names, kernel, exact, reference, inputs, strict=True):
        assert g.shape == x.shape and g.dtype == x.dtype, name
        assert g.isfinite().all(), f"d{name} has non-finite entries"
        kernel_err, ref_err = max_err(g, e), max_err(r, e)
        bound = 2 * ref_err + floor
        assert kernel_err <= bound, f"d{name}: kernel err {kernel_err:.3g} > bound {bound:.3g} (ref err {ref_err:.3g})"


# --- the chunk loop alone ---------------------------------------------------------------------------------------------

LOOP_CASES = [(1, 24, 40, 16), (37, 24, 40, 16), (71, 32, 16, 64), (71, 16, 48, 16)]  # (n, d_k, d_v, chunk)


def _loop_inputs(n: int, d_k: int, d_v: int, chunk: int) -> tuple[torch.Tensor, ...]:
    """(q, k, W, U) with W, U the real WY factors (random ones would let the state grow chunk after chunk)."""
    q, k, v, beta = _prepared(n, d_k, d_v)
    _, w, u = wy_factors(k, v, beta, chunk)
    return q, k, w.reshape(1, 2, -1, d_k)[:, :, :n], u.reshape(1, 2, -1, d_v)[:, :, :n]


@pytest.mark.parametrize("n,d_k,d_v,chunk", LOOP_CASES, ids=[f"n{a}-dk{b}-dv{c}-c{d}" for a, b, c, d in LOOP_CASES])
def test_loop_grads_match_the_torch_loop(n: int, d_k: int, d_v: int, chunk: int) -> None:
    inputs = _loop_inputs(n, d_k, d_v, chunk)
    grad_out = torch.randn(1, 2, n, d_v)
    kernel = _grads(lambda *t: deltanet_chunk_loop(*t, chunk_size=chunk), inputs, grad_out)
    exact = _grads(lambda *t: _torch_loop(*t, chunk), inputs, grad_out, torch.float64)
    reference = _grads(lambda *t: _torch_loop(*t, chunk), inputs, grad_out)
    _check_rule("qkwu", kernel, exact, reference, inputs, FLOOR[torch.float32])


def test_loop_value_blocks_and_strides(monkeypatch) -> None:
    """d_v split over three programs (the GPU's scheme, forced here): dq, dk, dw are the sum of the partials.
    Strided inputs and a transposed grad_out give the same gradients as contiguous copies."""
    monkeypatch.setattr(bwd, "choose_backward_config", lambda *a: LaunchConfig(32, 16, num_warps=4, num_stages=1))
    n, d_k, d_v, chunk = 37, 24, 40, 16
    inputs = _loop_inputs(n, d_k, d_v, chunk)
    grad_out = torch.randn(1, n, 2, d_v).transpose(1, 2)
    strided = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in inputs]
    assert not any(t.is_contiguous() for t in (*strided, grad_out))
    loop = lambda *t: deltanet_chunk_loop(*t, chunk_size=chunk)  # noqa: E731
    kernel = _grads(loop, strided, grad_out)
    exact = _grads(lambda *t: _torch_loop(*t, chunk), inputs, grad_out, torch.float64)
    reference = _grads(lambda *t: _torch_loop(*t, chunk), inputs, grad_out)
    _check_rule("qkwu", kernel, exact, reference, inputs, FLOOR[torch.float32])
    copied = _grads(loop, inputs, grad_out.contiguous())
    for g, h in zip(kernel, copied, strict=True):
        torch.testing.assert_close(g, h, rtol=0, atol=0)


def test_loop_tensor_core_path_fp16(monkeypatch) -> None:
    """The GPU's 16-bit branch (fp16 operands, fp32 accumulation), forced under the interpreter, whose fp16
    `tl.dot` is sound (its bf16 one is not): checks that branch's casts on CPU."""
    monkeypatch.setattr(bwd, "dot_fp32", lambda dtype: False)
    n, d_k, d_v, chunk = 37, 24, 40, 16
    inputs = tuple(t.half() for t in _loop_inputs(n, d_k, d_v, chunk))
    grad_out = torch.randn(1, 2, n, d_v).half()
    kernel = _grads(lambda *t: deltanet_chunk_loop(*t, chunk_size=chunk), inputs, grad_out)
    exact = _grads(lambda *t: _torch_loop(*t, chunk), inputs, grad_out, torch.float64)
    # PyTorch's loop in fp16 rounds its state every chunk: the same-dtype reference the rule allows 2x of.
    reference = _grads(lambda *t: _torch_loop(*t, chunk), inputs, grad_out)
    _check_rule("qkwu", kernel, exact, reference, inputs, FLOOR[torch.float16])


# --- the differentiable entry: W, U under autograd ---------------------------------------------------------------------

ENTRY_CASES = [(1, 24, 40, 64), (37, 24, 40, 16), (71, 32, 32, 64), (71, 40, 24, 16)]  # (n, d_k, d_v, chunk)


@pytest.mark.parametrize("n,d_k,d_v,chunk", ENTRY_CASES, ids=[f"n{a}-dk{b}-dv{c}-c{d}" for a, b, c, d in ENTRY_CASES])
def test_entry_grads_match_fp64_truth(n: int, d_k: int, d_v: int, chunk: int) -> None:
    inputs = _prepared(n, d_k, d_v)
    grad_out = torch.randn(1, 2, n, d_v)
    reference_fn = lambda *t: delta_rule_chunked(*t, chunk_size=chunk)[0]  # noqa: E731
    kernel = _grads(lambda *t: deltanet_chunk(*t, chunk_size=chunk), inputs, grad_out)
    exact = _grads(reference_fn, inputs, grad_out, torch.float64)
    reference = _grads(reference_fn, inputs, grad_out)
    _check_rule(("q", "k", "v", "beta"), kernel, exact, reference, inputs, FLOOR[torch.float32])


def test_without_grad_it_is_the_forward_kernel() -> None:
    """No input requiring grad (or no_grad): exactly `deltanet_chunk_forward`, nothing stored. With grad, the
    state-storing launch computes the same output."""
    q, k, v, beta = _prepared(71, 24, 40)
    plain = deltanet_chunk_forward(q, k, v, beta, 16)[0]
    out = deltanet_chunk(q, k, v, beta, 16)
    assert out.grad_fn is None and torch.equal(out, plain)
    q.requires_grad_()
    with torch.no_grad():
        assert deltanet_chunk(q, k, v, beta, 16).grad_fn is None
    trained = deltanet_chunk(q, k, v, beta, 16)
    assert trained.grad_fn is not None
    torch.testing.assert_close(trained.detach(), plain, rtol=0, atol=1e-6)


# --- the registered method ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n_q,n_k,dtype",
    [(37, 37, torch.float32), (20, 71, torch.float32), (37, 37, torch.float16)],
    ids=["self-fp32", "cross-fp32", "self-fp16"],
)
def test_registered_kernel_backward_matches_reference(n_q: int, n_k: int, dtype: torch.dtype) -> None:
    """`deltanet/kernel` vs `deltanet/reference` through `prepare` (normalisation, beta = sigmoid(k w_beta)),
    gradients of q, k, v and w_beta, against the naive fp64 recurrence; causal only (no bidirectional form)."""
    kernel_attn = build("deltanet", impl="kernel", chunk_size=16)
    reference_attn = build("deltanet", chunk_size=16)
    assert kernel_attn.capabilities.backward
    kernel_attn.capabilities.check(causal=True, cross=n_q != n_k, mode="fwd_bwd", dtype=str(dtype).split(".")[-1])
    q, k, v = deltanet_inputs(n_k, d_k=24, dtype=dtype)
    q = q[:, :, n_k - n_q :]
    grad_out = torch.randn(1, 2, n_q, 24).to(dtype)

    def grads(attn) -> tuple[torch.Tensor, ...]:
        out = attn(*(leaves := [t.detach().requires_grad_() for t in (q, k, v)]), causal=True)
        return torch.autograd.grad(out, [*leaves, attn.w_beta], grad_out)

    kernel, reference = grads(kernel_attn), grads(reference_attn)
    assert torch.equal(kernel_attn.w_beta, reference_attn.w_beta)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, reference_attn.w_beta)]
    exact = torch.autograd.grad(naive_deltanet(*leaves), leaves, grad_out.double())
    _check_rule(("q", "k", "v", "w_beta"), kernel, exact, reference, (q, k, v, reference_attn.w_beta), FLOOR[dtype])


# --- refusals ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case,match",
    [("chunk", "power of two"), ("w_shape", "must be"), ("d_k", "supported range"), ("dtype", "supported")],
)
def test_bad_input_raises(case: str, match: str) -> None:
    q, k, w, u = (t.requires_grad_() for t in _loop_inputs(8, 16, 16, 16))
    with pytest.raises(ValueError, match=match):
        if case == "chunk":
            deltanet_chunk(q, k, torch.randn(1, 2, 8, 16), torch.rand(1, 2, 8), chunk_size=24)
        elif case == "w_shape":
            deltanet_chunk_loop(q, k, w[:, :, :5], u, chunk_size=16)
        elif case == "d_k":
            big = torch.randn(1, 2, 8, 512)
            deltanet_chunk_loop(big, big, big, u, chunk_size=16)
        else:
            deltanet_chunk_loop(q.double(), k, w, u, chunk_size=16)


def test_double_backward_is_refused() -> None:
    q, k, w, u = (t.requires_grad_() for t in _loop_inputs(20, 16, 16, 16))
    (dq,) = torch.autograd.grad(deltanet_chunk_loop(q, k, w, u, chunk_size=16).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward|once_differentiable|does not require grad"):
        dq.sum().backward()
