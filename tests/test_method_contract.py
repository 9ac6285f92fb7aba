"""The contract every registered method and implementation meets, parametrised from the registry.

A method is tested the day it is registered: nothing here names one, except `SMALL`, which only
shrinks parameters so interpreted kernels stay fast (a method missing from it runs with its
defaults). Implementations whose enable guard says they cannot run here (flash-attn without a GPU)
skip with the guard's reason; Triton kernels run under the interpreter (tests/conftest.py).

What is held, per implementation:

* declaration: `conf/method/<name>.yaml` exists and its `params` are the declared defaults; the
  constructor takes exactly the declared parameters; bad values fail in `validate_params` and `build`
  with one line naming the method, the parameter and what it accepts;
* accuracy, on odd and even lengths, self and cross, causal and not: exact methods match the fp64
  oracle (`oracle_attention`); every implementation is within FlashAttention's rule of its method's
  reference (error against the fp64 truth <= 2x the reference's fp32 error + a floor), where the truth
  is the oracle for exact methods and the method's own reference in fp64 for approximate ones, whose
  fidelity against the oracle must be a finite number;
* decode: `decode_step` after `prefill` equals the last row of the full causal forward, does not
  consume the state it is given, and returns a state whose tensors hold exactly `state_bytes` bytes;
* backward: a method that claims it gets finite, non-zero gradients for the inputs its output depends
  on (`capabilities.grad_inputs`) from a strict `torch.autograd.grad` (the call the scaling task makes),
  and none for the others; exact methods' gradients match the oracle's;
* refusal: every pattern, mode or dtype outside the capabilities raises `Unsupported` with a reason,
  from `capabilities.check` and from the call itself.
"""

from __future__ import annotations

import inspect
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest
import torch
import yaml
from helpers import FLOOR, max_err
from torch.nn.attention.flex_attention import flex_attention

import methods.flex
from methods import METHODS, BadParam, Param, Unsupported, build, get_method, unavailable_reason, validate_params
from methods.base import DTYPES, Attention
from methods.oracle import fidelity, oracle_attention

CONF = Path(__file__).resolve().parents[1] / "conf" / "method"
CPU = torch.device("cpu")
HEADS, HEAD_DIM = 2, 32
SELF = [33, 100]  # odd and even, one and several tiles / chunks / blocks
CROSS = [(17, 64), (64, 33)]  # fewer queries than keys (decode-like) and more (leading rows see no key)
CONTEXT = 48  # decode: prefill 48 tokens (a multiple of every block below), then one step

# Small parameters so interpreted kernels stay fast; the blocks, windows and chunks are smaller than the
# lengths above, so every pattern is really sparse, chunked or projected there.
SMALL = {
    "based": {"feature_dim": 8, "window": 16, "chunk_size": 16},
    "bigbird": {"block": 16, "window_blocks": 3, "global_blocks": 1, "random_blocks": 1},
    "block_topk": {"block": 16, "top_blocks": 2},
    "cosformer": {"chunk_size": 16},
    "deltanet": {"chunk_size": 16},
    # Causal recursion at 100 tokens (halves of 50 <= 64 are exact); decode is exact by design (the paper speeds
    # up prefill only), so the decode test's 49 tokens stay below min_seq_len, where the forward is exact too.
    "hyperattention": {"block": 16, "sample_size": 16, "n_projs": 3, "min_seq_len": 64},
    "lightning": {"chunk_size": 16},
    "linear": {"chunk_size": 16},
    "linformer": {"k": 16, "max_seq_len": 128},
    "memory_efficient": {"query_chunk": 16, "key_chunk": 32},
    "nystromformer": {"num_landmarks": 8},
    "performer": {"nb_features": 32, "chunk_size": 16},
    "sink_window": {"sinks": 2, "window": 16},
    "sliding_window": {"window": 16},
    "strided": {"stride": 16, "summary": 4},
    "topk": {"top_k": 16},
}

# The FlexAttention peers run eagerly here (see `_eager_flex`); torch warns that eager is unfused, which is known.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

IMPLS = [(name, impl) for name, spec in METHODS.items() for impl in spec.impls]
IMPL_IDS = [f"{name}/{impl}" for name, impl in IMPLS]
# The implementations that claim a capability (those that do not are held to refusing it, below).
DECODE_IMPLS = [(n, i) for n, i in IMPLS if METHODS[n].impls[i].capabilities.decode]
BACKWARD_IMPLS = [(n, i) for n, i in IMPLS if METHODS[n].impls[i].capabilities.backward]


