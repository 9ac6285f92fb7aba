"""The chunked linear-attention Triton backward against autograd through the fp64 oracle, under the interpreter.

Tolerance is tests/test_flash_bwd.py's rule, per gradient (phi_q, phi_k, v and log_decay): the kernel's
max-abs error against autograd through the fp64 dense oracle (`naive_linear_attention`) may be at most
twice that of autograd through the PyTorch chunked reference in the same dtype, plus the floor. As in the
forward's tests (tests/test_kernel_chunked_linear.py) the floor is scaled by the exact gradient's magnitude
(when above 1): unnormalised linear attention and the decay's gradient reach 1e2 to 1e5 here, and under the
interpreter Triton's fp32 -> bf16 store truncates instead of rounding, a full ulp where PyTorch loses half.
A wrong mask, decay exponent or normaliser term is off by O(1) and fails.

Chunks of 16 make 37 and 71 tokens span several chunks, one of them partial, at little interpreter cost;
feature and value dims 24 and 40 are not powers of two (padded, masked tiles). Causal cross shapes put the
queries at bottom-right positions: with n_q > n_k the first rows see no key.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from helpers import FLOOR, max_err

from methods import METHODS, build
from methods.kernels import chunked_linear, chunked_linear_bwd
from methods.kernels.chunked_linear import chunked_linear_attention_forward
from methods.kernels.chunked_linear_bwd import chunked_linear_attention, chunked_linear_attention_backward
from methods.linear_attention import linear_attention_chunked, naive_linear_attention

DECAY = (-0.3, -0.02)  # a fast head and a slow one (log lambda per head)
LINEAR_METHODS = ["linear", "performer", "cosformer", "lightning", "based"]


def _inputs(n_q: int, n_k: int, feat: int, dv: int, dtype: torch.dtype, positive: bool):
    """Inputs drawn in fp32 and cast, so the fp64 oracle sees exactly the kernel's numbers.

    Positive features (elu + 1, as `linear`) keep a normaliser away from 0; unnormalised cases take signed
    ones (lightning's silu features are signed).
    """
    phi_q, phi_k = torch.randn(1, 2, n_q, feat), torch.randn(1, 2, n_k, feat)
    if positive:
        phi_q, phi_k = F.elu(phi_q) + 1, F.elu(phi_k) + 1
    return phi_q.to(dtype), phi_k.to(dtype), torch.randn(1, 2, n_k, dv).to(dtype)


def _grads(attention, inputs, grad_out, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, ...]:
    """Gradients of `attention(*inputs)` for `grad_out` wrt every input that is not None, with fresh leaves."""
    leaves = [None if t is None else (t if dtype is None else t.to(dtype)).detach().requires_grad_() for t in inputs]
    out = attention(*leaves)
    return torch.autograd.grad(out, [t for t in leaves if t is not None], grad_out.to(out.dtype))


def _check_rule(kernel, reference, exact, inputs, names: str) -> None:
    for name, g, r, e, x in zip(names, kernel, reference, exact, inputs, strict=True):
        assert g.shape == x.shape and g.dtype == x.dtype, name
        assert g.isfinite().all(), f"d{name} has non-finite entries"
        kernel_err, ref_err = max_err(g, e), max_err(r, e)
        bound = 2 * ref_err + FLOOR[inputs[0].dtype] * max(1.0, float(e.abs().max()))
        assert kernel_err <= bound, f"d{name}: kernel err {kernel_err:.3g} > bound {bound:.3g} (ref err {ref_err:.3g})"


def _check_core(n_q, n_k, feat, dv, dtype, causal, decay, normalize, chunk=16, eps=1e-6, positive=None):
    """Kernel, chunked reference and fp64 oracle gradients of the core, for one random grad_out."""
    phi_q, phi_k, v = _inputs(n_q, n_k, feat, dv, dtype, positive=normalize if positive is None else positive)
    log_decay = torch.tensor(DECAY) if decay else None
    inputs = (phi_q, phi_k, v, log_decay)
    grad_out = torch.randn(1, 2, n_q, dv).to(dtype)

    def kernel_core(q, k, v, ld):
        return chunked_linear_attention(q, k, v, causal, ld, normalize, eps, chunk_size=chunk)

    def reference_core(q, k, v, ld):
        out, _ = linear_attention_chunked(q, k, v, causal, log_decay=ld, normalize=normalize, eps=eps, chunk_size=chunk)
        return out

    def oracle(q, k, v, ld):
        return naive_linear_attention(q, k, v, causal, log_decay=ld, normalize=normalize, eps=eps)

    kernel = _grads(kernel_core, inputs, grad_out)
    reference = _grads(reference_core, inputs, grad_out)
    exact = _grads(oracle, inputs, grad_out, torch.float64)
    present = [x for x in inputs if x is not None]
    _check_rule(kernel, reference, exact, present, ["q", "k", "v", "log_decay"][: len(present)])
    return kernel


CASES = [
    # (n_q, n_k, feat, dv, dtype, causal, decay, normalize)
    (1, 1, 24, 40, torch.float32, True, False, True),
    (37, 37, 24, 40, torch.float32, False, False, True),
    (71, 71, 40, 24, torch.float32, True, False, True),
    (71, 71, 24, 40, torch.float32, True, True, False),  # lightning's core
    (71, 71, 40, 24, torch.float32, True, True, True),
    (71, 71, 24, 40, torch.float32, True, False, False),
    # cross: fewer queries than keys (bottom-right) and more (the first rows see no key when causal)
    (37, 71, 24, 40, torch.float32, True, False, True),
    (37, 71, 40, 24, torch.float32, True, True, False),
    (71, 37, 40, 24, torch.float32, True, True, True),
    (71, 37, 24, 40, torch.float32, True, False, False),
    (37, 71, 40, 24, torch.float32, False, False, False),
    (71, 37, 24, 40, torch.float32, False, False, True),
    # 16-bit inputs: fp32 accumulation and states, gradients in the input dtype (log_decay's in its own)
    (71, 71, 24, 40, torch.float16, True, True, False),
    (37, 71, 24, 40, torch.float16, False, False, True),
    (71, 37, 40, 24, torch.float16, True, False, True),
    (71, 71, 24, 40, torch.bfloat16, True, False, True),
]


@pytest.mark.parametrize(
    "n_q,n_k,feat,dv,dtype,causal,decay,normalize",
    CASES,
    ids=[
        f"{a}x{b}-f{f}-v{d}-{str(t)[6:]}-{'causal' if c else 'full'}{'-decay' if g else ''}{'-norm' if n else ''}"
        for a, b, f, d, t, c, g, n in CASES
    ],
)
def test_grads_match_oracle(n_q, n_k, feat, dv, dtype, causal, decay, normalize) -> None:
    _check_core(n_q, n_k, feat, dv, dtype, causal, decay, normalize)


def test_default_chunk_of_64() -> None:
    """The chunk the methods use by default: one full chunk and a partial one."""
    _check_core(71, 71, 24, 40, torch.float32, True, True, True, chunk=64)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_clamped_normaliser_passes_no_gradient(causal: bool) -> None:
    """Signed features and eps = 1: many rows have den < eps, where out = num / eps and den gets no gradient."""
    torch.manual_seed(1)
    phi_q, phi_k, _ = _inputs(37, 37, 24, 40, torch.float32, positive=False)
    den = naive_linear_attention(phi_q, phi_k, torch.ones(1, 2, 37, 1), causal, normalize=False)
    assert 0 < int((den < 1).sum()) < den.numel()  # the inputs `_check_core` draws next, after the same seed
    torch.manual_seed(1)
    _check_core(37, 37, 24, 40, torch.float32, causal, False, True, eps=1.0, positive=False)


def test_queries_before_the_first_key_get_zero_grads() -> None:
    """Causal with n_q > n_k: the first n_q - n_k queries output 0, so their gradient is exactly 0 and the
    output gradient on their rows reaches nothing else."""
    n_q, n_k = 40, 5
    phi_q, phi_k, v = _inputs(n_q, n_k, 24, 40, torch.float32, positive=True)
    dq, dk, dv = _check_core(n_q, n_k, 24, 40, torch.float32, True, False, True)
    empty = n_q - n_k
    assert torch.equal(dq[:, :, :empty], torch.zeros_like(dq[:, :, :empty])) and dq[:, :, empty:].abs().amax() > 0
    grad_out = torch.randn(1, 2, n_q, 40)
    masked = grad_out.clone()
    masked[:, :, :empty] = 0

    def core(q, k, v):
        return chunked_linear_attention(q, k, v, causal=True, chunk_size=16)

    for g, h in zip(_grads(core, (phi_q, phi_k, v), grad_out), _grads(core, (phi_q, phi_k, v), masked), strict=True):
        assert torch.equal(g, h)


def test_value_blocks_split_as_on_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU splits the value dim over programs (the interpreter takes it whole): dq, dk are then partial
    sums over value blocks, and the normaliser's terms must be counted once. Forced here: 40 values in three
    blocks of 16, in the forward (which stores den from its first block) and the backward."""
    args = (71, 37, 24, 40, torch.float32, True, True, True)
    whole = _check_core(*args)

    def split(config):
        return lambda *a, **kw: dataclasses.replace(config(*a, **kw), block_v=16)

    monkeypatch.setattr(chunked_linear, "choose_config", split(chunked_linear.choose_config))
    monkeypatch.setattr(chunked_linear_bwd, "choose_backward_config", split(chunked_linear_bwd.choose_backward_config))
    torch.manual_seed(0)  # the same inputs as `whole`
    blocks = _check_core(*args)
    for g, h in zip(blocks, whole, strict=True):
        torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_non_contiguous_inputs(causal: bool) -> None:
    """(B, N, H, F) tensors viewed as (B, H, N, F), v strided along its dim, a transposed grad_out: the same
    gradients as contiguous copies, bit for bit (only the addressing differs)."""
    n_q, n_k, feat, dv = 37, 71, 24, 40
    phi_q = (F.elu(torch.randn(1, n_q, 2, feat)) + 1).transpose(1, 2)
    phi_k = (F.elu(torch.randn(1, n_k, 2, feat)) + 1).transpose(1, 2)
    v = torch.randn(1, 2, n_k, 2 * dv)[..., ::2]
    grad_out = torch.randn(1, n_q, 2, dv).transpose(1, 2)
    assert not any(t.is_contiguous() for t in (phi_q, phi_k, v, grad_out))

    def core(q, k, v):
        return chunked_linear_attention(q, k, v, causal=causal, chunk_size=16)

    strided = _grads(core, (phi_q, phi_k, v), grad_out)
    copied = _grads(core, tuple(t.contiguous() for t in (phi_q, phi_k, v)), grad_out.contiguous())
    for g, h in zip(strided, copied, strict=True):
        assert torch.equal(g, h)


def test_without_grad_it_is_the_forward_kernel() -> None:
    """Under no_grad (or with nothing requiring grad) nothing is saved and the output is the forward's."""
    phi_q, phi_k, v = (t.requires_grad_() for t in _inputs(37, 37, 24, 40, torch.float32, positive=True))
    with torch.no_grad():
        out = chunked_linear_attention(phi_q, phi_k, v, causal=True, chunk_size=16)
    assert out.grad_fn is None
    expected, _ = chunked_linear_attention_forward(phi_q.detach(), phi_k.detach(), v.detach(), True, chunk_size=16)
    assert torch.equal(out, expected)
    assert chunked_linear_attention(phi_q, phi_k, v, causal=True, chunk_size=16).grad_fn is not None


def test_no_keys_gives_zero_grads() -> None:
    phi_q, phi_k, v = _inputs(3, 0, 24, 40, torch.float32, positive=True)
    grad_out = torch.ones(1, 2, 3, 40)
    out, _, den = chunked_linear_attention_forward(phi_q, phi_k, v, causal=False, return_den=True)
    dq, dk, dv, dg = chunked_linear_attention_backward(grad_out, phi_q, phi_k, v, out, den)
    assert torch.equal(dq, torch.zeros_like(phi_q)) and dk.shape == phi_k.shape and dv.shape == v.shape and dg is None


@pytest.mark.parametrize("name", LINEAR_METHODS)
def test_method_kernel_backward_matches_reference(name: str) -> None:
    """Each linear method's kernel impl trains: its q, k, v gradients (through the feature map, and for Based
    the window kernel, for lightning the RMSNorm) meet the rule against the method's fp64 oracle."""
    assert METHODS[name].impls["kernel"].capabilities.backward
    causal = True
    params = {"chunk_size": 16, **({"window": 16} if name == "based" else {})}
    q, k, v = (torch.randn(1, 2, n, 24) for n in (37, 71, 71))
    grad_out = torch.randn(q.shape)
    reference, kernel_attn = build(name, **params), build(name, impl="kernel", **params)
    kernel = _grads(lambda *t: kernel_attn(*t, causal=causal), (q, k, v), grad_out)
    ref = _grads(lambda *t: reference(*t, causal=causal), (q, k, v), grad_out)
    exact = _grads(lambda *t: reference.naive(*t, causal), (q, k, v), grad_out, torch.float64)
    _check_rule(kernel, ref, exact, (q, k, v), "qkv")


def test_bad_inputs_raise_one_line_errors() -> None:
    phi_q, phi_k, v = (t.requires_grad_() for t in _inputs(5, 5, 24, 40, torch.float32, positive=True))
    with pytest.raises(ValueError, match="chunk_size") as err:
        chunked_linear_attention(phi_q, phi_k, v, causal=True, chunk_size=48)
    assert "\n" not in str(err.value)
    out, _, den = chunked_linear_attention_forward(phi_q.detach(), phi_k.detach(), v.detach(), True, return_den=True)
    with pytest.raises(ValueError, match="grad_out") as err:
        chunked_linear_attention_backward(out[:, :, :4], phi_q, phi_k, v, out, den, causal=True)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="den") as err:
        chunked_linear_attention_backward(out, phi_q, phi_k, v, out, None, causal=True)
    assert "\n" not in str(err.value)


def test_double_backward_is_refused() -> None:
    """The backward kernels are not differentiable themselves; asking for a second derivative must say so."""
    phi_q, phi_k, v = (t.requires_grad_() for t in _inputs(5, 5, 16, 16, torch.float32, positive=True))
    (dq,) = torch.autograd.grad(chunked_linear_attention(phi_q, phi_k, v).sum(), phi_q, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward|once_differentiable|does not require grad"):
        dq.sum().backward()
