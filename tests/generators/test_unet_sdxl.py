"""SDXL adapter: its added conditioning (pooled embeds, time ids). Ratio 1, stock parity and the LoRA round trip are
checked for every family in test_contract.py."""

from __future__ import annotations

import pytest
import torch

from visalign.generators import load_generator

PROMPTS = ["a red cube", "two blue circles"]


@pytest.fixture(scope="module")
def sdxl(sdxl_path):
    return load_generator(sdxl_path)


def test_rollout_carries_pooled_embeds_and_time_ids(sdxl):
    r = sdxl.rollout(PROMPTS, steps=2, guidance=4.0, eta=1.0, seed=1)
    assert r.media.shape == (2, 3, 32, 32) and 0 <= r.media.min() and r.media.max() <= 1
    assert r.latents.shape == (2, 3, 4, 16, 16) and torch.isfinite(r.log_probs).all()
    assert set(r.condition.extras) == {"text_embeds", "time_ids"}
    assert r.condition.extras["time_ids"].tolist()[0] == [32, 32, 0, 0, 32, 32]