@pytest.fixture(autouse=True)
def _eager_flex(monkeypatch):
    """FlexAttention peers run eagerly: compiling costs seconds per mask on a CPU and computes the same thing."""
    monkeypatch.setattr(methods.flex, "compiled_flex", lambda: flex_attention)


def make(name: str, impl: str) -> Attention:
    reason = unavailable_reason(name, impl, CPU)
    if reason:
        pytest.skip(reason)
    return build(name, impl=impl, **SMALL.get(name, {}))


def qkv(n_q: int, n_k: int, dtype=torch.float32, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """fp32 random inputs, cast to `dtype` (fp64 casts are exact, so the fp64 truth sees the same numbers)."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, HEADS, n, HEAD_DIM, generator=gen).to(dtype) for n in (n_q, n_k, n_k))


def patterns(caps) -> list[tuple[int, int, bool]]:
    """Every (n_q, n_k, causal) of the test grid that the capabilities claim."""
    flags = [c for c, ok in ((False, caps.non_causal), (True, caps.causal)) if ok]
    shapes = [(n, n) for n in SELF] + (CROSS if caps.cross else [])
    return [(n_q, n_k, causal) for n_q, n_k in shapes for causal in flags]


_TRUTH: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def truth_and_reference(name: str, n_q: int, n_k: int, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(truth in fp64, the method's reference in fp32) for one pattern, computed once per session.

    The truth is the oracle for exact methods and the reference in fp64 for approximate ones: what an
    implementation of the method must compute, whatever the method's own approximation error is.
    """
    key = (name, n_q, n_k, causal)
    if key not in _TRUTH:
        q, k, v = qkv(n_q, n_k)
        ref = build(name, impl="reference", **SMALL.get(name, {}))
        if get_method(name).exact:
            truth = oracle_attention(q, k, v, causal=causal)
        else:
            truth = ref(q.double(), k.double(), v.double(), causal=causal)
        _TRUTH[key] = truth, ref(q, k, v, causal=causal)
    return _TRUTH[key]


def state_tensor_bytes(state: object) -> int:
    """Bytes of every tensor reachable from a decode state, each storage counted once and whole.

    A view keeps its whole buffer alive, so a preallocated cache counts at its capacity, not at the
    slice it has filled: this is the memory the decoder holds, which `state_bytes` must report.
    """
    storages: dict[int, int] = {}

    def walk(obj: object) -> None:
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        elif is_dataclass(obj):
            for f in fields(obj):
                walk(getattr(obj, f.name))
        elif isinstance(obj, tuple | list):
            for item in obj:
                walk(item)
        elif isinstance(obj, dict):
            for item in obj.values():
                walk(item)
        elif obj is not None and not isinstance(obj, int | float | str | bool):
            raise TypeError(f"the contract does not know how to count a {type(obj).__name__} in a decode state")

    walk(state)
    return sum(storages.values())


# --- declarations: parameters, YAML, constructors -------------------------------------------------------------------


@pytest.mark.parametrize("name", list(METHODS))
def test_yaml_params_are_the_declared_defaults(name):
    """conf/method/<name>.yaml must exist (Hydra composes it) and repeat the declared defaults, no more, no less."""
    path = CONF / f"{name}.yaml"
    assert path.is_file(), f"method {name} is registered but {path} is missing"
    conf = yaml.safe_load(path.read_text())
    assert conf["name"] == name
    assert (conf.get("params") or {}) == get_method(name).defaults()


def test_every_method_yaml_is_a_registered_method():
    assert sorted(p.stem for p in CONF.glob("*.yaml")) == sorted(METHODS)
    assert set(SMALL) <= set(METHODS)  # no stale entry: a renamed method would silently run at full size


@pytest.mark.parametrize("name,impl", IMPLS, ids=IMPL_IDS)
def test_constructor_takes_exactly_the_declared_params(name, impl):
    """`build` passes every declared parameter; a constructor that drops one or invents one breaks here, not in a sweep."""
    spec = get_method(name)
    signature = inspect.signature(spec.impls[impl].factory)
    params = signature.parameters
    assert not any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params.values()), signature
    assert list(params) == [p.name for p in spec.params], signature
    for p in spec.params:  # constructors keep no defaults of their own; if one does, it must be the declared one
        assert params[p.name].default in (inspect.Parameter.empty, p.default)


@pytest.mark.parametrize("name", list(METHODS))
def test_validate_params_fills_the_defaults_and_types_them(name):
    spec = get_method(name)
    assert validate_params(name, {}) == spec.defaults()
    assert validate_params(name, spec.defaults()) == spec.defaults()
    for p in spec.params:
        for value in (p.default, *(p.choices or ())):
            assert validate_params(name, {p.name: value})[p.name] == value
    with pytest.raises(BadParam, match=rf"^method {name}: unknown parameter 'nope'; parameters: "):
        validate_params(name, {"nope": 1})


