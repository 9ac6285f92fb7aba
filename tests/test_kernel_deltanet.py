"""DeltaNet's Triton chunk kernel against the fp64 naive oracle, under Triton's interpreter on CPU.

Tolerance follows the flash kernel's rule: the kernel's max-abs error against the fp64 oracle may be at
most twice that of the PyTorch reference in the same dtype, plus a small floor. A kernel with a masking,
ordering or state bug is off by O(0.1) and fails.
"""

from __future__ import annotations

import pytest
import torch
from helpers import FLOOR, max_err, naive_deltanet
from helpers import deltanet_inputs as inputs

from methods import Unsupported, build
from methods.deltanet import delta_rule_chunked
from methods.kernels.deltanet_chunk import deltanet_chunk_forward
from methods.registry import triton_guard


def _check(q, k, v, chunk_size=64, **params):
    reference = build("deltanet", chunk_size=chunk_size, **params)
    kernel = build("deltanet", impl="kernel", chunk_size=chunk_size, **params)
    out = kernel(q, k, v, causal=True)
    ref = reference(q, k, v, causal=True)
    assert out.shape == ref.shape and out.dtype == q.dtype
    assert torch.equal(kernel.w_beta, reference.w_beta)
    oracle = naive_deltanet(q, k, v, reference.w_beta, **{k_: v_ for k_, v_ in params.items() if k_ == "scale"})
    kernel_err, ref_err = max_err(out, oracle), max_err(ref, oracle)
    bound = 2 * ref_err + FLOOR[q.dtype]
    assert kernel_err <= bound, f"kernel err {kernel_err:.3g} > bound {bound:.3g} (reference err {ref_err:.3g})"


@pytest.mark.parametrize("n", [1, 17, 100, 300])
def test_matches_oracle_fp32_d64(n):
    _check(*inputs(n, d_k=64, b=2))


@pytest.mark.parametrize(
    "n,d_k,d_v,chunk_size,dtype",
    [
        (100, 16, 16, 16, torch.float32),  # the smallest tile, 7 chunks
        (130, 48, 80, 32, torch.float32),  # non-power-of-two head dims, d_k != d_v (padding masked)
        (300, 128, 128, 64, torch.float32),
        (300, 64, 64, 64, torch.float16),
        (100, 64, 64, 64, torch.bfloat16),
    ],
)
def test_matches_oracle_other_shapes_and_dtypes(n, d_k, d_v, chunk_size, dtype):
    _check(*inputs(n, d_k=d_k, d_v=d_v, dtype=dtype), chunk_size=chunk_size)


def test_tensor_core_path_fp16(monkeypatch):
    """The GPU's 16-bit branch (operands in fp16, fp32 accumulation), forced under the interpreter.

    The interpreter's fp16 `tl.dot` is sound (its bf16 one is not), so this checks the casts of that branch
    on CPU; on a GPU it is the default for fp16/bf16 inputs.
    """
    import methods.kernels.deltanet_chunk as chunk

    monkeypatch.setattr(chunk, "dot_fp32", lambda dtype: False)
    _check(*inputs(300, d_k=64, dtype=torch.float16))


def test_cross_lengths_and_scale():
    q, k, v = inputs(300)
    _check(q[:, :, -40:], k, v, scale=0.7)
    _check(q, k[:, :, :50], v[:, :, :50])


def test_states_in_and_out_match_the_reference():
    """The final state equals the chunked reference's; restarting from a state continues the sequence."""
    q, k, v = inputs(200, d_k=32)
    attn = build("deltanet")
    with torch.no_grad():
        q_n, k_n, v_c, beta = attn.prepare(q, k, v)
    ref_out, ref_state = delta_rule_chunked(q_n, k_n, v_c, beta, 64)
    out, state = deltanet_chunk_forward(q_n, k_n, v_c, beta, output_final_state=True)
    assert float((state - ref_state).abs().max()) < 1e-5
    cut = 70  # not a chunk boundary
    _, mid = deltanet_chunk_forward(
        q_n[:, :, :cut], k_n[:, :, :cut], v_c[:, :, :cut], beta[:, :, :cut], output_final_state=True
    )
    rest, end = deltanet_chunk_forward(
        q_n[:, :, cut:], k_n[:, :, cut:], v_c[:, :, cut:], beta[:, :, cut:], initial_state=mid, output_final_state=True
    )
    assert float((rest - ref_out[:, :, cut:]).abs().max()) < 1e-5
    assert float((end - ref_state).abs().max()) < 1e-5


def test_non_contiguous_inputs():
    q, k, v = inputs(100, d_k=32)
    with torch.no_grad():
        q_n, k_n, v_c, beta = build("deltanet").prepare(q, k, v)
    q_t, k_t = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q_n, k_n))
    assert not (q_t.is_contiguous() or k_t.is_contiguous())
    out = deltanet_chunk_forward(q_t, k_t, v_c, beta)[0]
    torch.testing.assert_close(out, deltanet_chunk_forward(q_n, k_n, v_c, beta)[0], rtol=0, atol=0)


def test_registry_capabilities_and_guard():
    kernel = build("deltanet", impl="kernel")
    assert kernel.kind == "kernel" and kernel.capabilities.backward and not kernel.capabilities.non_causal
    kernel.capabilities.check(causal=True, cross=False, mode="fwd_bwd", dtype="float32")  # no Unsupported
    with pytest.raises(Unsupported, match="non-causal"):
        kernel.capabilities.check(causal=False, cross=False, mode="fwd", dtype="float32")
    with pytest.raises(Unsupported, match="causal recurrence"):
        kernel(*inputs(4), causal=False)
    assert triton_guard(torch.device("cpu")) is None  # TRITON_INTERPRET=1 (conftest)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"chunk_size": 24}, "power of two"),
        ({"chunk_size": 8}, "power of two"),
        ({"beta_shape": (1, 2, 9)}, "beta must be"),
        ({"d_k": 512}, "supported range"),
    ],
)
def test_bad_input_raises(kwargs, match):
    d_k = kwargs.get("d_k", 16)
    q, k, v = inputs(8, d_k=d_k)
    beta = torch.rand(*kwargs.get("beta_shape", (1, 2, 8)))
    with pytest.raises(ValueError, match=match):
        deltanet_chunk_forward(q, k, v, beta, chunk_size=kwargs.get("chunk_size", 16))


def test_kernel_impl_rejects_a_chunk_it_cannot_tile():
    """chunk_size 48 is a valid DeltaNet (the reference runs it) but not a kernel tile: the kernel impl's row is
    `unsupported` with the reason, not an error from inside the launch."""
    q, k, v = inputs(50)
    assert build("deltanet", chunk_size=48)(q, k, v, causal=True).isfinite().all()
    with pytest.raises(Unsupported, match="chunk_size to be a power of two >= 16, got 48"):
        build("deltanet", impl="kernel", chunk_size=48)(q, k, v, causal=True)
