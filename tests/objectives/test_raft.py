"""RAFT: deterministic top-k per prompt group, and a step that is exactly the denoising-loss gradient on the kept
samples' final latents under their own prompts."""

from __future__ import annotations

import pytest
import torch

from tests.objectives.conftest import GradRecorder, make_batch, make_context
from visalign.generators import load_generator
from visalign.objectives.base import build_objective
from visalign.objectives.raft import top_k_per_group


def test_top_k_per_group_breaks_ties_by_index_and_skips_dropped_samples():
    rewards = torch.tensor([0.5, 0.9, 0.9, 0.1, 0.7, 0.3, 0.7, 0.2])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    assert top_k_per_group(rewards, groups, torch.ones(8), 1).tolist() == [1, 4]
    assert top_k_per_group(rewards, groups, torch.ones(8), 2).tolist() == [1, 2, 4, 6]
    weights = torch.ones(8)
    weights[1] = 0.0  # Pareto-dropped: the next best of its group is kept instead
    assert top_k_per_group(rewards, groups, weights, 1).tolist() == [2, 4]
    assert top_k_per_group(rewards, groups, torch.ones(8), 10).tolist() == list(range(8))


@pytest.fixture(scope="module")
def adapter(bright_sd_path):
    adapter = load_generator(bright_sd_path)
    adapter.train_full()
    return adapter


def test_step_is_the_denoising_gradient_on_the_kept_samples(adapter):
    rollout = adapter.rollout(["a red cube", "two blue circles"], images_per_prompt=3, steps=2, guidance=1.0,
                              eta=1.0, seed=2)
    params = {n: p for n, p in adapter.denoiser.named_parameters() if p.requires_grad}
    recorder = GradRecorder(params)
    rewards = torch.tensor([0.3, 0.8, 0.1, 0.2, 0.6, 0.9])
    metrics = build_objective("raft", {"top_k": 1}).update(make_batch(rollout, rewards),
                                                           make_context(adapter, [0], recorder, seed=4))
    assert metrics["kept"] == 2 and metrics["kept_reward"] == pytest.approx(0.85)
    # Replay the objective's draws: the shuffle of the kept samples, then (t, ε) from the same generator.
    g = torch.Generator().manual_seed(4)
    kept = torch.tensor([1, 5])
    order = kept[torch.randperm(2, generator=g)].tolist()
    out = adapter.denoising_loss(rollout.latents[order, -1], rollout.condition.select(order), generator=g)
    assert metrics["loss"] == pytest.approx(float(out.loss.mean()), rel=1e-5)
    direct = torch.autograd.grad(out.loss.mean(), list(params.values()))
    flat = torch.cat([recorder.grads[0][n].flatten() for n in params])
    flat_direct = torch.cat([d.flatten() for d in direct])
    assert float((flat - flat_direct).norm() / flat_direct.norm()) < 1e-4
    # Training on the *other* samples would give another step: the selection matters.
    other = adapter.denoising_loss(rollout.latents[[0, 2], -1], rollout.condition.select([0, 2]),
                                   timesteps=out.timesteps, noise=out.noise)
    wrong = torch.cat([d.flatten() for d in torch.autograd.grad(other.loss.mean(), list(params.values()))])
    assert float((flat - wrong).norm() / flat_direct.norm()) > 1e-2


def test_bad_params_name_the_field():
    with pytest.raises(ValueError, match="top_k"):
        build_objective("raft", {"top_k": 0})


def test_reencode_fits_the_vae_encoding_of_the_kept_media(adapter):
    """``reencode: true`` trains on ``encode_media(media)`` (the VAE posterior mean, scaled), not on the sampled
    latents: the two differ, and the loss replays exactly on the re-encoded ones."""
    rollout = adapter.rollout(["a red cube"], images_per_prompt=2, steps=2, guidance=1.0, eta=1.0, seed=3)
    params = {n: p for n, p in adapter.denoiser.named_parameters() if p.requires_grad}
    metrics = build_objective("raft", {"top_k": 1, "reencode": True}).update(
        make_batch(rollout, torch.tensor([0.2, 0.7])), make_context(adapter, [0], GradRecorder(params), seed=5))
    vae = adapter.pipeline.vae
    with torch.no_grad():
        expected = vae.encode(rollout.media[[1]] * 2 - 1).latent_dist.mean * vae.config.scaling_factor
    encoded = adapter.encode_media(rollout.media[[1]])
    torch.testing.assert_close(encoded, expected.float())
    assert not torch.allclose(encoded, rollout.latents[[1], -1], atol=1e-3)
    g = torch.Generator().manual_seed(5)
    torch.randperm(1, generator=g)  # the objective's shuffle of the one kept sample
    with torch.no_grad():
        out = adapter.denoising_loss(encoded, rollout.condition.select([1]), generator=g)
    assert metrics["loss"] == pytest.approx(float(out.loss.mean()), rel=1e-5)