BAD_PARAMS = [
    ("sliding_window", {"window": "abc"}, "method sliding_window: parameter window must be an int >= 1, got 'abc'"),
    ("sliding_window", {"window": 0}, "method sliding_window: parameter window must be an int >= 1, got 0"),
    ("sliding_window", {"window": 2.5}, "parameter window must be an int >= 1, got 2.5"),
    ("sliding_window", {"window": True}, "parameter window must be an int >= 1, got True"),
    ("sliding_window", {"window": None}, "parameter window must be an int >= 1, got None"),
    ("sliding_window", {"foo": 1}, "method sliding_window: unknown parameter 'foo'; parameters: window"),
    ("softmax", {"window": 1}, "method softmax: unknown parameter 'window'; parameters: none"),
    ("deltanet", {"qk_activation": "relu"}, "parameter qk_activation must be one of 'identity', 'silu', got 'relu'"),
    ("deltanet", {"scale": 0}, "parameter scale must be a float > 0 or null, got 0"),
    ("hyperattention", {"n_projs": 21}, "parameter n_projs must be an int >= 1 and <= 20, got 21"),
    ("strided", {"stride": 8, "summary": 9}, "method strided: parameter summary must be <= stride, got 9"),
]


@pytest.mark.parametrize("name,params,message", BAD_PARAMS, ids=[m for _, _, m in BAD_PARAMS])
@pytest.mark.parametrize("call", ["validate_params", "build"])
def test_bad_params_fail_on_one_line_naming_the_parameter(call, name, params, message):
    with pytest.raises(BadParam) as err:
        validate_params(name, params) if call == "validate_params" else build(name, **params)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert isinstance(err.value, ValueError)  # callers that catch ValueError keep working


def test_values_are_coerced_only_where_nothing_is_lost():
    assert validate_params("lightning", {"decay_scale": 1})["decay_scale"] == 1.0  # YAML's 1 for a float
    assert isinstance(validate_params("lightning", {"decay_scale": 1})["decay_scale"], float)
    assert validate_params("sliding_window", {"window": 64.0}) == {"window": 64}  # an integral float for an int
    # null where the default is null
    assert validate_params("deltanet", {"head_dim": None, "scale": None})["head_dim"] is None
    assert validate_params("deltanet", {"head_dim": 64})["head_dim"] == 64
    with pytest.raises(BadParam, match="got '64'"):
        validate_params("sliding_window", {"window": "64"})  # a string is not a number, even when it reads like one


def test_a_param_whose_default_breaks_its_own_range_is_refused_at_declaration():
    with pytest.raises(ValueError, match="parameter window must be an int >= 1, got 0"):
        Param("window", int, 0, min=1)
    with pytest.raises(TypeError, match="type must be one of"):
        Param("window", list, [])


# --- accuracy ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,impl", IMPLS, ids=IMPL_IDS)
def test_output_against_the_truth(name, impl):
    attn = make(name, impl)
    exact = get_method(name).exact
    for n_q, n_k, causal in patterns(attn.capabilities):
        where = f"{name}/{impl} n_q={n_q} n_k={n_k} causal={causal}"
        q, k, v = qkv(n_q, n_k)
        truth, ref = truth_and_reference(name, n_q, n_k, causal)
        out = attn(q, k, v, causal=causal)
        assert out.shape == (1, HEADS, n_q, HEAD_DIM) and out.dtype == torch.float32, where
        assert out.isfinite().all(), where
        # FlashAttention's rule: at most twice the reference's own fp32 error against the fp64 truth, plus a floor.
        assert max_err(out, truth) <= 2 * max_err(ref, truth) + FLOOR[torch.float32], where
        if exact:
            assert max_err(ref, truth) <= FLOOR[torch.float32], where
        else:
            max_abs, rel = fidelity(out, oracle_attention(q, k, v, causal=causal))
            assert torch.isfinite(torch.tensor([max_abs, rel])).all(), where


@pytest.mark.parametrize("name", [n for n, spec in METHODS.items() if spec.exact])
def test_exact_references_are_the_oracle_in_fp64(name):
    attn = build(name, **SMALL.get(name, {}))
    for n_q, n_k, causal in patterns(attn.capabilities):
        q, k, v = qkv(n_q, n_k, torch.float64)
        out = attn(q, k, v, causal=causal)
        assert out.dtype == torch.float64
        assert max_err(out, oracle_attention(q, k, v, causal=causal)) < 1e-12, (name, n_q, n_k, causal)


