"""Test-wide set-up: no network, deterministic CPU, the tiny-scorer factory."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# Under pytest-xdist each worker gets one thread: two workers × two threads on two cores spin-wait on each other
# (measured: one training iteration went from 0.5 s to ~20 s of CPU).
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory):
    """A session-wide folder where tiny random-init models are written once and shared."""
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session")
def build_tiny_scorer(tiny_dir):
    """``build_tiny_scorer(id)`` → the registered scorer with tiny offline weights (see tests/tiny)."""
    from tests.tiny import build_tiny_scorer as build

    cache: dict[str, object] = {}

    def factory(name: str):
        if name not in cache:
            cache[name] = build(name, tiny_dir)
        return cache[name]

    return factory
