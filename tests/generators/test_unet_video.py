"""Video UNet adapters (AnimateDiff, TextToVideoSD): the same contract as SD, on [B, T, 3, H, W] media."""

from __future__ import annotations

import pytest
import torch

from visalign.generators import LoraSpec, load_generator

PROMPTS = ["a red cube", "two blue circles"]
FRAMES = 3


@pytest.fixture(scope="module", params=["AnimateDiffPipeline", "TextToVideoSDPipeline"])
def family(request, video_paths):
    return request.param, video_paths[request.param], load_generator(video_paths[request.param])


def test_rollout_contract_and_ratio_one(family):
    _, _, gen = family
    r = gen.rollout(PROMPTS, steps=3, guidance=4.0, eta=1.0, seed=1, num_frames=FRAMES)
    assert r.media.shape == (2, FRAMES, 3, 32, 32) and 0 <= r.media.min() and r.media.max() <= 1
    assert r.latents.shape == (2, 4, 4, FRAMES, 16, 16) and torch.isfinite(r.log_probs).all()
    ratio = torch.exp(gen.step_log_prob(r, [0, 1, 2]) - r.log_probs)
    torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-4, rtol=0)


def test_eta_zero_reproduces_stock_pipeline(family):
    import diffusers

    name, path, gen = family
    ours = gen.rollout(PROMPTS, steps=2, guidance=5.0, eta=0.0, seed=3, num_frames=FRAMES)
    pipe = getattr(diffusers, name).from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    stock = pipe(PROMPTS, num_inference_steps=2, guidance_scale=5.0, num_frames=FRAMES, output_type="pt",
                 generator=[torch.Generator("cpu").manual_seed(s) for s in ours.seeds]).frames
    torch.testing.assert_close(ours.media, torch.as_tensor(stock).float(), atol=1e-4, rtol=0)


def test_gradient_reaches_lora_and_nothing_else(video_paths):
    gen = load_generator(video_paths["AnimateDiffPipeline"])
    params = gen.add_lora(LoraSpec(rank=2, alpha=2.0))
    r = gen.rollout(PROMPTS[:1], steps=2, guidance=3.0, eta=1.0, seed=0, num_frames=FRAMES)
    gen.step_log_prob(r, [1]).sum().backward()
    assert all(p.grad is not None for p in params) and any(p.grad.abs().sum() > 0 for p in params)
    frozen = [p for m in gen.modules().values() for p in m.parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)
