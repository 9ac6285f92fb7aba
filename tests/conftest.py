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
