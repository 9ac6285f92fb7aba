"""Every method and implementation, registered in one place with its enable guard (as tritonbench does).

A module in `methods/` declares its method once with `method(...)` (family,
source, and its parameters as `Param`s: type, default, valid range, one-line
doc) and registers its implementations with `@register(...)` (or
`register_impls` when one class serves several). `methods/__init__.py`
imports every module of the package, so importing `methods` fills the
registry. Nothing else needs to know which methods exist.

Parameter defaults live in the `Param`s only: `build` and `validate_params`
fill them in, the constructors take every parameter explicitly, and
`conf/method/<name>.yaml` repeats them because Hydra needs the keys (a test
holds the two equal).
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from methods.base import Attention, Capabilities, ImplKind, Unsupported

Guard = Callable[[torch.device], str | None]


class UnknownName(ValueError):
    """A name that is not registered; the message lists the valid choices on one line."""


class BadParam(ValueError):
    """A method parameter that is unknown or outside what it accepts; the message is one line naming both."""


def unknown(kind: str, name: str, choices) -> UnknownName:
    return UnknownName(f"unknown {kind} {name!r}; choose from: {', '.join(sorted(choices))}")


_TYPE_NAMES = {int: "an int", float: "a float", str: "a string", bool: "a bool"}


@dataclass(frozen=True)
class Param:
    """One parameter of a method: its type, default, what it accepts, and a one-line doc.

    `min` / `max` bound numbers (inclusive; `min_open` makes the lower bound
    exclusive, for epsilons and scales that must be > 0); `choices` lists the
    values a string may take. A parameter whose default is None also accepts
    None (YAML `null`: "decide at the first call").
    """

    name: str
    type: type
    default: Any
    doc: str = ""
    min: float | None = None
    max: float | None = None
    min_open: bool = False
    choices: tuple[Any, ...] | None = None

    def __post_init__(self) -> None:
        if self.type not in _TYPE_NAMES:
            raise TypeError(f"parameter {self.name}: type must be one of int, float, str, bool, got {self.type}")
        if self.default is not None:
            self.coerce(self.default)  # a default outside its own range is a bug in the declaration

    @property
    def nullable(self) -> bool:
        return self.default is None

    def accepts(self) -> str:
        """What the parameter accepts, as the error message says it: `an int >= 1`, `one of 'a', 'b'`, ..."""
        if self.choices is not None:
            text = "one of " + ", ".join(repr(c) for c in self.choices)
        else:
            text = _TYPE_NAMES[self.type]
            lo = None if self.min is None else f"{'>' if self.min_open else '>='} {self.min:g}"
            hi = None if self.max is None else f"<= {self.max:g}"
            if lo and hi:
                text += f" {lo} and {hi}"
            elif lo or hi:
                text += f" {lo or hi}"
        return f"{text} or null" if self.nullable else text

    def coerce(self, value: Any) -> Any:
        """`value` as the declared type, converted only where nothing is lost (YAML `1` for a float: 1.0).

        Raises ValueError (the caller adds the method's name) when the value is not accepted.
        """
        if value is None and self.nullable:
            return None
        out = _as_type(self.type, value)
        ok = out is not None
        if ok and self.choices is not None:
            ok = out in self.choices
        if ok and self.type in (int, float):
            ok = not math.isnan(out)
            ok = ok and (self.min is None or (out > self.min if self.min_open else out >= self.min))
            ok = ok and (self.max is None or out <= self.max)
        if not ok:
            raise ValueError(f"parameter {self.name} must be {self.accepts()}, got {value!r}")
        return out


def _as_type(kind: type, value: Any) -> Any:
    """`value` as `kind` when that is lossless (bools are never numbers), else None."""
    if isinstance(value, bool) or kind is bool:
        return value if kind is bool and isinstance(value, bool) else None
    if kind is str:
        return value if isinstance(value, str) else None
    if not isinstance(value, int | float):
        return None
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            return None
        return int(value)
    as_float = float(value)
    return as_float if as_float == value else None


@dataclass
class ImplSpec:
    name: str
    kind: ImplKind
    factory: Callable[..., Attention]
    capabilities: Capabilities
    # Returns None when the implementation can run on `device`, else a one-line reason.
    guard: Guard = lambda device: None
    description: str = ""


@dataclass
class MethodSpec:
    name: str
    family: str
    description: str
    source: str  # the paper or system it comes from
    exact: bool = True
    params: tuple[Param, ...] = ()
    # Constraints between parameters: given the complete, typed params, None or what is wrong.
    check: Callable[[Mapping[str, Any]], str | None] | None = None
    # Can replace exact softmax in a model trained with softmax, with no training (the `lm_swap` protocol
    # of SEA, HyperAttention, StreamingLLM, MInference): the output approximates softmax's, not a new function.
    training_free: bool = False
    impls: dict[str, ImplSpec] = field(default_factory=dict)

    def defaults(self) -> dict[str, Any]:
        """The declared default of every parameter: what `conf/method/<name>.yaml` must say."""
        return {p.name: p.default for p in self.params}


METHODS: dict[str, MethodSpec] = {}
TRAINING_FREE_FAMILIES = ("exact", "sparse")  # families whose methods default to `training_free`


def method(
    name: str,
    family: str,
    description: str,
    source: str,
    exact: bool = True,
    params: tuple[Param, ...] = (),
    check: Callable[[Mapping[str, Any]], str | None] | None = None,
    training_free: bool | None = None,
) -> MethodSpec:
    """Declare a method once, with its parameters, before registering its implementations.

    `training_free` defaults to True for the exact and sparse families (they compute softmax over all or
    some keys, so a softmax-trained model can use them as they are) and False otherwise; a method of
    another family that approximates softmax's output says so explicitly.
    """
    if training_free is None:
        training_free = family in TRAINING_FREE_FAMILIES
    if name in METHODS:
        raise ValueError(f"method {name!r} registered twice")
    names = [p.name for p in params]
    if len(set(names)) != len(names):
        raise ValueError(f"method {name!r} declares a parameter twice: {names}")
    METHODS[name] = MethodSpec(name, family, description, source, exact, tuple(params), check, training_free)
    return METHODS[name]


def register(
    method_name: str,
    impl: str,
    kind: ImplKind,
    capabilities: Capabilities,
    guard: Guard | None = None,
    description: str = "",
):
    """Class decorator: `cls(**params)` becomes `build(method_name, impl=impl, **params)`."""

    def wrap(cls: type[Attention]) -> type[Attention]:
        spec = METHODS[method_name]
        if impl in spec.impls:
            raise ValueError(f"impl {impl!r} of method {method_name!r} registered twice")
        cls.method, cls.impl, cls.kind, cls.family = method_name, impl, kind, spec.family
        cls.exact, cls.capabilities = spec.exact, capabilities
        spec.impls[impl] = ImplSpec(impl, kind, cls, capabilities, guard or (lambda device: None), description)
        return cls

    return wrap


@dataclass(frozen=True)
class Impl:
    """One implementation for `register_impls`: what `register` takes, plus mixins to put before the class."""

    name: str
    kind: ImplKind
    capabilities: Capabilities
    guard: Guard | None = None
    description: str = ""
    mixins: tuple[type, ...] = ()


def register_impls(method_name: str, cls: type[Attention], *impls: Impl) -> dict[str, type[Attention]]:
    """Register `cls` once per implementation, as a subclass that adds nothing but the impl's mixins.

    For methods whose one class runs every implementation and branches on
    `self.kind` (the sparse patterns), or whose kernel impl is the reference
    with a kernel mixin (the linear family). Returns the classes by impl name.
    """
    out = {}
    for impl in impls:
        name = f"{cls.__name__}_{impl.name}"
        sub = type(name, (*impl.mixins, cls), {"__module__": cls.__module__, "__qualname__": name})
        out[impl.name] = register(method_name, impl.name, impl.kind, impl.capabilities, impl.guard, impl.description)(
            sub
        )
    return out


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise unknown("method", name, METHODS)
    return METHODS[name]


def get_impl(method_name: str, impl: str) -> ImplSpec:
    spec = get_method(method_name)
    if impl not in spec.impls:
        raise unknown(f"impl of {method_name}", impl, spec.impls)
    return spec.impls[impl]


def validate_params(method_name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """The complete parameters of `method_name`: `params` typed and checked, defaults for the rest.

    Raises `UnknownName` for an unknown method and `BadParam` (one line: the
    method, the parameter, what it accepts) for an unknown parameter or a
    value the declaration does not accept, e.g.
    `method sliding_window: parameter window must be an int >= 1, got 'abc'`.
    """
    spec = get_method(method_name)
    declared = {p.name: p for p in spec.params}
    for name in params:
        if name not in declared:
            listed = ", ".join(declared) or "none"
            raise BadParam(f"method {method_name}: unknown parameter {name!r}; parameters: {listed}")
    out = {}
    for p in spec.params:
        try:
            out[p.name] = p.coerce(params[p.name]) if p.name in params else p.default
        except ValueError as err:
            raise BadParam(f"method {method_name}: {err}") from None
    problem = spec.check(out) if spec.check else None
    if problem:
        raise BadParam(f"method {method_name}: {problem}")
    return out


def unavailable_reason(method_name: str, impl: str, device: torch.device | str) -> str | None:
    """None when `impl` can run on `device`, else why not (a missing package, no GPU, ...)."""
    return get_impl(method_name, impl).guard(torch.device(device))


def build(name: str, impl: str = "reference", device: torch.device | str | None = None, **params) -> Attention:
    """`build('softmax', impl='kernel')(q, k, v, causal=True)`: the one call users need.

    Raises `UnknownName` for a bad name, `BadParam` for a parameter the method
    does not declare or accept (see `validate_params`), and `Unsupported` when
    the implementation cannot run here (its enable guard says why).
    """
    spec = get_impl(name, impl)
    full = validate_params(name, params)
    if device is not None:
        reason = spec.guard(torch.device(device))
        if reason:
            raise Unsupported(f"{name}/{impl}: {reason}")
    return spec.factory(**full)


# --- enable guards shared by several implementations -------------------------------


def triton_guard(device: torch.device) -> str | None:
    """Kernels need a CUDA device, or Triton's interpreter (then the row is marked `interpreted`)."""
    try:
        import triton  # noqa: F401
    except ImportError as err:
        return f"triton is not installed ({err})"
    if device.type == "cuda":
        return None
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return f"Triton kernels need a CUDA GPU (device is {device.type}); set TRITON_INTERPRET=1 to run them interpreted"


def interpreted(impl_kind: ImplKind, device: torch.device | str) -> bool:
    """A kernel row from Triton's interpreter: correct, but its latency means nothing."""
    return impl_kind == "kernel" and torch.device(device).type != "cuda" and os.environ.get("TRITON_INTERPRET") == "1"


def package_guard(module: str, pip_name: str | None = None) -> Guard:
    def guard(device: torch.device) -> str | None:
        try:
            importlib.import_module(module)
        except Exception as err:  # an installed-but-broken package is as unusable as a missing one
            return (
                f"optional package {pip_name or module} is not importable ({type(err).__name__}: {err})".splitlines()[0]
            )
        return None

    return guard


def cuda_guard(device: torch.device) -> str | None:
    return None if device.type == "cuda" else f"needs a CUDA GPU (device is {device.type})"


def all_guards(*guards: Guard) -> Guard:
    def guard(device: torch.device) -> str | None:
        for g in guards:
            reason = g(device)
            if reason:
                return reason
        return None

    return guard


def require_dot_tile(name: str, value: int) -> None:
    """Raise `Unsupported` unless `value` can be a Triton `tl.dot` tile (a power of two >= 16).

    Kernel impls call it for parameters that are valid for the method but not
    for the kernel (a chunk or block size), so the row says `unsupported` with
    the reason instead of failing inside the launch.
    """
    if value < 16 or value & (value - 1):
        raise Unsupported(f"the Triton kernel needs {name} to be a power of two >= 16, got {value}")


__all__ = [
    "METHODS",
    "BadParam",
    "Impl",
    "ImplSpec",
    "MethodSpec",
    "Param",
    "UnknownName",
    "Unsupported",
    "build",
    "get_impl",
    "get_method",
    "method",
    "register",
    "register_impls",
    "require_dot_tile",
    "unavailable_reason",
    "validate_params",
]
