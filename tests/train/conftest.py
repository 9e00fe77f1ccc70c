"""Shared fixtures of the training tests: one tiny random-init SD pipeline per session, and run settings that
keep a ``visalign train`` run to a few CPU seconds per iteration."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY_RECIPE = REPO / "pipelines" / "tiny-sd-grpo.yaml"

# One prompt × 2 samples, 2 DDIM steps at 16 px: the smallest run that still has a group to normalise.
FAST = ["sample.prompts_per_step=1", "sample.images_per_prompt=2", "sample.steps=2", "model.resolution=16",
        "run.progress=false", "run.tensorboard=false"]


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-init ``StableDiffusionPipeline`` folder (32 px native, saved with safetensors)."""
    from tests.generators.conftest import build_sd

    return build_sd(tmp_path_factory.mktemp("train-tiny-sd") / "sd")


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread inside the training tests: on the shared, loaded CPU idle OpenMP workers spin and burn CPU
    time without making the tiny models faster."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
