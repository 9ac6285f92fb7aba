"""The Triton chunked linear-attention forward against the PyTorch reference, under Triton's interpreter on CPU.

Tolerance follows the flash kernel's rule: the kernel's max-abs error against
the fp64 naive oracle is at most twice that of the PyTorch chunked reference
run in the same dtype, plus a floor scaled by the output's magnitude.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import FLOOR, max_err

from methods import build
from methods.kernels.chunked_linear import choose_config, chunked_linear_attention_forward
from methods.linear_attention import linear_attention_chunked, linear_attention_step, naive_linear_attention

LENGTHS = [(1, 1), (17, 17), (100, 100), (300, 300), (17, 300), (300, 17)]


def features(n_q: int, n_k: int, feat: int, dv: int, dtype: torch.dtype = torch.float32, b: int = 1, h: int = 2):
    """Positive features (elu + 1, as `linear`), so the normaliser is well away from zero."""
    phi_q = F.elu(torch.randn(b, h, n_q, feat)) + 1
    phi_k = F.elu(torch.randn(b, h, n_k, feat)) + 1
    return phi_q.to(dtype), phi_k.to(dtype), torch.randn(b, h, n_k, dv).to(dtype)


def check(phi_q, phi_k, v, causal: bool, decay: torch.Tensor | None = None, normalize: bool = True, chunk: int = 64):
    kw = dict(log_decay=decay, normalize=normalize)
    exact = naive_linear_attention(phi_q, phi_k, v, causal, **kw)
    reference, _ = linear_attention_chunked(phi_q, phi_k, v, causal, chunk_size=chunk, **kw)
    out, state = chunked_linear_attention_forward(phi_q, phi_k, v, causal=causal, chunk_size=chunk, **kw)
    assert state is None
    assert out.shape == (*phi_q.shape[:3], v.shape[-1]) and out.dtype == v.dtype
    assert not torch.isnan(out).any()
    scale = max(1.0, float(exact.abs().max())) if exact.numel() else 1.0
    kernel_err, ref_err = max_err(out, exact), max_err(reference, exact)
    limit = 2 * ref_err + FLOOR[v.dtype] * scale
    assert kernel_err <= limit, f"kernel err {kernel_err:.3g} > bound {limit:.3g} (reference err {ref_err:.3g})"
    return out


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("n_q,n_k", LENGTHS, ids=[f"{a}x{b}" for a, b in LENGTHS])
def test_normalised_matches_oracle_fp32(n_q: int, n_k: int, causal: bool) -> None:
    out = check(*features(n_q, n_k, 32, 32, b=2), causal=causal)
    if causal and n_q > n_k:  # queries before the first key output exactly 0
        assert torch.equal(out[:, :, : n_q - n_k], torch.zeros_like(out[:, :, : n_q - n_k]))


@pytest.mark.parametrize("n_q,n_k", [(1, 1), (100, 100), (300, 300), (17, 300), (300, 17)])
@pytest.mark.parametrize("normalize", [False, True], ids=["lightning", "decay-norm"])
def test_decay_matches_oracle_fp32(n_q: int, n_k: int, normalize: bool) -> None:
    decay = torch.tensor([-0.5, -0.004])  # a fast head and a slow one
    check(*features(n_q, n_k, 32, 32), causal=True, decay=decay, normalize=normalize)


@pytest.mark.parametrize(
    "n_q,n_k,feat,dv,dtype,causal,chunk",
    [
        # feature dims of the methods (Based 153, cosformer 2d, performer 256) and odd value dims: padding masked
        (300, 300, 153, 64, torch.float32, True, 64),
        (100, 100, 256, 40, torch.float32, False, 64),
        (130, 130, 128, 24, torch.float32, True, 16),
        (17, 17, 20, 80, torch.float32, True, 32),
        # 16-bit inputs: fp32 accumulation and state, output in the input dtype
        (300, 300, 64, 64, torch.float16, True, 64),
        (17, 300, 64, 64, torch.float16, False, 64),
        (300, 17, 64, 64, torch.float16, True, 64),
        (128, 300, 64, 64, torch.bfloat16, True, 64),
    ],
)
def test_other_dims_dtypes_and_chunks(n_q, n_k, feat, dv, dtype, causal, chunk) -> None:
    check(*features(n_q, n_k, feat, dv, dtype), causal=causal, chunk=chunk)


def test_unnormalised_fp16_with_decay() -> None:
    check(*features(200, 200, 64, 64, torch.float16), causal=True, decay=torch.tensor([-0.1, -0.02]), normalize=False)


@pytest.mark.parametrize("causal,decay", [(False, None), (True, None), (True, torch.tensor([-0.2, -0.01]))])
def test_initial_and_final_state_match_reference(causal: bool, decay) -> None:
    phi_q, phi_k, v = features(90, 150, 32, 16)
    init = (torch.randn(1, 2, 32, 16), torch.rand(1, 2, 32) * 10)
    kw = dict(log_decay=decay, initial_state=init, output_final_state=True)
    ref, (s_ref, z_ref) = linear_attention_chunked(phi_q, phi_k, v, causal, **kw)
    out, (s, z) = chunked_linear_attention_forward(phi_q, phi_k, v, causal=causal, **kw)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(z, z_ref, rtol=1e-5, atol=1e-4)
    assert s.dtype == z.dtype == torch.float32


def test_one_token_with_state_is_a_decode_step() -> None:
    phi_q, phi_k, v = features(1, 1, 48, 32)
    state = (torch.randn(1, 2, 48, 32), torch.rand(1, 2, 48) * 3)
    decay = torch.tensor([-0.3, -0.05])
    ref, (s_ref, z_ref) = linear_attention_step(phi_q, phi_k, v, state, log_decay=decay)
    out, (s, z) = chunked_linear_attention_forward(
        phi_q, phi_k, v, causal=True, log_decay=decay, initial_state=state, output_final_state=True
    )
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(s, s_ref)
    torch.testing.assert_close(z, z_ref)
    assert torch.equal(state[0], state[0].clone())  # the state handed in is not written


def test_final_state_without_queries() -> None:
    """Zero queries: the kernel only folds the keys into the state (what a prefill needs)."""
    _, phi_k, v = features(0, 70, 16, 16)
    phi_q = phi_k[:, :, :0]
    out, (s, z) = chunked_linear_attention_forward(phi_q, phi_k, v, causal=True, output_final_state=True)
    assert out.shape == (1, 2, 0, 16)
    torch.testing.assert_close(s, phi_k.transpose(-1, -2) @ v, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(z, phi_k.sum(2))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_non_contiguous_inputs(causal: bool) -> None:
    b, h, n, feat = 2, 2, 100, 32
    phi_q = (F.elu(torch.randn(b, n, h, feat)) + 1).transpose(1, 2)
    phi_k = (F.elu(torch.randn(b, n, h, feat)) + 1).transpose(1, 2)
    v = torch.randn(b, h, n, 2 * feat)[..., ::2]
    assert not (phi_q.is_contiguous() or phi_k.is_contiguous() or v.is_contiguous())
    out, _ = chunked_linear_attention_forward(phi_q, phi_k, v, causal=causal)
    ref, _ = chunked_linear_attention_forward(phi_q.contiguous(), phi_k.contiguous(), v.contiguous(), causal=causal)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


# --- every method's kernel impl against its reference impl ----------------------------------------------------------

METHODS_UNDER_TEST = [
    ("linear", {}, [False, True]),
    ("performer", {"nb_features": 256}, [False, True]),
    ("cosformer", {}, [False, True]),
    ("lightning", {}, [True]),
]


@pytest.mark.parametrize("name,params,patterns", METHODS_UNDER_TEST, ids=[m[0] for m in METHODS_UNDER_TEST])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_method_kernel_matches_reference(name, params, patterns, dtype) -> None:
    q, k, v = (torch.randn(1, 2, n, 64).to(dtype) for n in (130, 200, 200))
    ref_attn, kernel_attn = build(name, **params), build(name, impl="kernel", **params)
    for causal in patterns:
        exact = ref_attn.naive(q, k, v, causal)
        ref_err = max_err(ref_attn(q, k, v, causal=causal), exact)
        out = kernel_attn(q, k, v, causal=causal)
        assert out.dtype == dtype and out.shape == q.shape
        assert max_err(out, exact) <= 2 * ref_err + FLOOR[dtype] * max(1.0, float(exact.abs().max()))


@pytest.mark.parametrize("name,params,patterns", METHODS_UNDER_TEST[::3], ids=["linear", "lightning"])
def test_method_kernel_decode_matches_forward(name, params, patterns) -> None:
    q, k, v = (torch.randn(1, 2, 40, 32) for _ in range(3))
    attn = build(name, impl="kernel", **params)
    full = build(name, **params)(q, k, v, causal=True)
    assert max_err(attn.decode(q[:, :, -1:], k, v), full[:, :, -1:]) < 1e-5


def test_based_kernel_linear_half_matches_reference() -> None:
    q, k, v = (torch.randn(1, 2, n, 64) for n in (100, 100, 100))
    ref, kern = build("based"), build("based", impl="kernel")
    for causal in (False, True):
        torch.testing.assert_close(kern.linear_part(q, k, v, causal), ref.linear_part(q, k, v, causal))


def test_based_kernel_matches_reference() -> None:
    """Both halves on their kernels (the window's is the sparse family's block-sparse kernel)."""
    q, k, v = (torch.randn(1, 2, n, 64) for n in (100, 150, 150))
    ref, kern = build("based", window=32), build("based", impl="kernel", window=32)
    for causal in (False, True):
        exact = ref.naive(q, k, v, causal)
        ref_err = max_err(ref(q, k, v, causal=causal), exact)
        assert max_err(kern(q, k, v, causal=causal), exact) <= 2 * ref_err + FLOOR[torch.float32]
    q = torch.randn(1, 2, 150, 64)
    full = ref(q, k, v, causal=True)
    assert max_err(kern.decode(q[:, :, -1:], k, v), full[:, :, -1:]) < 1e-5


def test_config_keeps_the_state_tile_small_on_gpu(monkeypatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cfg = choose_config(256, 64, 4096, 64, torch.bfloat16, causal=False)
    assert (cfg.block_c, cfg.block_f) == (64, 256) and cfg.block_f * cfg.block_v <= 8192
    assert choose_config(256, 64, 4096, 64, torch.bfloat16, causal=True).block_c == 32  # q, k and scores live
    assert choose_config(153, 64, 1, 64, torch.float16).block_c == 16  # one decode token: tl.dot's smallest tile
    fp32 = choose_config(64, 64, 4096, 64, torch.float32, causal=False)  # exact fp32 dots: operands in registers
    assert (fp32.block_c, fp32.block_v, fp32.num_stages) == (64, 16, 1)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(chunk_size=48), "power of two"),
        (dict(log_decay=torch.zeros(2), causal=False), "causal"),
        (dict(log_decay=torch.zeros(3), causal=True), "shape"),
        (dict(phi_q=torch.rand(1, 2, 8, 16)), "feature dim mismatch"),
        (dict(phi_q=torch.rand(1, 2, 8, 600), phi_k=torch.rand(1, 2, 8, 600)), "1 to 512"),
        (dict(v=torch.rand(1, 2, 9, 32)), "lengths differ"),
        (dict(v=torch.rand(1, 2, 8, 32).half()), "dtype mismatch"),
        (dict(initial_state=(torch.zeros(1, 2, 32, 31), torch.zeros(1, 2, 32))), "initial S"),
    ],
    ids=["chunk", "decay_noncausal", "decay_shape", "feat_mismatch", "feat_too_big", "lengths", "dtype", "state"],
)
def test_bad_input_raises(kwargs, match: str) -> None:
    args = dict(phi_q=torch.rand(1, 2, 8, 32), phi_k=torch.rand(1, 2, 8, 32), v=torch.rand(1, 2, 8, 32))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        chunked_linear_attention_forward(**args)
