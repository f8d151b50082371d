"""Suite-wide test setup: offline hubs, and one shared fixture for tiny torch models."""

from __future__ import annotations

import os

import pytest

# Nothing in the suite may reach a model hub: tiny models are built from configs.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def torch_one_thread():
    """Tiny matmuls on a loaded 2-core box: one torch thread is much faster than two spinning
    ones (measured ~40x under load). Module-scoped; restores the thread count afterwards."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