# --- decode -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,impl", DECODE_IMPLS, ids=[f"{n}/{i}" for n, i in DECODE_IMPLS])
def test_decode_step_is_the_last_causal_row(name, impl):
    attn = make(name, impl)
    n = CONTEXT + 1
    q, k, v = qkv(n, n)
    full = attn(q, k, v, causal=True)[:, :, -1:]
    state = attn.prefill(k[:, :, :CONTEXT], v[:, :, :CONTEXT])
    step = (q[:, :, -1:], k[:, :, -1:], v[:, :, -1:])
    out, new_state = attn.decode_step(*step, state)
    again, _ = attn.decode_step(*step, state)  # the given state is not consumed: a step can be timed repeatedly
    assert out.shape == (1, HEADS, 1, HEAD_DIM) and out.dtype == torch.float32
    assert torch.equal(out, again)
    assert max_err(out, full) <= FLOOR[torch.float32], max_err(out, full)
    # What the decoder holds after n tokens is what state_bytes(n) reports.
    assert state_tensor_bytes(new_state) == attn.state_bytes(1, HEADS, n, HEAD_DIM, torch.float32)


def test_state_counting_sees_every_buffer_once():
    buf = torch.zeros(10, 4)
    assert state_tensor_bytes((buf[:3], buf[5:], {"z": torch.zeros(2, dtype=torch.float64)}, None, 7)) == 160 + 16
    with pytest.raises(TypeError, match="does not know how to count"):
        state_tensor_bytes(object())


# --- backward -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,impl", BACKWARD_IMPLS, ids=[f"{n}/{i}" for n, i in BACKWARD_IMPLS])
def test_backward_gives_every_used_input_a_gradient(name, impl):
    attn = make(name, impl)
    caps = attn.capabilities
    n_q, n_k, causal = patterns(caps)[0]
    inputs = dict(zip("qkv", (t.requires_grad_() for t in qkv(n_q, n_k)), strict=True))
    try:
        out = attn(*inputs.values(), causal=causal)
    except Unsupported as err:  # a device-dependent refusal (FlexAttention has no CPU backward) must say why
        assert str(err).strip()
        return
    grad_out = torch.randn_like(out)
    used = [inputs[x] for x in caps.grad_inputs]
    # Strict, as the scaling task calls it: an input the output does not use fails here unless it is left out
    # of grad_inputs ("One of the differentiated Tensors appears to not have been used in the graph").
    grads = torch.autograd.grad(out, used, grad_out, retain_graph=True)
    for x, g in zip(caps.grad_inputs, grads, strict=True):
        assert g is not None and g.isfinite().all() and g.abs().sum() > 0, x
    unused = [inputs[x] for x in "qkv" if x not in caps.grad_inputs]
    if unused:
        assert all(g is None for g in torch.autograd.grad(out, unused, grad_out, allow_unused=True))
    if get_method(name).exact:
        leaves = [t.detach().double().requires_grad_() for t in inputs.values()]
        expected = torch.autograd.grad(oracle_attention(*leaves, causal=causal), leaves, grad_out.double())
        for g, e in zip(grads, expected, strict=True):
            assert max_err(g, e) < 1e-4


# --- refusal ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,impl", IMPLS, ids=IMPL_IDS)
def test_what_is_not_supported_is_refused_with_a_reason(name, impl):
    attn = make(name, impl)
    caps = attn.capabilities
    some = patterns(caps)[0]
    caps.check(causal=some[2], cross=False, mode="fwd", dtype="float32")  # the supported cell passes
    refused = []
    if not caps.causal:
        refused.append((dict(causal=True, cross=False, mode="fwd"), lambda: attn(*qkv(33, 33), causal=True)))
    if not caps.non_causal:
        refused.append((dict(causal=False, cross=False, mode="fwd"), lambda: attn(*qkv(33, 33), causal=False)))
    if not caps.cross:
        refused.append((dict(causal=some[2], cross=True, mode="fwd"), lambda: attn(*qkv(17, 64), causal=some[2])))
    if not caps.decode:
        refused.append((dict(causal=True, cross=True, mode="decode"), lambda: attn.prefill(*qkv(33, 33)[1:])))
    if not caps.backward:
        refused.append((dict(causal=some[2], cross=False, mode="fwd_bwd"), None))
    for dtype in DTYPES:
        if dtype not in caps.dtypes:
            refused.append((dict(causal=some[2], cross=False, mode="fwd", dtype=dtype), None))
    for cell, call in refused:
        with pytest.raises(Unsupported) as err:
            caps.check(**{"dtype": "float32", **cell})
        assert str(err.value).strip(), cell
        if call is not None:
            with pytest.raises(Unsupported) as err:
                call()
            assert str(err.value).strip(), cell
