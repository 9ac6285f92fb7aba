"""Attention methods: `from methods import build; attn = build('softmax', impl='kernel')`.

Importing this package imports every module in it (except `kernels/` and
private `_modules`), in sorted order; a method module registers its method and
implementations as it is imported (see `methods/registry.py`), helper modules
register nothing. So adding a method is adding a module (and its
`conf/method/<name>.yaml`): no list to edit.
"""

import importlib
import pkgutil

from methods.base import Attention, Capabilities, Shape, Unsupported
from methods.registry import (
    METHODS,
    BadParam,
    Param,
    UnknownName,
    build,
    get_impl,
    get_method,
    unavailable_reason,
    validate_params,
)

SKIPPED = frozenset({"kernels"})  # the Triton kernels register nothing and need triton to import


def _discover() -> None:
    """Import every method module of this package, sorted by name, so registration order never varies."""
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_") or info.name in SKIPPED:
            continue
        importlib.import_module(f"{__name__}.{info.name}")
    # Modules import each other, so import order is not registration order; list methods by name.
    for name in sorted(METHODS):
        METHODS[name] = METHODS.pop(name)


_discover()

__all__ = [
    "METHODS",
    "Attention",
    "BadParam",
    "Capabilities",
    "Param",
    "Shape",
    "UnknownName",
    "Unsupported",
    "build",
    "get_impl",
    "get_method",
    "unavailable_reason",
    "validate_params",
]
