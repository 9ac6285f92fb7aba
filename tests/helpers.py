"""Helpers shared by the accuracy tests.

Imported as `from helpers import ...`: pytest puts `tests/` on `sys.path` (rootdir conftest, no
`__init__.py`), the same way `test_kernel_deltanet.py` imports from `test_deltanet.py`.

The accuracy rule these serve (FlashAttention's own test rule): an implementation's max-abs error against
the fp64 oracle may be at most twice that of the PyTorch reference in the same dtype, plus `FLOOR`.
"""

from __future__ import annotations

import torch

# The absolute slack of the rule per dtype, for references that are exact to rounding.
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def max_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Max-abs difference, computed in fp64; 0 when `out` is empty."""
    return float((out.detach().double() - ref.detach().double()).abs().max()) if out.numel() else 0.0
