"""One torch thread for the reward-model tests: their tiny forward/backward passes are too small to split, and on a
shared 2-core machine a second thread only spin-waits (measured: the trainer tests ran 3-4x slower with 2)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
