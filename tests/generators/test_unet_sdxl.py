"""SDXL adapter: added conditioning (pooled embeds, time ids), ratio 1, stock parity, LoRA into stock diffusers."""

from __future__ import annotations

import pytest
import torch

from tests.generators.conftest import stock_images
from visalign.generators import LoraSpec, load_generator

PROMPTS = ["a red cube", "two blue circles"]


@pytest.fixture(scope="module")
def stock(sdxl_path):
    """One stock ``StableDiffusionXLPipeline`` shared by the module (loading it dominates a parity test)."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sdxl(sdxl_path):
    return load_generator(sdxl_path)


def test_rollout_contract_and_ratio_one(sdxl):
    r = sdxl.rollout(PROMPTS, steps=2, guidance=4.0, eta=1.0, seed=1)
    assert r.media.shape == (2, 3, 32, 32) and 0 <= r.media.min() and r.media.max() <= 1
    assert r.latents.shape == (2, 3, 4, 16, 16) and torch.isfinite(r.log_probs).all()
    assert set(r.condition.extras) == {"text_embeds", "time_ids"}
    assert r.condition.extras["time_ids"].tolist()[0] == [32, 32, 0, 0, 32, 32]
    ratio = torch.exp(sdxl.step_log_prob(r, [0, 1]) - r.log_probs)
    torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-4, rtol=0)


def test_eta_zero_reproduces_stock_pipeline(sdxl, stock):
    ours = sdxl.rollout(PROMPTS, steps=2, guidance=5.0, eta=0.0, seed=3)
    torch.testing.assert_close(ours.media, stock_images(stock, PROMPTS, ours.seeds, 2, 5.0), atol=1e-4, rtol=0)


def test_lora_saved_by_visalign_matches_stock_diffusers(sdxl_path, stock, tmp_path):
    gen = load_generator(sdxl_path)
    params = gen.add_lora(LoraSpec(rank=2, alpha=4.0))
    optimizer = torch.optim.Adam(params, lr=5e-2)
    for _ in range(2):
        r = gen.rollout(PROMPTS, steps=2, guidance=3.0, eta=1.0, seed=0)
        loss = -(torch.tensor([[1.0], [-1.0]]) * gen.step_log_prob(r, [0, 1])).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    frozen = [p for m in gen.modules().values() for p in m.parameters() if not p.requires_grad]
    assert all(p.grad is None for p in frozen)
    folder = gen.save(tmp_path / "lora")
    ours = gen.rollout(PROMPTS, steps=2, guidance=3.0, eta=0.0, seed=6)
    with_lora = stock_images(stock, PROMPTS, ours.seeds, 2, 3.0, lora_dir=folder)
    torch.testing.assert_close(ours.media, with_lora, atol=1e-4, rtol=0)
    assert (with_lora - stock_images(stock, PROMPTS, ours.seeds, 2, 3.0)).abs().max() > 1e-3
