"""Video UNet adapters (AnimateDiff, TextToVideoSD): [B, T, 3, H, W] media and 6-D latents, bad video inputs. Ratio 1,
stock parity and LoRA (or its refusal for TextToVideoSD) are checked for every family in test_contract.py."""

from __future__ import annotations

import pytest
import torch

from visalign.generators import load_generator

PROMPTS = ["a red cube", "two blue circles"]
FRAMES = 3


@pytest.fixture(scope="module", params=["AnimateDiffPipeline", "TextToVideoSDPipeline"])
def family(request, video_paths):
    return request.param, video_paths[request.param], load_generator(video_paths[request.param])


def test_rollout_is_a_video_with_frame_latents(family):
    _, _, gen = family
    r = gen.rollout(PROMPTS, steps=2, guidance=4.0, eta=1.0, seed=1, num_frames=FRAMES)
    assert r.media.shape == (2, FRAMES, 3, 32, 32) and 0 <= r.media.min() and r.media.max() <= 1
    assert r.latents.shape == (2, 3, 4, FRAMES, 16, 16) and torch.isfinite(r.log_probs).all()


def test_bad_video_inputs_name_the_fix(family):
    _, _, gen = family
    with pytest.raises(ValueError, match="prompt list is empty"):
        gen.rollout([], steps=1, num_frames=FRAMES)
    with pytest.raises(ValueError, match=r"width=31 px is not divisible by 2.*30 or 32"):
        gen.rollout(PROMPTS, steps=1, width=31, num_frames=FRAMES)
    with pytest.raises(ValueError, match="num_frames must be ≥ 1"):
        gen.rollout(PROMPTS, steps=1, num_frames=0)
    with pytest.raises(ValueError, match="one negative per prompt"):
        gen.rollout(PROMPTS, steps=1, num_frames=FRAMES, negative_prompt=["blurry"])
