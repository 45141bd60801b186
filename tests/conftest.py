"""Test configuration.

Kernels are tested on CPU under Triton's interpreter: TRITON_INTERPRET must be set before any
``@triton.jit`` function is defined, so it is set here, before sparsediff is imported (only when no
CUDA device is present; on a GPU machine the real kernels run).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
