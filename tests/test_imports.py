"""Each entry point imports on its own: an import cycle shows only when a module is the first one imported
(`python -m bench.compare` broke that way while every test, importing in another order, passed)."""

from __future__ import annotations

import subprocess
import sys

ENTRY_POINTS = ("bench.run", "bench.compare", "bench.report", "bench.results", "bench.worker", "bench.list",
                "bench.sweep", "bench.declarations", "tasks", "methods")  # fmt: skip

# One interpreter (torch is imported once); before each entry point every module of the project is forgotten,
# so each is imported first, as its own command line imports it.
PROGRAM = """
import sys, importlib
import torch  # noqa: F401 - kept: only the project's own modules are forgotten
failed = []
for name in sys.argv[1:]:
    for mod in [m for m in sys.modules if m.split(".")[0] in ("bench", "tasks", "methods")]:
        del sys.modules[mod]
    try:
        importlib.import_module(name)
    except Exception as err:
        failed.append(f"{name}: {type(err).__name__}: {err}")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_each_entry_point_imports_first() -> None:
    proc = subprocess.run([sys.executable, "-c", PROGRAM, *ENTRY_POINTS], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
