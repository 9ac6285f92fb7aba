"""Attention methods: `from methods import build; attn = build('softmax', impl='kernel')`.

Importing this package registers every method module listed in `METHOD_MODULES`.
"""

import importlib

from methods.base import Attention, Capabilities, Shape, Unsupported
from methods.registry import METHODS, UnknownName, build, get_impl, get_method, unavailable_reason

METHOD_MODULES = (
    "methods.softmax", "methods.deltanet", "methods.lowrank", "methods.linear_attention",
    "methods.sparse_patterns", "methods.bigbird", "methods.sparse_selection", "methods.hyperattention", "methods.memory_efficient",
    "methods.identity",
)

for _module in METHOD_MODULES:
    importlib.import_module(_module)

__all__ = [
    "METHODS",
    "Attention",
    "Capabilities",
    "Shape",
    "UnknownName",
    "Unsupported",
    "build",
    "get_impl",
    "get_method",
    "unavailable_reason",
]
