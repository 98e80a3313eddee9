"""Test set-up shared by the whole suite.

Without a GPU the Triton kernels run interpreted on CPU tensors; TRITON_INTERPRET must be set
before triton compiles any kernel, so it is set here, before the tests import the package.
"""
import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from tests.helpers import HAS_CUDA  # noqa: E402  (after TRITON_INTERPRET is set)


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none present)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """A different but reproducible seed per test: fresh random inputs, never zeros."""
    seed = zlib.crc32(request.node.nodeid.encode()) % (2**31)
    torch.manual_seed(seed)
    yield
