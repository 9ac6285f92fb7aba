"""Tests run on CPU: Triton kernels run under the interpreter, which must be chosen before triton is imported."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# One thread: tests are dominated by small ops, which OpenMP's second thread only slows down
# (badly so on a shared 2-core machine). Benchmarks keep torch's default thread count.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    """Tests marked `shared_data` read the shared corpora (`tasks.lm_data.data_root()`, `../shared/data` beside
    the repository). Where a checkout has no such folder they are skipped, saying where they looked; wherever
    the folder exists they run (and an altered file fails them: the loader checks every checksum)."""
    from tasks.lm_data import DATA_ENV, EMBEDDED, data_root

    root = data_root()
    missing = [f.path for c in EMBEDDED.values() for f in (c.train, c.validation) if f and not (root / f.path).is_file()]
    if not missing:
        return
    skip = pytest.mark.skip(reason=f"shared corpora not found under {root} ({missing[0]}); set {DATA_ENV}=<folder>")
    for item in items:
        if "shared_data" in item.keywords:
            item.add_marker(skip)
