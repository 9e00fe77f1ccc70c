"""Wan and LTX adapters on tiny random-init pipelines loaded through ``from_pretrained`` (no network).

The SDE step broadcasts its noise level over the 5-D latents ``[B, C, F', h, w]``; this checks the generator contract
for a video family: media ``[B, T, 3, H, W]`` in [0, 1], finite log-probs, ratio 1 on-policy, parity with the stock
pipeline at noise level 0, SDE windows, LoRA gradients and a LoRA that stock diffusers loads identically.
"""

from __future__ import annotations

import pytest
import torch

from tests.generators import flow_fixtures
from tests.generators.flow_fixtures import build_ltx, build_wan
from visalign.generators import load_generator, select_train_steps

PROMPTS = ["a red cube", "two blue circles"]
SEQ_LEN = 16
# Per family: builder, sizes, and the latent shape [C, F', h, w] those sizes give (Wan: ×8 space, LTX: ×4 space).
FAMILIES = {
    "wan": (build_wan, {"height": 16, "width": 16, "num_frames": 5}, (16, 2, 2, 2)),
    "ltx": (build_ltx, {"height": 32, "width": 32, "num_frames": 9}, (8, 3, 8, 8)),
}
flow_dir = flow_fixtures.flow_dir  # the session fixture, shared with the other flow test modules


def _load(name, flow_dir):
    gen = load_generator(FAMILIES[name][0](flow_dir))
    gen.max_sequence_length = SEQ_LEN
    return gen


def _stock(gen, steps, guidance, seeds):
    return flow_fixtures.stock_call(gen, PROMPTS, steps, guidance, seeds, SEQ_LEN, **FAMILIES[gen.family][1])


@pytest.fixture(scope="module", params=list(FAMILIES))
def video(request, flow_dir):
    gen = _load(request.param, flow_dir)
    return gen, FAMILIES[request.param][1], FAMILIES[request.param][2]


def test_rollout_is_a_video_with_finite_log_probs_and_ratio_one(video):
    gen, size, latent = video
    r = gen.rollout(PROMPTS, steps=3, guidance=4.0, eta=0.7, seed=2, **size)
    frames, height = size["num_frames"], size["height"]
    assert r.media.shape == (2, frames, 3, height, height) and r.media.min() >= 0 and r.media.max() <= 1
    assert r.latents.shape == (2, 4, *latent)  # [B, S+1, C, F', h, w]
    assert torch.isfinite(r.log_probs).all() and torch.isfinite(r.log_probs_sum).all()
    # logp_sum is the true density: D · logp_mean with D = C·F'·h·w.
    torch.testing.assert_close(r.log_probs_sum, r.log_probs * torch.Size(latent).numel())
    recomputed = gen.step_log_prob(r, select_train_steps(r.num_steps))
    assert (torch.exp(recomputed - r.log_probs) - 1).abs().max() < 1e-4
    moved = r.select([0, 1])
    moved.latents = r.latents.clone()
    moved.latents[:, 2] += 0.5
    assert (gen.step_log_prob(moved, [1]) - r.log_probs[:, 1:2]).abs().min() > 1e-3


def test_noise_level_zero_reproduces_stock_pipeline(video):
    gen, size, _ = video
    ours = gen.rollout(PROMPTS, steps=3, guidance=5.0, eta=0.0, seed=4, **size)
    stock = _stock(gen, 3, 5.0, [4, 5])
    assert stock.shape == ours.media.shape
    assert (ours.media - stock).abs().max() < 1e-4


def test_sde_window_and_cps_mode(video):
    gen, size, _ = video
    gen.configure_sde(mode="cps", window=(0, 2))
    try:
        r = gen.rollout(PROMPTS, steps=3, guidance=4.0, eta=0.5, seed=1, **size)
        assert torch.isfinite(r.log_probs[:, :2]).all() and torch.isnan(r.log_probs[:, 2]).all()
        assert (gen.step_log_prob(r, [0, 1]) - r.log_probs[:, :2]).abs().max() < 1e-4
    finally:
        gen.configure_sde(mode="flowgrpo", window=None)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_lora_gradients_and_stock_round_trip(name, flow_dir, tmp_path):
    gen = _load(name, flow_dir)
    size = FAMILIES[name][1]
    params = gen.add_lora()
    assert all("lora_" in n for n, p in gen.denoiser.named_parameters() if p.requires_grad)
    optimizer = torch.optim.Adam(params, lr=0.05)
    r = gen.rollout(PROMPTS, steps=2, guidance=4.0, eta=0.7, seed=0, **size)
    loss = -(torch.tensor([1.0, -1.0])[:, None] * gen.step_log_prob(r, [0, 1])).mean()
    loss.backward()
    assert any(p.grad.abs().sum() > 0 for n, p in gen.denoiser.named_parameters() if "lora_B" in n)
    assert all(p.grad is None for n, p in gen.denoiser.named_parameters() if "lora_" not in n)
    optimizer.step()
    ours = gen.rollout(PROMPTS, steps=2, guidance=4.0, eta=0.0, seed=9, **size).media
    out = gen.save(tmp_path / "lora")
    stock = _load(name, flow_dir)
    stock.pipeline.load_lora_weights(str(out))
    assert (_stock(stock, 2, 4.0, [9, 10]) - ours).abs().max() < 1e-4


def test_bad_frame_count_names_the_fix(video):
    gen, _, _ = video
    with pytest.raises(ValueError, match="num_frames=6 must be 1 \\+ a multiple of 4"):
        gen.rollout(PROMPTS, steps=2, height=32, width=32, num_frames=6)
