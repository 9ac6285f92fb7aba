"""Every method and implementation, registered in one place with its enable guard (as tritonbench does).

A module in `methods/` registers its implementations with `@register(...)`;
`methods/__init__.py` imports those modules, so importing `methods` fills the
registry. Nothing else needs to know which methods exist.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from methods.base import Attention, Capabilities, ImplKind, Unsupported


class UnknownName(ValueError):
    """A name that is not registered; the message lists the valid choices on one line."""


def unknown(kind: str, name: str, choices) -> UnknownName:
    return UnknownName(f"unknown {kind} {name!r}; choose from: {', '.join(sorted(choices))}")


@dataclass
class ImplSpec:
    name: str
    kind: ImplKind
    factory: Callable[..., Attention]
    capabilities: Capabilities
    # Returns None when the implementation can run on `device`, else a one-line reason.
    guard: Callable[[torch.device], str | None] = lambda device: None
    description: str = ""


@dataclass
class MethodSpec:
    name: str
    family: str
    description: str
    source: str  # the paper or system it comes from
    exact: bool = True
    impls: dict[str, ImplSpec] = field(default_factory=dict)


METHODS: dict[str, MethodSpec] = {}


def method(name: str, family: str, description: str, source: str, exact: bool = True) -> MethodSpec:
    """Declare a method once, before registering its implementations."""
    if name in METHODS:
        raise ValueError(f"method {name!r} registered twice")
    METHODS[name] = MethodSpec(name, family, description, source, exact)
    return METHODS[name]


def register(
    method_name: str,
    impl: str,
    kind: ImplKind,
    capabilities: Capabilities,
    guard: Callable[[torch.device], str | None] | None = None,
    description: str = "",
):
    """Class decorator: `cls(**params)` becomes `build(method_name, impl=impl, **params)`."""

    def wrap(cls: type[Attention]) -> type[Attention]:
        spec = METHODS[method_name]
        cls.method, cls.impl, cls.kind, cls.family = method_name, impl, kind, spec.family
        cls.exact, cls.capabilities = spec.exact, capabilities
        spec.impls[impl] = ImplSpec(impl, kind, cls, capabilities, guard or (lambda device: None), description)
        return cls

    return wrap


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise unknown("method", name, METHODS)
    return METHODS[name]


def get_impl(method_name: str, impl: str) -> ImplSpec:
    spec = get_method(method_name)
    if impl not in spec.impls:
        raise unknown(f"impl of {method_name}", impl, spec.impls)
    return spec.impls[impl]


def unavailable_reason(method_name: str, impl: str, device: torch.device | str) -> str | None:
    """None when `impl` can run on `device`, else why not (a missing package, no GPU, ...)."""
    return get_impl(method_name, impl).guard(torch.device(device))


def build(name: str, impl: str = "reference", device: torch.device | str | None = None, **params) -> Attention:
    """`build('softmax', impl='kernel')(q, k, v, causal=True)`: the one call users need.

    Raises `UnknownName` for a bad name and `Unsupported` when the
    implementation cannot run here (its enable guard says why).
    """
    spec = get_impl(name, impl)
    if device is not None:
        reason = spec.guard(torch.device(device))
        if reason:
            raise Unsupported(f"{name}/{impl}: {reason}")
    return spec.factory(**params)


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


def package_guard(module: str, pip_name: str | None = None) -> Callable[[torch.device], str | None]:
    def guard(device: torch.device) -> str | None:
        import importlib

        try:
            importlib.import_module(module)
        except Exception as err:  # an installed-but-broken package is as unusable as a missing one
            return f"optional package {pip_name or module} is not importable ({type(err).__name__}: {err})".splitlines()[0]
        return None

    return guard


def cuda_guard(device: torch.device) -> str | None:
    return None if device.type == "cuda" else f"needs a CUDA GPU (device is {device.type})"


def all_guards(*guards: Callable[[torch.device], str | None]) -> Callable[[torch.device], str | None]:
    def guard(device: torch.device) -> str | None:
        for g in guards:
            reason = g(device)
            if reason:
                return reason
        return None

    return guard


__all__ = [
    "METHODS",
    "ImplSpec",
    "MethodSpec",
    "UnknownName",
    "Unsupported",
    "build",
    "get_impl",
    "get_method",
    "method",
    "register",
    "unavailable_reason",
]
