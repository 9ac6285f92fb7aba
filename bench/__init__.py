"""attnbench's harness. Importing it first (as `python -m bench.*` does) sets one allocator default.

`THP_MEM_ALLOC_ENABLE=1` makes torch back CPU tensors of 2 MiB and more with transparent huge pages;
torch reads it once, at its first allocation, so it is set here, before anything imports torch
(see `bench.measure.allocator` for why, and what it changed).
"""

import os as _os
import sys as _sys

# Whether torch can have seen the switch: it was in the environment already, or torch is not loaded yet.
THP_SWITCH_IN_TIME = "THP_MEM_ALLOC_ENABLE" in _os.environ or "torch" not in _sys.modules
_os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
